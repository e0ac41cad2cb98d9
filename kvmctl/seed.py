"""cloud-init NoCloud seed images, built in-process.

The seed is an ISO 9660 image labelled ``cidata`` holding ``user-data``,
``meta-data`` and optionally ``network-config``.  The exact, hyphenated names
are carried by Rock Ridge (what Linux's isofs shows by default) and Joliet; the
plain ISO 9660 level 1 names (``USERDATA.;1`` ...) are only a fallback.

The module is pure: no libvirt, no output, no filesystem writes.  Builds are
deterministic, so hashing the image bytes is a stable change detector.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import yaml

from kvmctl.errors import KvmctlError

__all__ = [
    "SeedContent",
    "SeedError",
    "build_seed_iso",
    "meta_data_text",
    "seed_content",
]

VOLUME_LABEL: Final = "cidata"
CLOUD_CONFIG_HEADER: Final = "#cloud-config"
SEED_EPOCH: Final = 946684800.0  # 2000-01-01T00:00:00Z: every timestamp in the image
_FILE_MODE: Final = 0o100444  # regular file, r--r--r--
_DIGEST_VERSION: Final = "kvmctl.seed/1"

# (Rock Ridge / Joliet name, ISO 9660 level 1 name)
_USER_DATA: Final = ("user-data", "USERDATA.;1")
_META_DATA: Final = ("meta-data", "METADATA.;1")
_NETWORK_CONFIG: Final = ("network-config", "NETWORKC.;1")


class SeedError(KvmctlError):
    """Invalid seed input (user-data, network-config, keys, hostname)."""


@dataclass(frozen=True)
class SeedContent:
    """Everything that ends up in a seed image, in its final text form."""

    instance_id: str
    hostname: str | None
    user_data: str
    network_config: str | None

    def digest(self) -> str:
        """sha256 hex over a canonical serialization of all fields."""
        return _sha256_json({"v": _DIGEST_VERSION, **asdict(self)})


# --------------------------------------------------------------------------- content


def seed_content(
    vm_name: str,
    hostname: str | None,
    user_data: str | dict[str, Any] | None,
    network_config: str | dict[str, Any] | None,
    ssh_authorized_keys: list[str],
    instance_id: str | None = None,
) -> SeedContent:
    """Assemble the final seed texts, merging keys and hostname into cloud-config.

    The default instance-id embeds a hash of the content, so any change to it
    makes cloud-init treat the VM as a new instance and run again.
    """
    if hostname is not None and not hostname:
        raise SeedError("hostname must not be empty")
    keys = _normalize_keys(ssh_authorized_keys)
    user_text = _render_user_data(user_data, keys, hostname)
    network_text = _render_network_config(network_config)
    if instance_id is None:
        instance_id = _default_instance_id(vm_name, user_text, network_text, hostname)
    elif not instance_id:
        raise SeedError("instance_id must not be empty")
    return SeedContent(instance_id, hostname, user_text, network_text)


def meta_data_text(c: SeedContent) -> str:
    """The NoCloud meta-data document, as YAML that parses back to the same strings."""
    meta: dict[str, str] = {"instance-id": c.instance_id}
    if c.hostname is not None:
        meta["local-hostname"] = c.hostname
    return _yaml_dump(meta)


def _normalize_keys(keys: list[str]) -> list[str]:
    normalized = [key.strip() for key in keys]
    if any(not key for key in normalized):
        raise SeedError("sshAuthorizedKeys entries must not be empty")
    return normalized


def _render_user_data(
    user_data: str | dict[str, Any] | None, keys: list[str], hostname: str | None
) -> str:
    merge_needed = bool(keys) or hostname is not None
    if isinstance(user_data, str):
        if not merge_needed:
            return user_data
        if not _is_cloud_config(user_data):
            raise SeedError(
                "sshAuthorizedKeys/hostname can only be merged into #cloud-config user data"
            )
        config = _parse_cloud_config(user_data)
    elif user_data is None:
        config = {}
    elif isinstance(user_data, Mapping):
        config = copy.deepcopy(dict(user_data))
    else:
        raise SeedError(f"user data must be a string or a mapping, not {type(user_data).__name__}")
    return f"{CLOUD_CONFIG_HEADER}\n{_yaml_dump(_merge(config, keys, hostname))}"


def _is_cloud_config(text: str) -> bool:
    return text.startswith(CLOUD_CONFIG_HEADER)


def _parse_cloud_config(text: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SeedError(f"user data is not valid #cloud-config YAML: {exc}") from exc
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SeedError("#cloud-config user data must be a YAML mapping")
    return config


def _merge(config: dict[str, Any], keys: list[str], hostname: str | None) -> dict[str, Any]:
    """Append keys (deduplicated, order kept) and set hostname if absent; mutates config."""
    if keys:
        existing = config.get("ssh_authorized_keys") or []
        if isinstance(existing, str):
            existing = [existing]
        if not isinstance(existing, list):
            raise SeedError("ssh_authorized_keys in user data must be a list")
        config["ssh_authorized_keys"] = list(dict.fromkeys([*existing, *keys]))
    if hostname is not None and config.get("hostname") is None:
        config["hostname"] = hostname
    return config


def _render_network_config(network_config: str | dict[str, Any] | None) -> str | None:
    if network_config is None or isinstance(network_config, str):
        return network_config
    if isinstance(network_config, Mapping):
        return _yaml_dump(dict(network_config))
    raise SeedError(
        f"network config must be a string or a mapping, not {type(network_config).__name__}"
    )


def _default_instance_id(
    vm_name: str, user_data: str, network_config: str | None, hostname: str | None
) -> str:
    if not vm_name:
        raise SeedError("vm_name must not be empty")
    return f"{vm_name}-{_sha256_json([user_data, network_config, hostname])[:12]}"


def _yaml_dump(data: Any) -> str:
    try:
        return yaml.safe_dump(
            data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=2**16
        )
    except yaml.YAMLError as exc:
        raise SeedError(f"cannot serialize to YAML: {exc}") from exc


def _sha256_json(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- ISO image


def build_seed_iso(c: SeedContent) -> bytes:
    """The seed as ISO 9660 + Rock Ridge + Joliet bytes; same content, same bytes."""
    files = [(_USER_DATA, c.user_data), (_META_DATA, meta_data_text(c))]
    if c.network_config is not None:
        files.append((_NETWORK_CONFIG, c.network_config))
    payloads = [(names, _encode(names[0], text)) for names, text in files]
    import pycdlib  # noqa: F401  (imported only when a seed is built; _fixed_clock patches it)
    with _fixed_clock():
        return _master_iso(payloads)


def _encode(name: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SeedError(f"{name} is not encodable as UTF-8: {exc}") from exc


def _master_iso(payloads: list[tuple[tuple[str, str], bytes]]) -> bytes:
    import pycdlib
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for (long_name, iso_name), data in payloads:
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=f"/{iso_name}",
                rr_name=long_name,
                joliet_path=f"/{long_name}",
                file_mode=_FILE_MODE,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


# pycdlib stamps time.time() (rendered with time.localtime) into the volume
# descriptors, every directory record and every Rock Ridge TF entry, and offers
# no parameter for it; the volume modification date is even stamped while
# writing.  So while mastering, the `time` module that pycdlib's own modules
# see is swapped for one whose clock is SEED_EPOCH in UTC.  The swap only
# affects the thread holding the lock: other threads keep the real clock.
_clock_lock = threading.Lock()
_clock_owner: int | None = None


class _SeedClock(types.ModuleType):
    """Stand-in for the `time` module inside pycdlib."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return SEED_EPOCH if _owns_clock() else time.time()

    @staticmethod
    def localtime(secs: float | None = None) -> time.struct_time:
        if not _owns_clock():
            return time.localtime(secs)
        return time.gmtime(SEED_EPOCH if secs is None else secs)


_SEED_CLOCK: Final = _SeedClock()


def _owns_clock() -> bool:
    return _clock_owner == threading.get_ident()


def _pycdlib_modules() -> list[types.ModuleType]:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None
        and (name == "pycdlib" or name.startswith("pycdlib."))
        and getattr(module, "time", None) is time
    ]


@contextlib.contextmanager
def _fixed_clock() -> Iterator[None]:
    global _clock_owner
    with _clock_lock:
        patched = _pycdlib_modules()
        _clock_owner = threading.get_ident()
        for module in patched:
            setattr(module, "time", _SEED_CLOCK)
        try:
            yield
        finally:
            for module in patched:
                setattr(module, "time", time)
            _clock_owner = None
