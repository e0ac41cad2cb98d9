"""Connections opened before the rest of kvmctl is imported.

A command that talks to hypervisors spends its first few hundred milliseconds importing the
pipeline (jinja2, jsonschema, the planners); an ssh or TLS handshake takes as long. So the CLI
names the URIs it will need as soon as it knows them (`connect_soon`), each handshake runs in a
thread of its own while the imports go on, and `Hypervisor(uri)` takes the finished connection
(`take`) instead of opening another. A connection nobody takes is closed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

import libvirt

from .connection import silence_default_handler

_pending: dict[str, Future[Any]] = {}
_lock = threading.Lock()


def connect_soon(uris: list[str]) -> None:
    """Start opening a connection to each URI (once per URI), in the background."""
    silence_default_handler()
    for uri in uris:
        with _lock:
            if uri in _pending:
                continue
            future: Future[Any] = Future()
            _pending[uri] = future
        threading.Thread(target=_open, args=(uri, future), daemon=True,
                         name="kvmctl-connect").start()


def _open(uri: str, future: Future[Any]) -> None:
    try:
        future.set_result(libvirt.open(uri))
    except BaseException as exc:  # handed to whoever takes it, as libvirt.open would raise
        future.set_exception(exc)


def take(uri: str) -> Any | None:
    """The connection started for `uri` (waiting for it), or None if none was; raises what
    libvirt.open raised."""
    with _lock:
        future = _pending.pop(uri, None)
    return None if future is None else future.result()


@atexit.register
def _close_untaken() -> None:
    with _lock:
        left = list(_pending.values())
        _pending.clear()
    for future in left:
        if future.done() and future.exception() is None:
            with contextlib.suppress(libvirt.libvirtError):
                future.result().close()
