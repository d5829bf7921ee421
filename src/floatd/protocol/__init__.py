"""The lease protocol, free of I/O: framing, request validation, connection state."""
