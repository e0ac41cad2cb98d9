"""Image downloads: a URL into a temporary file, verified against its sha256 before use."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ApplyError

CHUNK = 1024 * 1024


@contextmanager
def download(url: str, sha256: str) -> Iterator[tuple[str, int]]:
    """(path, size) of the downloaded file, which is removed on exit; ApplyError if the
    download fails or its checksum differs (nothing is left behind then)."""
    digest = hashlib.sha256()
    fd, path = tempfile.mkstemp(prefix="kvmctl-image-")
    size = 0
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                while chunk := resp.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except (OSError, ValueError) as exc:  # ValueError: not a URL urllib can open
            raise ApplyError(f"cannot download {url}: {exc}") from None
        if digest.hexdigest() != sha256.lower():
            raise ApplyError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, "
                             f"got {digest.hexdigest()}; nothing was imported")
        yield path, size
    finally:
        if os.path.exists(path):
            os.unlink(path)


def chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
