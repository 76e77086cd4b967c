"""URL helpers with no heavy imports (settings use them at start)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["local_base", "redact"]


def local_base(host: str, port: int) -> str:
    """``http://host:port`` where this machine reaches a server listening on ``host`` (``MEDIASERVER_HOST``):
    127.0.0.1 when it listens on every address, else that address (an IPv6 one in brackets)."""
    host = host.strip()
    if host in ("", "0.0.0.0", "::", "*", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def redact(url: str) -> str:
    """``url`` without credentials, query string or fragment: safe to show or log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
