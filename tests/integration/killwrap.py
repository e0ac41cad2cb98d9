"""Run the kvmctl CLI with every host change counted, and SIGKILL it at one step boundary.

    python killwrap.py LOG KILL kvmctl-argument...

Every public method of ``kvmctl.host.hypervisor.Hypervisor`` that changes the host is wrapped
(all but the reads below, so a new one is counted without being listed here), and so are the
calls ``write_record`` makes inside (``create_volume``, ``upload``, ``delete_volume``: public
methods too). A *change* is a wrapped call inside which no other wrapped call ran (a leaf):
``write_record`` itself is not one, its inner calls are.

KILL is ``none`` (count only: a dry run), ``before:1`` (SIGKILL right before the first change),
``after:K`` (SIGKILL right after the K-th change returned, or raised) or ``after-call:METHOD``
(SIGKILL right after the first successful call of that method, e.g. ``define_domain``).
LOG gets one JSON line per change as it ends:
``[k, method, "pool/volume" or name, "ok" | "failed"]``, written before any kill, so a dry
run's LOG lists every boundary of a full apply.

Run with ``--parallelism 1``: the K-th change is then the same one in every run.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from kvmctl.host.hypervisor import Hypervisor

# Public methods of Hypervisor that only read (HostReader's are not Hypervisor's own).
READS = frozenset({"close", "lock_store", "volume_capacity_bytes", "volume_names"})


def changing_methods() -> list[str]:
    return sorted(name for name, value in vars(Hypervisor).items()
                  if callable(value) and not name.startswith("_") and name not in READS)


class Boundaries:
    def __init__(self, log: str, kill: str) -> None:
        self.fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.when, _, k = kill.partition(":")
        self.method = k if self.when == "after-call" else ""
        self.k = int(k) if k and not self.method else 0
        self.done = 0
        self.started = 0
        self.lock = threading.Lock()
        self.local = threading.local()

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def counted(hv: Hypervisor, *args: Any, **kwargs: Any) -> Any:
            stack = self.local.__dict__.setdefault("stack", [])  # per thread: [has inner call]
            if stack:
                stack[-1] = True
            stack.append(False)
            with self.lock:
                self.started += 1
                if self.when == "before" and self.started == self.k:
                    self.die()
            outcome = "failed"
            try:
                result = method(hv, *args, **kwargs)
                outcome = "ok"
                return result
            finally:
                if not stack.pop():  # a leaf: one change of the host
                    with self.lock:
                        self.done += 1
                        os.write(self.fd, (json.dumps([self.done, name, _names(args), outcome])
                                           + "\n").encode())
                        if self.when == "after" and self.done == self.k:
                            self.die()
                        if self.when == "after-call" and name == self.method and outcome == "ok":
                            self.die()
        return counted


def _names(args: tuple[Any, ...]) -> str:
    """The call's leading name arguments (pool/volume, domain, network): not XML or sizes."""
    names = []
    for arg in args[:2]:
        if not isinstance(arg, str) or "<" in arg:
            break
        names.append(arg)
    return "/".join(names)


def main(argv: list[str]) -> int:
    log, kill, *rest = argv
    boundaries = Boundaries(log, kill)
    for name in changing_methods():
        setattr(Hypervisor, name, boundaries.wrap(name, getattr(Hypervisor, name)))
    from kvmctl.cli.main import main as cli_main
    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
