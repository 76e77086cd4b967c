"""Run the app on Hypercorn's Trio worker, with graceful draining of calls."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from mediaserver.app import create_app
from mediaserver.bridge.registry import CallManager
from mediaserver.config import Settings
from mediaserver.protocol.twilio import DEFAULT_MAX_MESSAGE_BYTES
from mediaserver.records.recorder import Recorder, open_recorder

__all__ = ["hypercorn_config", "serve", "wait_for_signal"]

log = logging.getLogger("mediaserver")


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    # graceful shutdown: stop accepting, let live calls run this long, then cancel them
    config.graceful_timeout = settings.drain_s
    config.websocket_max_message_size = DEFAULT_MAX_MESSAGE_BYTES
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM: the default shutdown trigger."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: draining calls (up to the drain limit), then stopping", signal.Signals(signum).name)
            return


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (default: SIGINT/SIGTERM); reports the bound URLs.

    Shutdown is hypercorn's: stop accepting, give live calls ``drain_s`` to
    finish, cancel the rest; then the pre-opened model sessions are closed.
    Cancelling the caller's scope stops everything at once.  Call records
    (mediaserver.records) are opened first and closed last, after the
    records of the calls that were drained have been written.
    """
    if shutdown_trigger is None:
        shutdown_trigger = wait_for_signal
    async with open_recorder(settings) as recorder:
        await _serve(settings, shutdown_trigger, recorder, task_status)


async def _serve(
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[object]],
    recorder: Recorder | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    calls = CallManager(settings, recorder=recorder)
    app = create_app(settings, calls)
    config = hypercorn_config(settings)

    async with trio.open_nursery() as nursery:

        async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
            # hypercorn returns after draining live calls; end pre-opened sessions too
            nursery.cancel_scope.cancel()

        await nursery.start(calls.run)
        binds: list[str] = await nursery.start(serve_http)
        task_status.started(binds)
