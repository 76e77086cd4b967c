"""One readiness loop for every call's sockets: a message costs a callback, not a task wake-up.

A call's uplink is ~50 messages a second.  Served by a Trio task per call,
each message costs a full trip through Trio's machinery: the socket is
re-armed in Trio's epoll (``EPOLLONESHOT``), the readiness event is
dispatched, the task rescheduled, and its coroutine resumed through every
``await`` between the wait and the bridge.  With a few hundred calls that is
the larger part of the server's CPU.

:class:`Reactor` keeps its own level-triggered ``epoll`` set, in which each
registered socket stays registered for its whole call, and one Trio task
(a system task of the run, started on first use) waits for *that* epoll to
become readable.  When it does, one non-blocking ``poll`` returns every
ready socket and the reactor calls each socket's handler, a plain function,
in turn; then it waits again, which is a Trio checkpoint, so other tasks run
between batches exactly as they do between task steps.

Handlers run in the reactor's task: they must not block and should not
raise.  One that does is dropped (one broken call cannot stop the loop); the
exception is logged and passed to the registration's ``on_error``, so the
task that registered the socket learns of it rather than waiting forever.  A handler that needs to await something hands off
to a task of its own (the bridge wakes its call's reader task).  Register
with :meth:`Reactor.add` and always :meth:`Reactor.remove` before the
socket is closed (a ``finally``).
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable

import trio

__all__ = ["Reactor", "current_reactor", "reactor_stats"]

log = logging.getLogger("mediaserver.reactor")

MAX_EVENTS = 1024  # sockets handled per batch; the rest wait for the next one


class Reactor:
    """A level-triggered epoll set of sockets whose handlers run in one Trio task."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._on_error: dict[int, Callable[[Exception], None]] = {}
        self.batches = 0  # how many times the loop woke (tests and benches read these)
        self.calls = 0

    def add(self, fd: int, handler: Callable[[], None], on_error: Callable[[Exception], None] | None = None) -> None:
        """Call ``handler()`` (in the reactor's task) whenever ``fd`` is readable, until :meth:`remove`.

        If ``handler`` raises, it is removed and ``on_error(exception)`` is called.
        """
        if fd in self._handlers:
            raise ValueError(f"fd {fd} is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = handler
        if on_error is not None:
            self._on_error[fd] = on_error

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (idempotent); call it before the socket is closed."""
        self._on_error.pop(fd, None)
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # the fd, or the reactor (its run is over), is closed already
                pass

    def __len__(self) -> int:
        return len(self._handlers)

    async def run(self) -> None:
        """Dispatch readiness until cancelled."""
        epoll, handlers = self._epoll, self._handlers
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                ready = epoll.poll(0, MAX_EVENTS)
                self.batches += 1
                self.calls += len(ready)
                for fd, _ in ready:
                    handler = handlers.get(fd)  # None: removed by an earlier handler of this batch
                    if handler is None:
                        continue
                    try:
                        handler()
                    except Exception as exc:
                        log.exception("reactor: the handler for fd %d failed; dropping it", fd)
                        on_error = self._on_error.get(fd)
                        self.remove(fd)
                        if on_error is not None:
                            try:
                                on_error(exc)
                            except Exception:  # pragma: no cover - a broken error callback
                                log.exception("reactor: the error callback for fd %d failed", fd)
        finally:
            epoll.close()


_REACTOR: trio.lowlevel.RunVar[Reactor] = trio.lowlevel.RunVar("mediaserver_reactor")


def reactor_stats() -> dict[str, int]:
    """This run's reactor counters (zeros before the first call used it): sockets now, wake-ups and handler calls so far."""
    try:
        reactor = _REACTOR.get()
    except LookupError:
        return {"sockets": 0, "wakeups": 0, "handler_calls": 0}
    return {"sockets": len(reactor), "wakeups": reactor.batches, "handler_calls": reactor.calls}


def current_reactor() -> Reactor:
    """This Trio run's reactor, started (as a system task) on first use."""
    try:
        return _REACTOR.get()
    except LookupError:
        reactor = Reactor()
        _REACTOR.set(reactor)
        trio.lowlevel.spawn_system_task(reactor.run, name="mediaserver.reactor")
        return reactor
