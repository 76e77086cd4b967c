"""mediaserver: a native-accelerated bridge between phone calls and realtime speech models.

This top-level module imports nothing heavy, so that ``mediaserver.codec`` can be
embedded by programs that never run the server.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
