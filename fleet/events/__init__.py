"""Live events: the dispatchers that fan session streams out to SSE and WebSocket clients."""
