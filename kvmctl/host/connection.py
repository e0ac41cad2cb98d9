"""The libvirt connection's shared helpers: errors wrapped into HypervisorError, domain
states, reading lists whose members may vanish meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt

from ..errors import HypervisorError

T = TypeVar("T")
STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
           libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
           libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
           libvirt.VIR_DOMAIN_BLOCKED: "running"}
_libvirt_quiet = threading.Lock()


def silence_default_handler() -> None:
    # libvirt prints every error to stderr by default; we report them ourselves.
    with _libvirt_quiet:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def call(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"{what}: {exc.get_error_message() or exc}") from None


def send_all(stream: Any, data: bytes | memoryview, what: str) -> None:
    """All of `data` into a libvirt stream: a send may take less than it is given."""
    while data:
        sent = call(what, stream.send, bytes(data))
        if sent < 0:
            raise HypervisorError(f"{what}: the stream answered {sent}")
        data = memoryview(data)[sent:]


VANISHED = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK,
             libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL}


def each_listed(read: Callable[[Any], T], objects: list[Any]) -> Iterator[T]:
    """Read every listed object, skipping those deleted by someone else in the meantime."""
    for obj in objects:
        try:
            yield read(obj)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in VANISHED:
                continue
            raise HypervisorError(f"read {obj.name()}: {exc.get_error_message()}") from None
        except HypervisorError:
            if not _exists(obj):
                continue
            raise


def _exists(obj: Any) -> bool:
    try:
        obj.XMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False
