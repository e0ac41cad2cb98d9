"""libvirt's in-process test driver as the host of daemon-free tests of apply, get and readiness.

`test:///PATH` opens a private, empty host described by the node file at PATH: real libvirt
(define, start, shut down, autostart, vCPUs, memory, metadata, network updates, pools and volume
creation all run in it), isolated per connection. It does not implement a few calls kvmctl
makes; `DriverHypervisor` answers only those, from memory, and records them:
streams (upload into a volume, download from it: ownership records and seeds live in volumes),
volume resize, block resize, device hot-plug, DHCP leases. Everything else is libvirt's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kvmctl.errors import HypervisorError
from kvmctl.host.hypervisor import Hypervisor

EMPTY_NODE = "<node>\n</node>\n"


class MemoryLockStore:
    """The hypervisor lock's records for one test-driver host (apply.hostlock.LeaseBackend)."""

    _by_host: dict[str, MemoryLockStore] = {}

    def __init__(self, host: str) -> None:
        self.host = host
        self.records: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, host: str) -> MemoryLockStore:
        return cls._by_host.setdefault(host, cls(host))

    def create(self, name: str, data: bytes) -> bool:
        with self._lock:
            if name in self.records:
                return False
            self.records[name] = data
            return True

    def read(self, name: str) -> bytes | None:
        with self._lock:
            return self.records.get(name)

    def write(self, name: str, data: bytes,
              only_if: Callable[[bytes], bool] | None = None) -> bool:
        with self._lock:
            if name not in self.records or (only_if and not only_if(self.records[name])):
                return False
            self.records[name] = data
            return True

    def delete(self, name: str) -> bool:
        with self._lock:
            return self.records.pop(name, None) is not None


class DriverHypervisor(Hypervisor):
    """A Hypervisor on the test driver; what the driver lacks is kept in `calls` and `volumes`."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.leases: dict[str, list[dict[str, Any]]] = {}  # network -> what DHCPLeases gives
        self.calls: list[tuple[Any, ...]] = []
        self.contents: dict[tuple[str, str], bytes] = {}

    def close(self) -> None:
        """Kept open: every command of a test shares this connection (a second test-driver
        connection would be a second, empty host)."""

    def lock_store(self) -> MemoryLockStore:  # type: ignore[override]
        # libvirt's test driver has no volume streams: the project lock lives in memory here.
        return MemoryLockStore.of(self.uri)

    def upload(self, pool: str, name: str, chunks: Iterator[bytes], length: int) -> None:
        self._vol(pool, name)  # the volume must exist, as for libvirt
        self.contents[(pool, name)] = b"".join(chunks)[:length]
        self.calls.append(("upload", pool, name, length))

    def _download(self, vol: Any) -> bytes:
        return self.contents.get((vol.storagePoolLookupByVolume().name(), vol.name()), b"")

    def resize_volume(self, pool: str, name: str, size_bytes: int) -> None:
        self._vol(pool, name)
        self.calls.append(("resize_volume", pool, name, size_bytes))

    def block_resize(self, name: str, target: str, size_bytes: int) -> None:
        self._dom(name)
        self.calls.append(("block_resize", name, target, size_bytes))

    def attach_device_live(self, name: str, xml: str) -> None:
        self._dom(name)
        self.calls.append(("attach_device_live", name, xml))

    def detach_device_live(self, name: str, xml: str) -> None:
        self._dom(name)
        self.calls.append(("detach_device_live", name, xml))

    def update_device_live(self, name: str, xml: str) -> None:
        self._dom(name)
        self.calls.append(("update_device_live", name, xml))

    def dhcp_leases(self, network: str) -> list[dict[str, Any]]:
        self._net(network)
        return list(self.leases.get(network, []))


def install(monkeypatch: Any, folder: Path,
            kind: type[DriverHypervisor] = DriverHypervisor) -> tuple[DriverHypervisor, str]:
    """A new test-driver host that every Session of the test shares (a second test-driver
    connection would be a second, empty host), with the CLI's environment made neutral."""
    for name in ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE", "KVMCTL_CONNECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KVMCTL_NO_CACHE", "1")
    monkeypatch.setattr("kvmctl.apply.lock.LOCK_DIR", str(folder / "locks"))
    uri = node_uri(folder)
    hv = kind(uri)
    monkeypatch.setattr("kvmctl.engine.Hypervisor", lambda _uri: hv)
    return hv, uri


def install_hosts(monkeypatch: Any, folder: Path, names: Sequence[str],
                  kinds: Mapping[str, type[DriverHypervisor]] | None = None
                  ) -> dict[str, tuple[DriverHypervisor, str]]:
    """Several test-driver hosts, each with its own node file (`folder/NAME/node.xml`), and
    kvmctl.engine.Hypervisor replaced by a factory that gives every URI its host. A URI of no
    host fails as Hypervisor's does (HypervisorError "cannot connect to URI: ..."): an
    unreachable host. `kinds`: a DriverHypervisor subclass for some hosts."""
    for name in ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE", "KVMCTL_CONNECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KVMCTL_NO_CACHE", "1")
    monkeypatch.setattr("kvmctl.apply.lock.LOCK_DIR", str(folder / "locks"))
    hosts: dict[str, tuple[DriverHypervisor, str]] = {}
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        uri = node_uri(folder / name)
        hosts[name] = ((kinds or {}).get(name, DriverHypervisor)(uri), uri)
    by_uri = {uri: hv for hv, uri in hosts.values()}

    def connect(uri: str) -> DriverHypervisor:
        if uri not in by_uri:
            raise HypervisorError(f"cannot connect to {uri}: no test-driver host there")
        return by_uri[uri]

    monkeypatch.setattr("kvmctl.engine.Hypervisor", connect)
    return hosts


def node_uri(folder: Path) -> str:
    """The URI of a new, empty test-driver host (a node file in `folder`)."""
    node = folder / "node.xml"
    node.write_text(EMPTY_NODE, encoding="utf-8")
    return f"test://{node}"


def write_manifests(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path
