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
between batches exactly as they do between task steps.  A handler takes at
most ``MESSAGES_PER_TURN`` messages per call and asks for another call in
the next batch (:meth:`Reactor.again`) for the rest: one read of 64 KiB can
hold thousands of small messages, and a peer that floods them would
otherwise hold every other call up for the whole read.

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
import socket
from collections.abc import Callable

import trio

__all__ = ["Reactor", "current_reactor", "reactor_stats"]

log = logging.getLogger("mediaserver.reactor")

MAX_EVENTS = 1024  # sockets handled per batch; the rest wait for the next one
# Messages a handler takes per call; it asks for the next batch (Reactor.again) for the rest.  A message costs
# a handler from 1 µs (a caller frame's parse) to ~15 µs (json.loads of an unusual one, a frame's send; see
# bench/frame_path.py), so a turn is 2 ms at most, while a call's usual read holds 1-3 messages.
MESSAGES_PER_TURN = 128


class Reactor:
    """A level-triggered epoll set of sockets whose handlers run in one Trio task."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._on_error: dict[int, Callable[[Exception], None]] = {}
        self._again: set[int] = set()  # handlers to call in the next batch, readable or not
        # again() from outside the loop (a task's own first call of its handler) while the loop waits: a byte
        # on this pair wakes it.  (Its read end is in the epoll set, not in the handlers.)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._waiting = False  # the loop is blocked in its wait
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

    def again(self, fd: int) -> None:
        """Call ``fd``'s handler in the next batch even if no new data arrives (it left messages for later).

        A handler that stops after ``MESSAGES_PER_TURN`` messages, with more
        already read, asks for this: one peer's flood of small messages is
        then taken in turns with every other socket, rather than in one step
        that delays them all.
        """
        self._again.add(fd)
        if self._waiting:
            self._waiting = False
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:  # pragma: no cover - bytes already wait there: it wakes anyway
                pass

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (idempotent); call it before the socket is closed."""
        self._on_error.pop(fd, None)
        self._again.discard(fd)
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # the fd, or the reactor (its run is over), is closed already
                pass

    def __len__(self) -> int:
        return len(self._handlers)

    async def run(self) -> None:
        """Dispatch readiness until cancelled."""
        epoll, handlers, wake = self._epoll, self._handlers, self._wake_r.fileno()
        try:
            while True:
                if self._again:  # (a checkpoint: every other task, and every readable socket, gets its turn first)
                    await trio.lowlevel.checkpoint()
                    again, self._again = self._again, set()
                    ready = epoll.poll(0, MAX_EVENTS)
                    ready += [(fd, select.EPOLLIN) for fd in again.difference(fd for fd, _ in ready)]
                else:
                    self._waiting = True
                    await trio.lowlevel.wait_readable(epoll)
                    self._waiting = False
                    ready = epoll.poll(0, MAX_EVENTS)
                self.batches += 1
                self.calls += len(ready)
                for fd, _ in ready:
                    handler = handlers.get(fd)  # None: removed by an earlier handler of this batch
                    if handler is None:
                        if fd == wake:
                            self._drain_wake()
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
            self._waiting = False
            epoll.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass


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
