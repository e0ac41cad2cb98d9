"""The stream plumbing of kvmctl/host/transfer.py, without a daemon: fake libvirt streams.

The copy itself, against real libvirt, is in tests/integration/test_transfer.py.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest

from kvmctl.errors import HypervisorError
from kvmctl.host import transfer
from kvmctl.host.connection import send_all


class FakeStream:
    """Plays back a list of data chunks (bytes) and holes (int lengths); records what is sent."""

    def __init__(self, pieces: list[bytes | int] = (), accept: int = 1 << 30) -> None:
        self.pieces = list(pieces)
        self.accept = accept  # at most this many bytes taken per send()
        self.sent: list[tuple[str, Any]] = []
        self.aborted = False
        self._hole = 0

    def recvFlags(self, nbytes: int, flags: int) -> bytes | int:  # noqa: N802 (libvirt's name)
        assert flags == transfer.RECV_STOP_AT_HOLE
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if isinstance(piece, int):
            self._hole = piece
            return -3
        return piece

    def recvHole(self, flags: int) -> int:  # noqa: N802
        hole, self._hole = self._hole, 0
        return hole

    def recv(self, nbytes: int) -> bytes:
        while self.pieces:
            piece = self.pieces.pop(0)
            if isinstance(piece, int):
                raise AssertionError("a dense stream has no holes")
            return piece
        return b""

    def send(self, data: bytes) -> int:
        assert isinstance(data, bytes)
        taken = data[:self.accept]
        self.sent.append(("data", taken))
        return len(taken)

    def sendHole(self, length: int, flags: int) -> int:  # noqa: N802
        self.sent.append(("hole", length))
        return 0

    def abort(self) -> None:
        self.aborted = True


def test_a_hole_hashes_as_its_zeros() -> None:
    length = 2 * transfer.CHUNK + 12345
    d = transfer._Digester()
    d.data(b"abc")
    d.hole(length)
    d.data(b"xyz")
    assert d.length == length + 6
    assert d.hexdigest() == hashlib.sha256(b"abc" + bytes(length) + b"xyz").hexdigest()


def test_a_sparse_stream_yields_data_and_holes() -> None:
    stream = FakeStream([b"ab", 5, b"cd", 0, 7])
    assert list(transfer._received(stream, True, "download")) == [b"ab", 5, b"cd", 7]


def test_a_dense_stream_yields_data() -> None:
    assert list(transfer._received(FakeStream([b"ab", b"cd"]), False, "download")) == [b"ab",
                                                                                        b"cd"]


def test_a_nonblocking_answer_is_an_error() -> None:
    stream = FakeStream()
    stream.recv = lambda n: -2  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(HypervisorError, match="download: the stream answered -2"):
        list(transfer._received(stream, False, "download"))


def test_send_goes_on_after_a_short_send() -> None:
    # (every upload sends through it: volumes, seeds, records, copies)
    stream = FakeStream(accept=3)
    send_all(stream, b"abcdefgh", "upload")
    assert b"".join(d for _, d in stream.sent) == b"abcdefgh"
    assert len(stream.sent) == 3


def test_a_hole_to_a_dense_destination_is_sent_as_zeros() -> None:
    stream = FakeStream()
    transfer._send_hole(stream, False, transfer.CHUNK + 10, "upload")
    assert all(kind == "data" for kind, _ in stream.sent)
    assert b"".join(d for _, d in stream.sent) == bytes(transfer.CHUNK + 10)
    sparse = FakeStream()
    transfer._send_hole(sparse, True, transfer.CHUNK + 10, "upload")
    assert sparse.sent == [("hole", transfer.CHUNK + 10)]


def _host(streams: list[FakeStream]) -> Any:
    conn = SimpleNamespace(newStream=lambda flags: streams.pop(0))
    return SimpleNamespace(uri="test://host", conn=conn)


def test_a_host_refusing_sparse_streams_gets_a_dense_one() -> None:
    first, second = FakeStream(), FakeStream()
    opened: list[int] = []

    def download(stream: FakeStream, offset: int, length: int, flags: int) -> None:
        opened.append(flags)
        if flags:
            raise libvirt.libvirtError("unsupported flags (0x1) in function ...")

    stream, sparse = transfer._open(_host([first, second]), "download", download,
                                    transfer.DOWNLOAD_SPARSE)
    assert (stream, sparse, opened) == (second, False, [1, 0])
    assert first.aborted


def test_a_host_taking_sparse_streams_gets_one() -> None:
    only = FakeStream()
    stream, sparse = transfer._open(_host([only]), "upload", lambda *a: None,
                                    transfer.UPLOAD_SPARSE)
    assert (stream, sparse) == (only, True)


def test_a_failing_dense_open_is_reported() -> None:
    def download(stream: FakeStream, offset: int, length: int, flags: int) -> None:
        raise libvirt.libvirtError("permission denied")

    with pytest.raises(HypervisorError, match="download: permission denied"):
        transfer._open(_host([FakeStream(), FakeStream()]), "download", download, 1)


def test_a_copy_onto_itself_is_refused_before_anything_happens() -> None:
    host: Any = SimpleNamespace(uri="qemu:///system")
    with pytest.raises(HypervisorError, match="source and destination are the same volume"):
        transfer.copy_volume(host, "pool", "vol", host, "pool", "<volume/>")
