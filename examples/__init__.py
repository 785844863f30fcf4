"""Examples that the tests run (docs/embedding.md shows them)."""
