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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mediaserver.protocol.providers.base import AudioFormat, FunctionTool, ProviderCommand, ProviderEvent

if TYPE_CHECKING:
    from mediaserver.config import Settings

__all__ = ["AgentOptions", "NowaitLink", "ProviderClosed", "ProviderLink"]


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
    """The provider's side of the session has ended (closed, failed or timed out)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
class NowaitLink(ProviderLink, Protocol):
    """A link that can also send from code that must not block (a reactor handler)."""

    @property
    def sends_nowait(self) -> bool:
        """Whether :meth:`send_nowait` may be used on this connection."""
        ...

    def send_nowait(self, command: ProviderCommand) -> bool:
        """Send without waiting: True if sent, False if queued (then :meth:`flush` must run)."""
        ...

    async def flush(self) -> None:
        """Write what :meth:`send_nowait` queued; raises :class:`ProviderClosed` if the session has ended."""
        ...
