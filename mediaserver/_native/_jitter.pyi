from mediaserver._native._buffer import _Buffer
from typing import Literal, NamedTuple, final

SEQ_LIMIT: int

class JitterStats(NamedTuple):
    received: int
    played: int
    duplicates: int
    late: int
    concealed: int
    reordered: int
    resyncs: int
    dropped: int

@final
class JitterBuffer:
    def __init__(
        self,
        depth: int = 2,
        frame_bytes: int = 160,
        fill: Literal["silence", "fade"] | _Buffer = "silence",
        codec: Literal["ulaw", "alaw", "pcm16"] = "ulaw",
        *,
        capacity: int | None = None,
        first_seq: int | None = None,
    ) -> None: ...
    def push(self, seq: int, frame: _Buffer) -> None: ...
    def pop(self) -> bytes | None: ...
    def drain(self) -> list[bytes]: ...
    def reset(self, first_seq: int | None = None) -> None: ...
    def __len__(self) -> int: ...
    @property
    def next_seq(self) -> int | None: ...
    @property
    def depth(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def frame_bytes(self) -> int: ...
    @property
    def stats(self) -> JitterStats: ...
