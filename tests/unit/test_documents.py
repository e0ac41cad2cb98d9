"""kvmctl.documents: YAML text -> located plain values."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from kvmctl.errors import Location, ManifestError
from kvmctl.manifest import documents
from kvmctl.manifest.documents import Document, json_path, load, parse_text


def parse_one(text: str) -> Document:
    (doc,) = parse_text(textwrap.dedent(text), "m.yaml")
    return doc


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_text(textwrap.dedent(text), "m.yaml")
    return [str(p) for p in caught.value.problems]


# ----------------------------------------------------------------------------- scalars


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("false", False), ("True", True), ("FALSE", False),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"),
    ("12", 12), ("-3", -3), ("1_000", 1000), ("0", 0), ("1.5", 1.5), ("-0.5e3", -500.0),
    ("012", "012"), ("0x1f", "0x1f"), ("1e3", "1e3"), (".nan", ".nan"), (".inf", ".inf"),
    ("~", None), ("null", None), ("", None),
    ("2024-01-02", "2024-01-02"), ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05Z"),
    ("52:54:00:12:34:56", "52:54:00:12:34:56"), ("10:20", "10:20"),
    ("'true'", "true"), ('"12"', "12"), ("'null'", "null"), ("NO", "NO"),
    ("512MiB", "512MiB"), ("<<x", "<<x"), ("=", "="),
])
def test_scalar_values(text: str, value: object) -> None:
    doc = parse_one(f"apiVersion: kvmctl/v1\nvalue: {text}\n")
    assert doc.body["value"] == value
    assert type(doc.body["value"]) is type(value)


def test_block_scalars_are_strings() -> None:
    doc = parse_one("""\
        a: |
          12
        b: >-
          true
        """)
    assert doc.body == {"a": "12\n", "b": "true"}


# ----------------------------------------------------------------------------- positions


def test_positions_of_keys_and_values() -> None:
    doc = parse_one("""\
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm1
        spec:
          disks:
            - disk: root
              bus: sata
        """)
    assert doc.source == Location("m.yaml", 1, 1)
    assert doc.locate(("metadata", "name")) == Location("m.yaml", 4, 3)  # the key
    assert doc.locate(("metadata", "name", "<value>")) == Location("m.yaml", 4, 9)
    assert doc.locate(("spec", "disks", 0)) == Location("m.yaml", 7, 7)
    assert doc.locate(("spec", "disks", 0, "bus", "<value>")) == Location("m.yaml", 8, 12)
    # Unknown paths fall back to the nearest located ancestor, then the document.
    assert doc.locate(("spec", "disks", 0, "nope")) == Location("m.yaml", 7, 7)
    assert doc.locate(("nothing",)) == doc.source
    assert doc.kind == "VirtualMachine" and doc.name == "vm1"


def test_positions_in_later_documents() -> None:
    docs = parse_text("a: 1\n---\n# comment\nb: 2\n---\nc:\n  d: 3\n", "m.yaml")
    assert [d.source.line for d in docs] == [1, 4, 6]
    assert docs[2].locate(("c", "d", "<value>")) == Location("m.yaml", 7, 6)


def test_kind_and_name_of_odd_documents() -> None:
    doc = parse_one("kind: [a]\nmetadata: web\n")
    assert doc.kind == "['a']"
    assert doc.name == ""


@pytest.mark.parametrize(("path", "text"), [
    ((), ""), (("spec",), "spec"), (("spec", "disks", 0, "bus"), "spec.disks[0].bus"),
    ((0, "a"), "[0].a"),
])
def test_json_path(path: tuple, text: str) -> None:
    assert json_path(path) == text


# ----------------------------------------------------------------------------- refusals


def test_duplicate_keys_are_all_reported() -> None:
    found = problems_of("""\
        a: 1
        b:
          c: 1
          c: 2
        a: 3
        """)
    assert found == [
        "m.yaml:4:3: error: duplicate key 'c' (b.c)\n  hint: first defined at line 3",
        "m.yaml:5:1: error: duplicate key 'a' (a)\n  hint: first defined at line 1",
    ]


def test_merge_keys_and_complex_keys_are_refused() -> None:
    found = problems_of("""\
        base: &base {a: 1}
        x:
          <<: *base
          ? [1, 2]
          : 3
        """)
    assert [f.split(": error: ")[1] for f in found] == [
        "YAML merge keys (<<) are not supported (x)", "mapping keys must be plain strings (x)"]


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/tuple",
                                 "!!binary", "!!set", "!custom", "!!omap"])
def test_unsupported_tags(tag: str) -> None:
    (found,) = problems_of(f"a:\n  b: {tag} [x]\n")
    assert "unsupported YAML tag" in found
    assert found.startswith("m.yaml:2:6: error:")


def test_tagged_keys_are_refused() -> None:
    (found,) = problems_of("!!python/name:os.system : 1\n")
    assert "mapping keys must be plain strings" in found


@pytest.mark.parametrize("tag", ["!!str", "!!int", "!!bool", "!!float", "!!null", "!!map",
                                 "!!seq"])
def test_core_tags_are_accepted(tag: str) -> None:
    value = {"!!str": "12", "!!int": "12", "!!bool": "true", "!!float": "1.5", "!!null": "~",
             "!!map": "{a: 1}", "!!seq": "[1]"}[tag]
    doc = parse_one(f"a: {tag} {value}\n")
    assert "a" in doc.body


@pytest.mark.parametrize(("text", "kind"), [("- a\n", "list"), ("word\n", "string"),
                                            ("12\n", "number"), ("true\n", "boolean")])
def test_documents_must_be_mappings(text: str, kind: str) -> None:
    (found,) = problems_of(text)
    assert f"a manifest document must be a mapping, not a {kind}" in found


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n# comments\n", "---\n---\n", "---\n...\n"])
def test_files_without_documents(text: str) -> None:
    (found,) = problems_of(text)
    assert "no manifest documents in this file" in found


def test_empty_documents_between_real_ones_are_skipped() -> None:
    assert len(parse_text("---\na: 1\n---\n---\nb: 2\n", "m.yaml")) == 2


def test_yaml_errors_are_located() -> None:
    (found,) = problems_of("a: [1, 2\nb: 3\n")
    assert found.startswith("m.yaml:2:")
    assert "invalid YAML" in found


def test_tabs_get_a_hint() -> None:
    (found,) = problems_of("a:\n\tb: 1\n")
    assert found.startswith("m.yaml:2:1: error: invalid YAML")
    assert "hint: indent YAML with spaces: tabs are not allowed" in found


def test_control_characters_are_located() -> None:
    (found,) = problems_of("a: 1\nbé: x\x07y\n")
    assert found.startswith("m.yaml:2:6: error: invalid YAML: unacceptable character #x0007")


def test_nesting_beyond_libyaml_limit() -> None:
    (found,) = problems_of("a: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert "invalid YAML" in found and "nesting depth" in found


def test_nesting_beyond_kvmctl_limit() -> None:
    depth = documents.MAX_DEPTH + 5
    (found,) = problems_of("a: " + "[" * depth + "]" * depth + "\n")
    assert f"nested more than {documents.MAX_DEPTH} levels deep" in found


def test_nesting_up_to_the_limit_is_fine() -> None:
    depth = documents.MAX_DEPTH - 1
    doc = parse_one("a: " + "[" * depth + "]" * depth + "\n")
    assert isinstance(doc.body["a"], list)


def test_alias_expansion_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "MAX_VALUES", 1000)
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for name, prev in zip("bcd", "abc", strict=True):
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]\n"
    (found,) = problems_of(text)
    assert "document too large: more than 1000 values (too many aliases?)" in found


def test_each_document_has_its_own_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "MAX_VALUES", 50)
    text = "---\n".join("a: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" for _ in range(20))
    assert len(parse_text(text, "m.yaml")) == 20


def test_problems_from_every_document_of_a_file() -> None:
    found = problems_of("- 1\n---\na: 1\na: 2\n---\nword\n")
    assert len(found) == 3


# ----------------------------------------------------------------------------- files


def test_load_reads_files_directories_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a: 1\n")
    (tmp_path / "b.yml").write_text("b: 1\n---\nc: 1\n")
    (tmp_path / "skip.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text("d: 1\n")
    assert len(load([str(tmp_path)])) == 3
    assert len(load([str(tmp_path)], recursive=True)) == 4
    assert len(load([str(tmp_path / "a.yaml"), "-"], stdin=io.StringIO("e: 1\n"))) == 2


def test_load_collects_problems_of_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a: [\n")
    (tmp_path / "b.yaml").write_bytes(b"b: \xff\n")
    with pytest.raises(ManifestError) as caught:
        load([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), str(tmp_path / "c.yaml")])
    messages = [p.message for p in caught.value.problems]
    assert len(messages) == 3
    assert messages[1].startswith("not UTF-8 text")
    assert messages[2] == "no such file or directory"
    assert caught.value.problems[1].location.line == 1
    assert caught.value.problems[1].location.column == 4


def test_files_are_named_relative_to_the_working_directory(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.yaml").write_text("a: 1\n")
    monkeypatch.chdir(tmp_path)
    (doc,) = load(["m"])
    assert doc.source.file == str(Path("m") / "a.yaml")


def test_yaml_error_at_the_very_end_of_a_file_without_newline() -> None:
    (found,) = problems_of("a: 1\nb: 2\n5")
    assert "invalid YAML" in found
