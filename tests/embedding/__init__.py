"""fleet.Fleet, embedded: the examples of docs/embedding.md, and the Python API."""
