"""Connections opened before the rest of kvmctl is imported.

A command that talks to hypervisors spends its first few hundred milliseconds importing the
pipeline (jinja2, jsonschema, the planners); an ssh or TLS handshake takes as long. So the CLI
names the URIs it will need as soon as it knows them (`connect_soon`), each handshake runs in a
thread of its own while the imports go on, and `Hypervisor(uri)` takes the finished connection
(`take`) instead of opening another. A connection nobody takes is closed at exit.

A command that reads a host without locking it first (`plan`) also asks for the read at once
(`connect_soon(..., read=True)`): the thread goes on from the handshake to reading every object
(`HostReader.read`), and the Hypervisor's first read takes that result (`take_read`). The read
then overlaps the imports as well as the loading of the manifests.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import libvirt

from .connection import silence_default_handler

if TYPE_CHECKING:
    from .state import LiveState

_pending: dict[str, Future[Any]] = {}
_reads: dict[str, tuple[Any, Future[LiveState]]] = {}  # uri -> (its connection, its read)
# The threads, joined once their work is taken or at exit: a thread still winding down in C
# (libvirt's per-thread error, glibc's thread cache) while the interpreter finalizes is a race
# that once ended a process with SIGABRT ("tcache_thread_shutdown: unaligned tcache chunk").
_threads: dict[str, threading.Thread] = {}
_lock = threading.Lock()


def connect_soon(uris: list[str], read: bool = False) -> None:
    """Start opening a connection to each URI (once per URI), in the background; with `read`,
    then reading that host on it."""
    silence_default_handler()
    for uri in uris:
        with _lock:
            if uri in _pending:
                continue
            future: Future[Any] = Future()
            _pending[uri] = future
            reading: Future[LiveState] | None = Future() if read else None
            thread = threading.Thread(target=_open, args=(uri, future, reading), daemon=True,
                                      name="kvmctl-connect")
            _threads[uri] = thread
        thread.start()


def _open(uri: str, future: Future[Any], reading: Future[LiveState] | None) -> None:
    try:
        conn = libvirt.open(uri)
    except BaseException as exc:  # handed to whoever takes it, as libvirt.open would raise
        future.set_exception(exc)
        if reading is not None:
            reading.set_exception(exc)
        return
    if reading is not None:
        with _lock:
            _reads[uri] = (conn, reading)
    future.set_result(conn)
    if reading is not None:
        try:
            from .reading import HostReader
            reader = HostReader()
            reader.conn = conn
            reading.set_result(reader.read())
        except BaseException as exc:  # raised again by the read that takes it
            reading.set_exception(exc)


def take_read(uri: str, conn: Any) -> LiveState | None:
    """The read started for `uri` on its connection `conn` (waiting for it), or None if none
    was, or it was made on another connection; raises what the read raised. Only the first
    caller gets it."""
    with _lock:
        started = _reads.get(uri)
        if started is None or started[0] is not conn:
            return None
        del _reads[uri]
    try:
        return started[1].result()
    finally:
        _join(uri)


def take(uri: str) -> Any | None:
    """The connection started for `uri` (waiting for it), or None if none was; raises what
    libvirt.open raised."""
    with _lock:
        future = _pending.pop(uri, None)
    if future is None:
        return None
    if future.exception() is not None:
        _join(uri)  # it failed: its thread is ending; let it end before anything else does
    return future.result()


def _join(uri: str, timeout: float = 5.0) -> None:
    with _lock:
        thread = _threads.pop(uri, None)
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


@atexit.register
def _close_untaken() -> None:
    with _lock:
        left = list(_pending.values())
        _pending.clear()
    for future in left:
        if future.done() and future.exception() is None:
            with contextlib.suppress(libvirt.libvirtError):
                future.result().close()
    with _lock:
        uris = [u for u, t in _threads.items() if not t.is_alive() or u not in _reads]
    for uri in uris:  # ended, or ending; a read still running on a live host is not waited for
        _join(uri, 2.0)
