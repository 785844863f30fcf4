"""Serving a node over HTTP: uvicorn for one process, gunicorn for several."""
