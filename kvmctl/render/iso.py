"""cloud-init NoCloud seed images (ISO 9660), built in-process from a seed's content.

The seed is an ISO 9660 image labelled ``cidata`` holding ``user-data``, ``meta-data`` and
optionally ``network-config``. The exact, hyphenated names are carried by Rock Ridge (what
Linux's isofs shows by default) and Joliet; the plain ISO 9660 level 1 names (``USERDATA.;1``
...) are only a fallback. Builds are deterministic, so the same content gives the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
import types
from collections.abc import Iterator
from time import struct_time
from typing import Any, Final

from ..manifest.cloudinit import SeedContent, SeedError, meta_data_text

VOLUME_LABEL: Final = "cidata"
SEED_EPOCH: Final = 946684800.0  # 2000-01-01T00:00:00Z: every timestamp in the image
_FILE_MODE: Final = 0o100444  # regular file, r--r--r--

# (Rock Ridge / Joliet name, ISO 9660 level 1 name)
_USER_DATA: Final = ("user-data", "USERDATA.;1")
_META_DATA: Final = ("meta-data", "METADATA.;1")
_NETWORK_CONFIG: Final = ("network-config", "NETWORKC.;1")


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
    def localtime(secs: float | None = None) -> struct_time:  # `time` here is the method above
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


def _set_time(modules: list[types.ModuleType], clock: types.ModuleType) -> None:
    for module in modules:
        vars(module)["time"] = clock  # `module.time = clock`, which the ModuleType type refuses


@contextlib.contextmanager
def _fixed_clock() -> Iterator[None]:
    global _clock_owner
    with _clock_lock:
        patched = _pycdlib_modules()
        _clock_owner = threading.get_ident()
        _set_time(patched, _SEED_CLOCK)
        try:
            yield
        finally:
            _set_time(patched, time)
            _clock_owner = None
