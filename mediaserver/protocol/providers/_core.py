"""Pieces several provider cores share: the ``ProviderSession`` defaults, the
early-audio buffer and the per-reply audio ledger behind clamped truncation.

Private to :mod:`mediaserver.protocol.providers`; the JSON and state-guard
parts every core shares (Twilio's too) are in :mod:`.._wire`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from .._wire import REPLY_HISTORY, SansIOCore, StateT
from ..errors import LocalProtocolError
from .base import AudioFormat, ProviderEvent, WireMessage

__all__ = ["AudioLedger", "EarlyAudio", "ProviderCore", "RecentSet"]

RECENT = 1024  # ids a core remembers of a kind (withdrawn calls, cut replies): an hour-long call stays bounded

K = TypeVar("K", bound=Hashable)
ConfigT = TypeVar("ConfigT")


class ProviderCore(SansIOCore[StateT, ProviderEvent], Generic[StateT, ConfigT]):
    """A provider core: its configuration, audio formats and the quiet defaults of ``ProviderSession``.

    No unsolicited replies (:meth:`pending_messages` is empty) and no
    keepalive; a core whose vendor wants either overrides the method.
    """

    def __init__(
        self,
        config: ConfigT,
        initial: StateT,
        error: StateT,
        *,
        new: StateT | None = None,
        input_format: AudioFormat,
        output_format: AudioFormat,
    ) -> None:
        super().__init__(initial, error, new=new)
        self._config = config
        self._input_format = input_format
        self._output_format = output_format

    @property
    def config(self) -> ConfigT:
        return self._config

    @property
    def input_format(self) -> AudioFormat:
        """The caller audio this provider takes."""
        return self._input_format

    @property
    def output_format(self) -> AudioFormat:
        """The model audio this provider sends."""
        return self._output_format

    def pending_messages(self) -> Sequence[WireMessage]:
        """Nothing: this provider expects no unsolicited replies."""
        return []

    @property
    def keepalive_interval_s(self) -> float | None:
        """``None``: this provider has no keepalive message."""
        return None

    def keepalive(self) -> Sequence[WireMessage]:
        return []

    def closing_messages(self) -> Sequence[WireMessage]:
        """Nothing: closing the socket ends this provider's session."""
        return []


class EarlyAudio:
    """Caller audio held until the provider may take it, at most ``max_bytes``.

    When full, the *oldest* audio is dropped (and counted in
    :attr:`dropped_bytes`), so what is kept is the caller's latest speech.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._dropped = 0

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    @property
    def dropped_bytes(self) -> int:
        """Audio dropped because the buffer was full."""
        return self._dropped

    def __bool__(self) -> bool:
        return bool(self._frames)

    def push(self, payload: bytes) -> None:
        self._frames.append(payload)
        self._bytes += len(payload)
        while self._bytes > self._max_bytes and self._frames:
            dropped = self._frames.popleft()
            self._bytes -= len(dropped)
            self._dropped += len(dropped)

    def take(self) -> list[bytes]:
        """All held frames, oldest first; the buffer is empty afterwards."""
        frames = list(self._frames)
        self._frames.clear()
        self._bytes = 0
        return frames


class AudioLedger(Generic[K]):
    """Bytes of model audio received per reply, for truncation the server accepts.

    A truncation point is clamped to the audio received (a server refuses one
    beyond the audio it produced) and, once clamped, the ledger keeps the cut
    length, so a second truncation cannot reach past the first.
    """

    HISTORY = REPLY_HISTORY  # replies kept, the most recently started

    def __init__(self, bytes_per_ms: int) -> None:
        self._bytes_per_ms = bytes_per_ms
        self._received: dict[K, int] = {}
        self._complete: set[K] = set()
        self._forgotten = RecentSet(4 * self.HISTORY)  # replies let go of lately, told from ones never seen

    def add(self, reply: K, n_bytes: int) -> None:
        received = self._received
        if reply in received:
            received[reply] += n_bytes
        else:
            self._start(reply, n_bytes)

    def complete(self, reply: K) -> None:
        """All of ``reply``'s audio has arrived."""
        if reply not in self._received:
            self._start(reply, 0)
        self._complete.add(reply)

    def _start(self, reply: K, n_bytes: int) -> None:
        received = self._received
        if len(received) >= self.HISTORY:  # forget the reply started longest ago
            oldest = next(iter(received))
            del received[oldest]
            self._complete.discard(oldest)
            self._forgotten.add(oldest)
        received[reply] = n_bytes

    def received_ms(self, reply: K) -> int:
        """Whole ms of ``reply``'s audio received (after truncations); 0 if none."""
        return self._received.get(reply, 0) // self._bytes_per_ms

    def cut(self, reply: K, heard_ms: int, item_id: str) -> int | None:
        """The clamped end (ms) to truncate ``reply`` at, or ``None`` when nothing was cut.

        Nothing was cut when the reply's audio is complete and the caller
        heard all of it.  ``item_id`` names the reply in the error raised for
        a reply with no audio.
        """
        received = self._received.get(reply)
        if received is None:
            if reply in self._forgotten:
                # More than HISTORY replies started since (a model that ends a reply after every word, say): the
                # bridge cuts only what it has played, so what it says was heard stands.
                return heard_ms
            raise LocalProtocolError(f"no audio was received for item {item_id!r}; cannot truncate it")
        bytes_per_ms = self._bytes_per_ms
        if reply in self._complete and heard_ms >= received // bytes_per_ms:
            return None  # (heard to the last whole ms: the marks count whole ms)
        end_ms = min(heard_ms, received // bytes_per_ms)
        self._received[reply] = end_ms * bytes_per_ms
        return end_ms


class RecentSet:
    """A set of the last ``size`` ids added (the oldest forgotten first): per-session memory that stays bounded.

    For ids only ever looked up soon after they are added (a withdrawn
    call's late result, a cut reply's tool result): one forgotten after a
    thousand newer ones is long past mattering.
    """

    __slots__ = ("_ids", "_size")

    def __init__(self, size: int = RECENT) -> None:
        self._ids: dict[Hashable, None] = {}
        self._size = size

    def add(self, key: Hashable) -> None:
        self._ids.pop(key, None)
        self._ids[key] = None
        if len(self._ids) > self._size:
            del self._ids[next(iter(self._ids))]

    def discard(self, key: Hashable) -> None:
        self._ids.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)
