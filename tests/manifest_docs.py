"""Manifest documents for tests, as plain dicts: one builder per kind, shared by every suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

API = "kvmctl/v1"


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


def pool(name: str, path: Path | str, **spec: Any) -> dict[str, Any]:
    return doc("StoragePool", name, {"path": str(path), **spec})


def image(name: str, pool_name: str, **spec: Any) -> dict[str, Any]:
    return doc("Image", name, {"pool": pool_name, **spec})


def disk(name: str, pool_name: str, size: str = "8MiB", **spec: Any) -> dict[str, Any]:
    return doc("Disk", name, {"pool": pool_name, "size": size, **spec})


def changes_by_ref(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The changes of a plan's JSON by KIND/NAME."""
    return {f"{c['kind']}/{c['name']}": c for c in plan["changes"]}
