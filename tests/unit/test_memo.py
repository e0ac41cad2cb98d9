"""The local memo only skips recomputing a verdict; it never changes one."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmctl.errors import ManifestError
from kvmctl.manifest import documents, validate
from kvmctl.memo import Memo, ParseMemo

VM = """\
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  cpus: {count: 1, max: 2}
  memory: 256MiB
"""


def test_parse_memo_gives_the_same_documents_and_positions(tmp_path: Path) -> None:
    memo = ParseMemo(tmp_path / "parsed")
    first = documents.parse_text(VM, "a.yaml", memo)
    again = documents.parse_text(VM, "b.yaml", memo)  # same text, another file name
    assert [d.body for d in again] == [d.body for d in first]
    path = ("spec", "cpus", "max")
    assert again[0].locate(path).line == first[0].locate(path).line == 5
    assert again[0].locate(path).file == "b.yaml"
    assert list(tmp_path.joinpath("parsed").iterdir()), "nothing was memoised"


def test_parse_memo_never_hides_a_problem(tmp_path: Path) -> None:
    memo = ParseMemo(tmp_path / "parsed")
    broken = VM + "spec: {}\n"  # duplicate key
    for _ in range(2):
        with pytest.raises(ManifestError, match="duplicate key"):
            documents.parse_text(broken, "a.yaml", memo)


def test_a_corrupt_parse_memo_entry_is_ignored(tmp_path: Path) -> None:
    memo = ParseMemo(tmp_path)
    memo.folder.joinpath(memo.digest(VM)).write_bytes(b"\x00garbage")  # type: ignore[union-attr]
    assert documents.parse_text(VM, "a.yaml", memo)[0].name == "vm1"


def test_schema_verdicts_are_remembered_only_for_valid_documents(tmp_path: Path) -> None:
    memo = Memo(tmp_path / "verdicts.keys")
    good = documents.parse_text(VM, "a.yaml")
    validate.validate(good, memo=memo)
    memo.save()
    assert validate.memo_key(good[0]) in Memo(tmp_path / "verdicts.keys")
    bad = documents.parse_text(VM.replace("256MiB", "256"), "a.yaml")
    with pytest.raises(ManifestError):
        validate.validate(bad, memo=memo)
    assert validate.memo_key(bad[0]) not in memo
