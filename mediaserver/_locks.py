"""Taking a Trio lock on the per-frame path without a needless scheduler trip."""

from __future__ import annotations

import trio

__all__ = ["acquire"]


async def acquire(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """Take ``lock``: at once when it is free, else wait for it in order.

    ``async with lock`` (``Lock.acquire``) always passes through the
    scheduler, even for a free lock; on a path that sends ~150 messages per
    second per call that checkpoint is measurable (bench/load.py).  Fairness
    is kept: Trio hands a released lock straight to the next waiter, so a
    lock with waiters is never free for ``acquire_nowait``.  Release with
    ``lock.release()`` in a ``finally``.
    """
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
