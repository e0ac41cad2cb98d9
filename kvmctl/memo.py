"""A local memo of verdicts that are pure functions of their inputs.

It remembers keys (hashes of inputs) whose answer was "nothing to report": a document that
passed its JSON schema, a desired/live definition pair with no owned difference. A hit skips
recomputing that same answer; a miss computes it as usual. Keys include a fingerprint of
kvmctl's own code and schemas, so an upgrade starts afresh. It never holds host state, so a
missing or deleted memo only makes kvmctl slower, never different (set KVMCTL_NO_CACHE=1 to
prove it). Loading and saving are the CLI's business; the pipeline only asks and adds.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

MAX_KEYS = 200_000


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    # Every module of every stage (a verdict of manifest/validate.py is as much the code's as
    # one of this folder's), and the schemas, installed or beside the package.
    for folder in (here, here.parent / "schemas", here / "schemas"):
        if folder.is_dir():
            for path in sorted(folder.rglob("*.py")) + sorted(folder.glob("*.json")):
                if "__pycache__" not in path.parts:
                    digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def key(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


class Memo:
    """A set of keys, optionally backed by a file under the user's cache directory."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._keys: set[str] = set()
        self._added = False
        if path is not None:
            try:
                self._keys = set(path.read_text(encoding="ascii").split())
            except (OSError, ValueError):
                self._keys = set()

    def __contains__(self, item: str) -> bool:
        return item in self._keys

    def add(self, item: str) -> None:
        if item not in self._keys:
            self._keys.add(item)
            self._added = True

    def save(self) -> None:
        if self.path is None or not self._added:
            return
        keys = list(self._keys)[-MAX_KEYS:]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memo-")
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("\n".join(keys))
            os.replace(tmp, self.path)
            stem = self.path.name.split("-")[0]
            for old in self.path.parent.glob(f"{stem}-*.keys"):  # memos of older code
                if old != self.path:
                    old.unlink(missing_ok=True)
        except OSError:
            pass  # a memo that cannot be written only costs time


def open_memo(name: str) -> Memo | None:
    """The memo `name` under the cache folder; None with KVMCTL_NO_CACHE, so that nothing
    computes keys no memo will keep."""
    base = _cache_base()
    return Memo(base / f"{name}-{code_fingerprint()}.keys") if base else None


class ParseMemo:
    """What a manifest text parsed to, by the text's hash: one marshal file per text.

    marshal holds exactly the plain values YAML gives (dict, list, str, numbers, bool, None)
    and, unlike pickle, never runs code while loading."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._fresh = False

    @staticmethod
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def get(self, digest: str) -> object | None:
        if self.folder is None:
            return None
        try:
            value: object = marshal.loads((self.folder / digest).read_bytes())
            return value
        except (OSError, EOFError, ValueError, TypeError):
            return None

    def put(self, digest: str, value: object) -> None:
        if self.folder is None:
            return
        try:
            if not self._fresh:
                self.folder.mkdir(parents=True, exist_ok=True)
                for old in self.folder.parent.glob("parsed-*"):  # memos of older code
                    if old != self.folder:
                        shutil.rmtree(old, ignore_errors=True)
                self._fresh = True
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".parse-")
            with os.fdopen(fd, "wb") as f:
                # Any value: marshal raises ValueError for one it cannot hold (caught below).
                f.write(marshal.dumps(cast(Any, value)))
            os.replace(tmp, self.folder / digest)
        except (OSError, ValueError):
            pass  # unmarshallable or unwritable: only costs time


def _cache_base() -> Path | None:
    if os.environ.get("KVMCTL_NO_CACHE"):
        return None
    return Path(os.environ.get("KVMCTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvmctl"))


def open_parse_memo() -> ParseMemo:
    base = _cache_base()
    return ParseMemo(base / f"parsed-{code_fingerprint()}" if base else None)
