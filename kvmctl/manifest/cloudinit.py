"""cloud-init NoCloud seed content: the final texts of a VM's seed, from its manifest.

Pure: no libvirt, no output, no files. `validate` builds the content to check it, rendering
and planning use it, and render/iso.py turns it into the ISO image; the same content always
has the same digest.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from ..errors import KvmctlError
from ..kinds import Kind
from ..lazy import lazy_module
from .documents import MAX_DEPTH, node_too_large
from .model import Disk, ManifestSet, VirtualMachine

if TYPE_CHECKING:
    import yaml
else:
    yaml = lazy_module("yaml")  # only user data needs it

__all__ = ["SeedContent", "SeedError", "meta_data_text", "seed_content", "seed_content_of",
           "seed_pool"]

CLOUD_CONFIG_HEADER: Final = "#cloud-config"
_DIGEST_VERSION: Final = "kvmctl.seed/1"


class SeedError(KvmctlError):
    """Invalid seed input (user-data, network-config, keys, hostname); `field` names the
    cloudInit field at fault (`userData`), when there is one."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


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


class _TooDeep(Exception):
    pass


@lru_cache(maxsize=1)
def _depth_limited_loader() -> type[yaml.SafeLoader]:
    """PyYAML's safe loader (what cloud-init reads user data with) that stops composing past
    MAX_DEPTH levels, before its recursion (and its scanner, quadratic in flow nesting) goes
    any deeper. Made when first needed: PyYAML loads only then (kvmctl/lazy.py)."""

    class DepthLimitedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH + 1:
                    raise _TooDeep
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return DepthLimitedLoader


def _parse_cloud_config(text: str) -> dict[str, Any]:
    """The #cloud-config mapping of a user-data string, read as cloud-init reads it (PyYAML's
    safe loader), within the limits of a manifest document (nesting, values, expanded size):
    composed first, checked, then constructed, so that no shape of text can exhaust the stack
    (the composer recurses per level) or the clock."""
    try:
        node = yaml.compose(text, Loader=_depth_limited_loader())
    except yaml.YAMLError as exc:
        raise SeedError(f"user data is not valid #cloud-config YAML: {exc}", "userData"
                        ) from None
    except (_TooDeep, RecursionError):
        raise SeedError(f"#cloud-config user data is nested more than {MAX_DEPTH} levels deep",
                        "userData") from None
    if node is None:
        return {}
    too_large = node_too_large(node)
    if too_large:
        raise SeedError(f"#cloud-config user data is too large: {too_large}", "userData")
    try:
        config = yaml.constructor.SafeConstructor().construct_document(node)
    except Exception as exc:  # noqa: BLE001 (any constructor failure is bad user data)
        # PyYAML's constructors fail in many ways on explicit tags with values they do not take
        # (`!!bool maybe`: KeyError, `!!timestamp foo`: AttributeError, `!!int ""`: IndexError,
        # 2024-13-45: ValueError); each is user data that is not valid YAML.
        raise SeedError(f"user data is not valid #cloud-config YAML: {exc}", "userData"
                        ) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SeedError("#cloud-config user data must be a YAML mapping", "userData")
    return config


def _merge(config: dict[str, Any], keys: list[str], hostname: str | None) -> dict[str, Any]:
    """Append keys (deduplicated, order kept) and set hostname if absent; mutates config."""
    if keys:
        existing = config.get("ssh_authorized_keys") or []
        if isinstance(existing, str):
            existing = [existing]
        if not isinstance(existing, list):
            raise SeedError("ssh_authorized_keys in user data must be a list of strings, "
                            f"not a {_shape(existing)}", "userData")
        for position, item in enumerate(existing):
            if not isinstance(item, str):
                raise SeedError(f"ssh_authorized_keys in user data must be a list of strings: "
                                f"item {position + 1} is a {_shape(item)}", "userData")
        config["ssh_authorized_keys"] = list(dict.fromkeys([*existing, *keys]))
    if hostname is not None and config.get("hostname") is None:
        config["hostname"] = hostname
    return config


def _shape(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    if value is None or isinstance(value, bool):
        return "null" if value is None else "boolean"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


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


def seed_pool(vm: VirtualMachine, m: ManifestSet) -> str | None:
    """Where a VM's cloud-init seed lives: the pool of its first disk, else the first pool."""
    for att in vm.disks:
        disk = m.find(Kind.DISK, att.disk)
        if isinstance(disk, Disk):
            return disk.pool
    return m.pools[0].meta.name if m.pools else None


# Seed content by (VM name, repr of its cloudInit): `validate` builds it to check it and
# rendering builds it again, and serializing user-data is the slowest step of both. Equal reprs
# of plain YAML values mean equal values in the same key order, hence the same content.
_SEED_CACHE: dict[tuple[str, str], SeedContent] = {}
_SEED_CACHE_SIZE = 4096


def seed_content_of(vm: VirtualMachine) -> SeedContent:
    """The cloud-init seed content of `vm` (which must have cloudInit); raises SeedError."""
    ci = vm.cloud_init
    assert ci is not None
    key = (vm.meta.name, repr(ci))
    content = _SEED_CACHE.get(key)
    if content is None:
        content = seed_content(vm.meta.name, ci.hostname, ci.user_data, ci.network_config,
                               list(ci.ssh_authorized_keys), ci.instance_id)
        if len(_SEED_CACHE) >= _SEED_CACHE_SIZE:
            _SEED_CACHE.clear()
        _SEED_CACHE[key] = content
    return content
