def parse_media(text: str) -> tuple[int, str, str, int, int, str] | None: ...

class MediaCursor:
    stream_sid: str | None
    next_sequence: int
    sequence_missing: int
    next_inbound_chunk: int
    chunks_missing: int
    def __init__(self) -> None: ...
    def take(self, text: object, max_size: int) -> tuple[int, bytes] | None: ...
