"""Open the model session a call is bridged to, from the settings.

``echo`` runs in process; every network provider has an adapter module,
``mediaserver.adapters.<provider>``, imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mediaserver.agents.echo import EchoLink
from mediaserver.bridge.link import AgentOptions, ProviderLink
from mediaserver.config import PROVIDERS, Settings

__all__ = ["open_link"]


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions | None = None) -> AsyncIterator[ProviderLink]:
    """Connect to the configured provider; leaving the block closes it."""
    agent = agent or AgentOptions.from_settings(settings)
    if settings.provider == "echo":
        link = EchoLink()
        try:
            yield link
        finally:
            link.close()
        return
    if settings.provider not in PROVIDERS:  # Settings.validated() prevents this
        raise ValueError(f"unknown provider {settings.provider!r}")
    adapter = importlib.import_module(f"mediaserver.adapters.{settings.provider}")
    async with adapter.open_link(settings, agent) as provider_link:
        yield provider_link
