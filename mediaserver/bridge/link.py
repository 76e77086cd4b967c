"""The provider side of a call as the bridge sees it: a :class:`ProviderLink`.

A link is an open model session: commands go in with :meth:`send`, provider
events come out of :meth:`receive`.  A WebSocket provider's link is its
sans-I/O core (``mediaserver.protocol.providers``) plus a wsproto
connection (:mod:`mediaserver.transport.provider_ws`); the built-in echo
agent's link runs in process (:mod:`mediaserver.agents.echo`).  Links are
opened with ``async with``: leaving the block closes the session, so a call
that ends can never leave a model socket open.
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from mediaserver.protocol.providers.base import AudioFormat, FunctionTool, ProviderCommand, ProviderEvent

if TYPE_CHECKING:
    from mediaserver.config import Settings

__all__ = ["AgentOptions", "PolledLink", "ProviderClosed", "ProviderLink"]


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """What the agent is told for one call.

    The defaults come from the settings (``AGENT_INSTRUCTIONS``,
    ``AGENT_GREETING``); an outbound call may override them per call.
    ``tools`` are the functions the model may call.  Every adapter maps these
    onto its provider's session configuration.
    """

    instructions: str
    greeting: str | None = None
    tools: tuple[FunctionTool, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> AgentOptions:
        return cls(instructions=settings.agent_instructions, greeting=settings.agent_greeting)


class ProviderClosed(Exception):
    """The provider's side of the session has ended (closed, failed or timed out).

    ``orderly``: the model ended the session itself, with a normal close
    (a goodbye, a session limit): not a failure.  ``broken``: it sent
    something malformed, so nothing more from it is to be trusted (the
    audio already queued is not played out).
    """

    def __init__(self, reason: str, *, orderly: bool = False, broken: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.orderly = orderly
        self.broken = broken


class ProviderLink(Protocol):
    """An open model session."""

    name: str
    """Provider name for logs (``openai``, ``echo``, ...)."""

    @property
    def input_format(self) -> AudioFormat:
        """What :class:`~mediaserver.protocol.providers.base.SendAudio` payloads must be."""
        ...

    @property
    def output_format(self) -> AudioFormat:
        """What :class:`~mediaserver.protocol.providers.base.AudioDelta` payloads are."""
        ...

    async def send(self, command: ProviderCommand) -> None:
        """Send one command; raises :class:`ProviderClosed` if the session has ended."""
        ...

    async def receive(self) -> ProviderEvent:
        """The next event; raises :class:`ProviderClosed` when the session ends."""
        ...


@runtime_checkable
class PolledLink(ProviderLink, Protocol):
    """A link that can also be read and written from a reactor handler, without awaiting.

    WebSocketLink (mediaserver.transport.provider_ws) over plain TCP.
    """

    def poll_socket(self) -> socket.socket | None:
        """The socket to watch; None when only the awaiting calls may be used (e.g. TLS)."""
        ...

    def read_nowait(self) -> bool:
        """Read what is there without blocking; False when :meth:`receive` must take over."""
        ...

    @property
    def inbox(self) -> deque[ProviderEvent]:
        """The events read and not yet received, oldest first (pop them from the left)."""
        ...

    @property
    def unread(self) -> bool:
        """Messages read from the socket wait for another :meth:`read_nowait` (it takes a bounded number per call)."""
        ...

    def send_nowait(self, command: ProviderCommand) -> bool:
        """Send without waiting: True if sent, False if queued (then :meth:`flush` must run)."""
        ...

    def send_audio_nowait(self, audio: bytes) -> bool:
        """``send_nowait(SendAudio(audio))``, possibly faster (the uplink's per-frame call)."""
        ...

    last_send_s: float  # (Trio time) when something was last sent: a native send sets it too
    frames_audio: bool  # audio_framing() can ever be other than None (the core has an audio envelope: OpenAI's)

    def audio_framing(self) -> tuple[bytes, bytes, Literal[True] | None] | None:
        """``(prefix, suffix, key)`` to frame audio natively now (``_wsframe.uplink_pass``), or None: use :meth:`send_audio_nowait`."""
        ...

    def native_send_fd(self) -> int:
        """The socket's fd when framed audio may be written to it natively now; else -1."""
        ...

    def send_frames_nowait(self, frames: bytes) -> bool:
        """Send audio messages framed as :meth:`audio_framing` said; as :meth:`send_audio_nowait`."""
        ...

    @property
    def backlogged(self) -> bool:
        """True while something queued waits for :meth:`flush`."""
        ...

    async def flush(self) -> None:
        """Write what was queued; raises :class:`ProviderClosed` if the session has ended."""
        ...
