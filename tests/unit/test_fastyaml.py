"""kvmctl.manifest.fastyaml: the direct reader gives exactly what libyaml and the builder give.

Every comparison is between `fastyaml.load` and `documents._parse_yaml` (the libyaml path) on
the same text: the same bodies (compared by repr, so that 1, 1.0 and True differ), sources and
marks (in the same order), or the fast path declines (None). When the libyaml path refuses a
text, the fast path must decline it, so that every error keeps its message and location.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmctl.errors import ManifestError
from kvmctl.manifest import documents, fastyaml

ROOT = Path(__file__).resolve().parents[2]
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def comparable(docs: list[documents.Document]) -> list[tuple[str, Any, list[Any]]]:
    return [(repr(d.body), d.source, list(d.positions.marks.items()))  # type: ignore[attr-defined]
            for d in docs]


def outcome(text: str) -> tuple[list[Any] | None, list[Any] | None]:
    """(fast path, libyaml path), each None when it declined or refused the text."""
    fast = fastyaml.load(text, "m.yaml")
    try:
        slow = comparable(documents._parse_yaml(text, "m.yaml"))
    except ManifestError:
        slow = None
    return (None if fast is None else comparable(fast)), slow


def assert_same_or_declined(text: str) -> bool:
    """Whether the fast path read `text` (and then gave what the libyaml path gives)."""
    fast, slow = outcome(text)
    if fast is None:
        return False
    assert slow is not None, f"libyaml refuses {text!r}, the fast path reads it"
    assert fast == slow, text
    return True


# ----------------------------------------------------------------------------- chosen texts

READ = [
    "a: 1", "a:\nb: 2", "a: 1\n", "# c\n\na: 1  # d\n\n",
    "a:\n- x\n-\n- y: 1\n  z:\nb: \"q\\n\"",
    "a:\n  - - x\n    - y\n  - - z",
    "a:\n  - b: 1\n    c:\n    - 2\n  -\n    d: 3\ne: 4\nf:\ng:\n  h:",
    "a:\n- # c\n- x # d\n-   \"y\"  # e\n-  - 1",
    "a:\n- - - b: 1\n      c: 2\n    - d\n  - e\n- f:\n  g: 3",
    "a:\n- b:\n  - c\n  d: 1", "a:\n  -\n   b: 1", "a:\n  -\n    - x",
    "a: 'it''s'", "a : b", "a  :  b  ", "\"k\" : v", "'k': v", "a:b: c", "a :b: c",
    "a: b #c: d", "a: b#c", "a: -5", "a: -x", "a: --", "a: ---", "a: ...", "=: 1\nb: =",
    "\"<<\": 1", "a: <<", "a: \"\\e\\a\\b\\v\\f\\0\\ \\/\\t\\\\\\\"\"", "a: '\\n'", "a: ''",
    "a: \"\"", "a: ~\nb: null\nc: Null\nd: NULL\ne:", "a: 0x1F\nb: 1_000\nc: .5\nd: 1e3",
    "a: -0\nb: +1\nc: 012\nd: 1.5\ne: -0.5e3\nf: 1_0.5", "a: yes\nb: no\nc: on\nd: off",
    "a: true\nb: True\nc: TRUE\nd: false\ne: tRUE", "a: 2024-01-02\nb: 2024-01-02T03:04:05Z",
    "é: ñ\nb: ü\nxé: 'ñ' # c\n\"ü\": -ñ\nl:\n- é\n- ü: 1\n  ñ: 2", "k: 😀 x\nz: 1",
    "a: \xa0x\xa0", "\xa0: 1", "a: x\xa0 # c",
    "--- # c\na: 1\n--- \nb: 2", "---\n  a: 1\n  b: 2", "a: 1\n...\n---\n...\n---\nb: 2\n...",
    "---\n---\na: 1\n---\n", "a: 1\n---\n# nothing\n---\nb: 1", "a: 1\n...\n",
    "a:   \nb:", "a: # c\n  b: 1", "a:\n\n  # x\n\n  b: 1",
]

DECLINED = [  # outside the subset, though libyaml reads them
    "a: [1, 2]", "a: {b: 1}", "a: &x 1\nb: *x", "a: !!str 1", "a: |\n  x", "a: >\n  x",
    "a: b\n  c", "a: 'b\n  c'", "? a\n: b", "%YAML 1.1\n---\na: 1", "a:\tb", "\ufeffa: 1",
    "a: 1\r\nb: 2", "a: \"\\x41\"", "a: \"\\u00e9\"", "a: 'x' #c\nb: \"y\"#c", "a: ?x", "a: :x",
    "a: 1\n...\n...\n---\nb: 1", "a: \u2028", "a: \x85",
]


@pytest.mark.parametrize("text", READ)
def test_read_like_libyaml(text: str) -> None:
    assert assert_same_or_declined(text), f"declined {text!r}"


@pytest.mark.parametrize("text", DECLINED + [
    "- a", "a: 1\na: 2", "<<: 1", "a:\n  - x\n  b: 1", "  a: 1\n  b:\nc: 2", "a:\n  b:\n- c",
    "a: x\n# c\n  y", "...\n---\na: 1", "# c\n...\n---\na: 1", "a: 1\n...\nb: 2", "a: -",
    "a: - x", "a: b: c", "a: b:", "a: @x", "a: `x`", "a: %x", "a: ,x", "a: ]", "a: \"x\" y",
    "a:#b", "\"a\":b", "a: 1\nb", "x" * 1100 + ": 1", "a: " + "9" * 5000, "---x: 1",
    "a: \x00", "a: 'x", "a: \"x", "a: \"x\\\"", "", "# only a comment", "---\n...\n",
    "- - 1", "a\n", "a: 1\n  - b", "a: 1\n---\n- 1",
])
def test_declined(text: str) -> None:
    assert fastyaml.load(text, "m.yaml") is None
    if text in DECLINED:
        documents._parse_yaml(text, "m.yaml")  # libyaml reads it: only the subset is missing


def nested(levels: int) -> str:
    """Keys nested `levels` deep (the last one's null value is at a path that long)."""
    return "".join(f"{' ' * i}k{i}:\n" for i in range(levels))


@pytest.mark.parametrize(("limit", "within", "beyond"), [
    ("MAX_DEPTH", nested(8), nested(9)),
    ("MAX_VALUES", "a:\n" + "- 1\n" * 3, "a:\n" + "- 1\n" * 7),
    ("MAX_DOCUMENT_BYTES", "a: " + "x" * 5, "a: " + "x" * 8),  # (here: the whole text)
    ("MAX_NUMBER_DIGITS", "a: " + "9" * 8, "a: " + "9" * 9),
])
def test_limits(monkeypatch: pytest.MonkeyPatch, limit: str, within: str, beyond: str) -> None:
    for module in (documents, fastyaml):
        monkeypatch.setattr(module, limit, 8, raising=False)
    assert assert_same_or_declined(within)
    assert outcome(beyond) == (None, None)  # refused by libyaml's path, declined here


def test_parse_text_reads_the_subset_without_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "examples/lab/vms.yaml").read_text()
    expected = comparable(documents._parse_yaml(text, "vms.yaml"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("libyaml was used")

    monkeypatch.setattr(yaml, "compose_all", refuse)
    assert comparable(documents.parse_text(text, "vms.yaml")) == expected
    with pytest.raises(AssertionError, match="libyaml was used"):
        documents.parse_text("a: |\n  block\n", "m.yaml")


def test_errors_come_from_the_libyaml_path() -> None:
    with pytest.raises(ManifestError) as caught:
        documents.parse_text("a: 1\na: 2\n", "m.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "m.yaml:2:1: error: duplicate key 'a' (a)\n  hint: first defined at line 1"]


# ----------------------------------------------------------------------------- the repository


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _repository_texts() -> list[tuple[str, str]]:
    texts = []
    for folder in ("examples", "tests/fixtures", "tests/golden"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in documents.MANIFEST_SUFFIXES:
                try:
                    texts.append((str(path.relative_to(ROOT)), path.read_bytes().decode()))
                except UnicodeDecodeError:  # refused before any YAML is read
                    continue
    render, noop = _bench("validate_render"), _bench("plan_noop")
    net = ipaddress.IPv4Network("10.1.0.0/24")
    texts += [
        ("bench vms", "---\n".join(render._vm(i, False) for i in range(30))),
        ("bench vms cloud-init", "---\n".join(render._vm(i, True) for i in range(3))),
        ("bench disks", "---\n".join(render._disk(i) for i in range(30))),
        ("bench networks", "---\n".join(render._network(k) for k in range(10))),
        ("bench pools", "---\n".join(render._pool(i) for i in range(2))),
        ("plan_noop vms", "---\n".join(
            noop.vm_yaml(f"vm-{i}", "net", f"10.1.0.{i + 2}" if i % 2 else None,
                         "host-a" if i % 3 == 0 else None) for i in range(30))),
        ("plan_noop network", noop.network_yaml("net", net)),
    ]
    return texts


REPOSITORY = _repository_texts()


@pytest.mark.parametrize(("name", "text"), REPOSITORY, ids=[name for name, _ in REPOSITORY])
def test_repository_files(name: str, text: str) -> None:
    assert_same_or_declined(text)


def test_repository_files_that_must_be_read() -> None:
    texts = dict(REPOSITORY)
    for name in ("examples/lab/vms.yaml", "examples/bridged/vms.yaml", "examples/lab/disks.yaml",
                 "examples/quickstart/vm.yaml", "bench vms", "bench disks", "bench networks",
                 "bench pools", "plan_noop vms", "plan_noop network"):
        assert assert_same_or_declined(texts[name]), name


# ----------------------------------------------------------------------------- generated texts

# Plain scalars: words YAML 1.1 or 1.2 would resolve (all strings or numbers here by the rules
# of documents.plain_value), and text from an alphabet of characters that matter.
WORDS = ["yes", "no", "on", "off", "y", "n", "true", "True", "TRUE", "false", "False", "tRUE",
         "null", "Null", "NULL", "~", "0x1F", "0o17", "1_000", "_1", ".5", "1.", "1e3",
         "1.5e3", "-0", "+1", "-0.0", "012", "0", "1.5", "-.5", "1_0.5", ".inf", ".nan",
         "2024-01-02", "2024-01-02T03:04:05Z", "52:54:00:12:34:56", "10:20", "<<x", "=",
         "-5", "-x", "--", "---", "...", "a.b", "x-y", "/var/x", "a:b", "a#b", "a b", "é",
         "ü x", "😀", "\xa0", "x\xa0", "9" * 30, "1" + "0" * 20 + ".5"]
PLAIN_START = "abzXYZ019_./=~éü😀\xa0"
PLAIN_REST = PLAIN_START + " -:#'\"[]{},!&*|>?@`%"
ESCAPES = ["\\n", "\\t", "\\0", "\\e", "\\a", "\\b", "\\v", "\\f", "\\r", "\\/", "\\ ",
           "\\\\", "\\\""]


def _plain_ok(text: str) -> bool:
    return (": " not in text and " #" not in text and not text.endswith((" ", ":"))
            and not text.startswith("- "))


plain = st.one_of(st.sampled_from(WORDS), st.builds(
    str.__add__, st.sampled_from(PLAIN_START), st.text(PLAIN_REST, max_size=8))
    .filter(_plain_ok))
single = st.text(PLAIN_REST, max_size=8).map(lambda s: "'" + s.replace("'", "''") + "'")
double = st.lists(st.one_of(st.sampled_from(ESCAPES), st.text(PLAIN_REST, max_size=3).map(
    lambda s: s.replace("\\", "\\\\").replace('"', '\\"'))), max_size=4).map(
    lambda parts: '"' + "".join(parts) + '"')
scalars = st.one_of(plain, plain, single, double)
keys = st.one_of(st.sampled_from(["a", "b", "name", "spec", "x-y", "a.b", "a b", "é", "1",
                                  "true", "~", "=", "a:b", "a#b", "<<x", "k" * 40]),
                 single, double)
comments = st.sampled_from(["", "", "", " # c", "  #c: d", " #"])
spaces = st.sampled_from([" ", " ", " ", "  "])
steps = st.sampled_from([2, 2, 2, 4, 1, 3])


@functools.cache
def _key_value(key: str) -> str:
    node: Any = yaml.compose(f"{key}: 0", Loader=yaml.CSafeLoader)
    return str(node.value[0][0].value)


@st.composite
def mapping(draw: st.DrawFn, indent: int, depth: int) -> list[str]:
    lines, used = [], set()
    for _ in range(draw(st.integers(1, 4))):
        key = draw(keys)
        if _key_value(key) in used:
            continue  # (a duplicate key is a near miss, below)
        used.add(_key_value(key))
        head = " " * indent + key + draw(st.sampled_from(["", "", " "])) + ":"
        kind = draw(st.sampled_from(["scalar", "scalar", "empty", "map", "seq"] if depth < 4
                                    else ["scalar", "empty"]))
        if kind == "scalar":
            lines.append(head + draw(spaces) + draw(scalars) + draw(comments))
        elif kind == "empty":
            lines.append(head + draw(st.sampled_from(["", " ", " ~", " null"])) + draw(comments))
        elif kind == "map":
            lines.append(head + draw(comments))
            lines += draw(mapping(indent + draw(steps), depth + 1))
        else:
            lines.append(head + draw(comments))
            lines += draw(sequence(indent + draw(st.sampled_from([0, 0, 2, 1, 4])), depth + 1))
    return lines


@st.composite
def sequence(draw: st.DrawFn, indent: int, depth: int) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        dash = " " * indent + "-"
        kind = draw(st.sampled_from(["scalar", "scalar", "empty", "map", "seq"] if depth < 4
                                    else ["scalar", "empty"]))
        if kind == "scalar":
            lines.append(dash + draw(spaces) + draw(scalars) + draw(comments))
        elif kind == "empty":
            lines.append(dash + draw(st.sampled_from(["", " ", " ~"])) + draw(comments))
        elif draw(st.booleans()):  # the block starts on the dash's line: `- a: 1`, `- - 1`
            gap = draw(spaces)
            column = indent + 1 + len(gap)
            block = draw(mapping(column, depth + 1) if kind == "map"
                         else sequence(column, depth + 1))
            lines += [dash + gap + block[0][column:]] + block[1:]
        else:
            lines.append(dash + draw(comments))
            inner = indent + draw(st.sampled_from([2, 1, 3, 4]))
            lines += draw(mapping(inner, depth + 1) if kind == "map"
                          else sequence(inner, depth + 1))
    return lines


@st.composite
def stream(draw: st.DrawFn) -> str:
    """One to three documents of the subset, with comments, blank lines and separators."""
    texts = []
    for _ in range(draw(st.integers(1, 3))):
        lines = draw(mapping(draw(st.sampled_from([0, 0, 0, 2])), 0))
        for _ in range(draw(st.integers(0, 2))):
            filler = draw(st.sampled_from(["", "   ", "# note", "  # note: x", "#"]))
            lines.insert(draw(st.integers(0, len(lines))), filler)
        texts.append("\n".join(lines) + "\n")
    separator = draw(st.sampled_from(["---\n", "---\n", "--- # next\n", "...\n---\n"]))
    start = draw(st.sampled_from(["", "", "---\n", "# head\n---\n"]))
    end = draw(st.sampled_from(["", "", "...\n", "---\n", "\n\n"]))
    return start + separator.join(texts) + end


SNIPPETS = ["\t", "&a ", "*a", "!x ", "!!str ", "|", ">", "[", "{", "]", "}", "? ", "?", "%",
            "@", "`", "<<: 1", "\ufeff", "\r", "\x01", "\x85", "\u2028", " #", ": ", ":", "- ",
            "-", "'", '"', "\\", "\\x41", "...", "---", "#", " ", "  ", "yes", "0x1F", "é", ",",
            "\n", "\n ", "\n  ", "\n- ", "\n---\n", "\n...\n", "a: 1", "a:"]


@st.composite
def near_miss(draw: st.DrawFn) -> str:
    """A text of the subset with one to three edits that may take it out of it."""
    lines = draw(stream()).split("\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["indent", "insert", "insert", "dup", "join", "delete"]))
        if edit == "indent":
            lines[i] = " " * draw(st.integers(0, 3)) + lines[i].lstrip(" ")[draw(
                st.integers(0, 1)):]
        elif edit == "insert":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(SNIPPETS)) + lines[i][at:]
        elif edit == "dup":
            lines.insert(i, lines[i])
        elif edit == "join" and i + 1 < len(lines):
            lines[i:i + 2] = [lines[i] + draw(st.sampled_from(["", " "])) + lines[i + 1]]
        elif len(lines) > 1:
            del lines[i]
    return "\n".join(lines)


@PROPERTY
@given(stream())
def test_the_subset_is_read_like_libyaml(text: str) -> None:
    assert assert_same_or_declined(text), f"declined {text!r}"


@settings(PROPERTY, max_examples=450)
@given(near_miss())
def test_near_misses_are_read_like_libyaml_or_declined(text: str) -> None:
    fast, slow = outcome(text)
    event("read" if fast is not None else "declined, libyaml reads it" if slow is not None
          else "declined, libyaml refuses it")
    if fast is not None:
        assert fast == slow, text
