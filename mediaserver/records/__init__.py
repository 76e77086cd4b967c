"""Call records: who called, when, how it ended, and both sides' transcripts.

``model`` (the data, pure), ``migrations`` (the versioned schema), ``store``
(SQLite or PostgreSQL), ``recorder`` (the non-blocking writer the server
runs), ``routes`` (``GET /calls/<sid>``) and ``cli`` (``mediaserver calls``).
See docs/records.md.  Nothing is imported here, so that the bridge can use
``model`` without pulling in the rest.
"""
