"""floatd: an on-premise floating license server."""

__version__ = "0.1.0"
