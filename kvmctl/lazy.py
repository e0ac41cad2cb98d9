"""Modules loaded when first used, not when imported.

PyYAML takes about 20 ms to import, a fifth of `kvmctl validate`, and most manifests never
need it: they are read by manifest/fastyaml.py. A module named here stays unloaded until an
attribute of it is first read (importlib's LazyLoader); whatever imports it normally afterwards
gets the same module.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def lazy_module(name: str) -> ModuleType:
    """Module `name`, loaded on first attribute access (at once if it is loaded already)."""
    with _lock:
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        return module
