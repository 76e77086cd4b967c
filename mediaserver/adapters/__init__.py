"""One small module per network provider: settings -> an open provider link.

Each ``mediaserver.adapters.<provider>`` module defines::

    @asynccontextmanager
    async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]: ...

It builds the provider's sans-I/O core (``mediaserver.protocol.providers``)
from the settings and the per-call :class:`~mediaserver.bridge.link.AgentOptions`
(instructions, greeting, tools) and connects it with
:func:`mediaserver.transport.provider_ws.open_provider_link`.  The module is
imported only when its provider is chosen, so an unused provider costs
nothing at start.
"""
