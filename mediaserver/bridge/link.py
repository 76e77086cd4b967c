"""The provider side of a call as the bridge sees it: a :class:`ProviderLink`.

A link is an open model session: commands go in with :meth:`send`, provider
events come out of :meth:`receive`.  A WebSocket provider's link is its
sans-I/O core (``mediaserver.protocol.providers``) plus a trio-websocket
connection (:mod:`mediaserver.transport.provider_ws`); the built-in echo
agent's link runs in process (:mod:`mediaserver.agents.echo`).  Links are
opened with ``async with``: leaving the block closes the session, so a call
that ends can never leave a model socket open.
"""

from __future__ import annotations

from typing import Protocol

from mediaserver.protocol.providers.base import AudioFormat, ProviderCommand, ProviderEvent

__all__ = ["ProviderClosed", "ProviderLink"]


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
