"""Embedding fleet: in a FastAPI app of your own, and in a script (docs/embedding.md)."""
