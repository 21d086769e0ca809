"""A bound on every stop: a process told to stop exits within STOP_GRACE_S, whatever hangs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Final

from sardis_ledger.streams.worker_process import STOP_GRACE_S

log = logging.getLogger("sardis.shutdown")

# EX_TEMPFAIL: stopped by the deadline, not cleanly; restarting is safe (open transactions abort).
EXIT_STOP_DEADLINE: Final[int] = 75

_armed = threading.Lock()


def arm_stop_deadline(what: str, grace_s: float = STOP_GRACE_S) -> None:
    """Exit the process `grace_s` after the first call unless it has exited by then.

    A thread, not a task: it fires even when the event loop is blocked or a library's stop path
    waits forever. Exiting without a goodbye is what kill -9 does, and every process here is
    built to survive that: Kafka aborts an open transaction when the next producer with its
    transactional id starts (or after the transaction timeout), PostgreSQL rolls back the open
    transaction, immudb never saw an unfinished one. Idempotent: later calls do nothing.
    """
    if not _armed.acquire(blocking=False):
        return

    def expire() -> None:
        log.error("%s: still stopping %.0f s after the stop signal; exiting now (open "
                  "transactions abort)", what, grace_s)
        logging.shutdown()
        os._exit(EXIT_STOP_DEADLINE)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True
    timer.start()


def stop_on_signals(what: str) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, which also arms the stop deadline (call in a loop)."""
    stop = asyncio.Event()

    def on_signal() -> None:
        arm_stop_deadline(what)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    return stop
