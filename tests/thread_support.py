"""Threads for the tests that race things against each other (the lock tests, unit and
integration): every thread started before any is joined."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(target: Callable[[int], None], n: int) -> None:
    """target(0)..target(n - 1), each in a thread of its own, all started before any is
    joined; returns when all are done."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
