from collections.abc import Callable
from typing import Final, Literal

DONE: Final[int]
INCOMPLETE: Final[int]
OTHER: Final[int]

def mask(data: bytes, key: bytes) -> bytes: ...
class MaskKeys:
    def __init__(self) -> None: ...
    def next(self) -> bytes: ...

def encode_frame(text: bool, payload: bytes, key: bytes | Literal[True] | None = None) -> bytes: ...
def encode_b64_frame(prefix: bytes, data: bytes, suffix: bytes, key: bytes | Literal[True] | None = None) -> bytes: ...
def scan(data: bytes, limit: int, masked: bool) -> tuple[list[str | bytes], int, int]: ...

READ_BYTES: Final[int]

def uplink_pass(
    fd: int,
    limit: int,
    masked: bool,
    take: Callable[[str | bytes, int], tuple[int, bytes] | None],
    max_bytes: int,
    push: Callable[[int, bytes], object],
    pop: Callable[[], bytes | None],
    prefix: bytes,
    suffix: bytes,
    key: bytes | Literal[True] | None,
    out_fd: int,
    budget: int,
) -> tuple[int, bytes | None, int, int, bytes, Exception | None]: ...
