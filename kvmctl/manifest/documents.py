"""Stage 1: read manifest files into located documents.

YAML is composed into nodes (with libyaml when available) and turned into plain Python values by
hand, so that every value keeps its file, line and column, duplicate keys are caught, and only
`true`/`false` are booleans (YAML 1.1's `yes`/`no`/`on`/`off` stay strings: a MAC or a country
code must not turn into a bool). Timestamps stay strings too.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import Location, ManifestError, Problem
from ..lazy import lazy_module

if TYPE_CHECKING:
    import yaml
else:
    yaml = lazy_module("yaml")  # only the libyaml path needs it (see fastyaml.py)

JsonPath = tuple[str | int, ...]

_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")
_FLOAT = re.compile(r"^[-+]?([0-9][0-9_]*)?\.[0-9]+([eE][-+]?[0-9]+)?$")
_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
# The first characters of the nulls, booleans and numbers here ("" is the empty null).
_SPECIAL_STARTS = frozenset(("", *"~nNtTfF+-.0123456789"))
MANIFEST_SUFFIXES = (".yaml", ".yml")
# Limits that keep hostile input from exhausting the stack or memory. libyaml already refuses
# more than 1000 nested levels; a manifest never needs more than a few dozen.
MAX_DEPTH = 100
# Values built per document. Aliases are shared node references, so `*a` repeated nine times in
# nine levels ("billion laughs") would expand to 9**9 values: building stops long before.
MAX_VALUES = 200_000
# Bytes (UTF-8) of every string and key of a document, counted once per use: an alias of a 1 MB
# string repeated forty times is 40 MB to validate, hash and serialize, though the file is 1 MB.
# 1 MiB is four times the largest user-data any cloud accepts (256 KiB) and far beyond any
# manifest; validating a document that size takes about a second.
MAX_DOCUMENT_BYTES = 1 << 20
# Python refuses to convert integer strings longer than this (sys.int_info.default_max_str_digits)
# and no manifest field needs a number anywhere near it; floats are held to the same length.
MAX_NUMBER_DIGITS = 4300
_CORE = "tag:yaml.org,2002:"
# What plain YAML resolves to (merge and value are what `<<` and `=` resolve to). Anything
# else, such as !!python/object or !!binary, is refused: tags are never constructed.
_ALLOWED_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "timestamp",
                                     "merge", "value", "seq", "map")}


@dataclass(frozen=True)
class Document:
    """One YAML document: its plain value and where each part of it came from."""

    body: Any
    source: Location
    positions: Mapping[JsonPath, Location] = field(repr=False, compare=False)

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", "")) if isinstance(self.body, dict) else ""

    @property
    def name(self) -> str:
        meta = self.body.get("metadata") if isinstance(self.body, dict) else None
        return str(meta.get("name", "")) if isinstance(meta, dict) else ""

    def locate(self, path: Iterable[str | int]) -> Location:
        """The location of the value at `path`, or of its nearest located ancestor."""
        parts = tuple(path)
        while parts:
            if parts in self.positions:
                return self.positions[parts]
            parts = parts[:-1]
        return self.source


def json_path(path: Iterable[str | int]) -> str:
    """`('spec', 'disks', 0, 'bus')` -> `spec.disks[0].bus`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.isprintable():  # a key holding a newline or a control character: quoted
            text += f"[{json.dumps(part)}]"
        else:
            text += f".{part}" if text else part
    return text


def _scalar(node: yaml.ScalarNode) -> Any:
    value = node.value
    if node.style:  # quoted or block scalars are always strings (libyaml marks plain as '')
        return value
    if node.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null",
                        "tag:yaml.org,2002:timestamp"):
        return value
    return plain_value(value)


def plain_value(value: str) -> Any:
    """What an untagged plain scalar means here (shared with the fast path, fastyaml)."""
    if value[:1] not in _SPECIAL_STARTS:  # most strings: no need to try the rules below
        return value
    if value in _NULLS:
        return None
    if value in _BOOLS:
        return _BOOLS[value]
    if _INT.match(value):
        _check_digits(value)
        try:
            return int(value.replace("_", ""))
        except ValueError:  # a lower limit set through PYTHONINTMAXSTRDIGITS
            raise _NumberTooLong(_digits(value)) from None
    if _FLOAT.match(value):
        _check_digits(value)
        return float(value.replace("_", ""))
    return value


class _NumberTooLong(Exception):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _digits(value: str) -> int:
    return sum(1 for c in value if c.isdigit())


def _check_digits(value: str) -> None:
    if len(value) > MAX_NUMBER_DIGITS and _digits(value) > MAX_NUMBER_DIGITS:
        raise _NumberTooLong(_digits(value))


def _size(text: str) -> int:
    """UTF-8 bytes of `text` (lone surrogates, which YAML escapes can make, count as 3)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def node_too_large(node: yaml.Node) -> str:
    """Why a composed node tree is beyond the limits a manifest document has (nesting, values,
    expanded bytes), or "". Iterative and stopping at the first limit: aliases make a tree a
    graph whose expansion may be exponential, or cyclic."""
    stack: list[tuple[yaml.Node, int]] = [(node, 0)]
    values = size = 0
    while stack:
        current, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            return f"more than {MAX_VALUES} values (too many aliases?)"
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack += ((key, depth + 1), (value, depth + 1))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in current.value)
        elif isinstance(current, yaml.ScalarNode):
            size += _size(current.value)
            if size > MAX_DOCUMENT_BYTES:
                return (f"more than {MAX_DOCUMENT_BYTES >> 20} MiB of text once aliases are "
                        "expanded")
    return ""


class _TooLarge(Exception):
    """Building a document went past MAX_DEPTH or MAX_VALUES; carries the problem."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


class _Positions(Mapping[JsonPath, Location]):
    """path -> Location, stored as (line, column) pairs: a document has a position per value,
    and only the few that end up in a problem are ever looked at."""

    def __init__(self, file: str, marks: dict[JsonPath, tuple[int, int]]) -> None:
        self._file = file
        self.marks = marks

    def __getitem__(self, path: JsonPath) -> Location:
        line, column = self.marks[path]
        return Location(self._file, line, column)

    def __contains__(self, path: object) -> bool:
        return path in self.marks

    def __iter__(self) -> Iterator[JsonPath]:
        return iter(self.marks)

    def __len__(self) -> int:
        return len(self.marks)


class _Builder:
    """Turns a composed node tree into plain values, recording positions and problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.marks: dict[JsonPath, tuple[int, int]] = {}
        self.positions = _Positions(file, self.marks)
        self.problems: list[Problem] = []
        self.values = 0
        self.bytes = 0

    def loc(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(self.file, mark.line + 1, mark.column + 1)

    def build(self, node: yaml.Node, path: JsonPath) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooLarge(Problem(
                f"document too large: more than {MAX_VALUES} values (too many aliases?)",
                self.loc(node), _jp(path),
                hint="YAML aliases (*name) are expanded into copies; repeat less"))
        if len(path) > MAX_DEPTH:
            raise _TooLarge(Problem(f"document nested more than {MAX_DEPTH} levels deep",
                                    self.loc(node)))
        mark = node.start_mark
        self.marks[path] = (mark.line + 1, mark.column + 1)
        if node.tag not in _ALLOWED_TAGS:
            self.problems.append(Problem(
                f"unsupported YAML tag {_tag_name(node.tag)!r}", self.loc(node), _jp(path),
                hint="remove the tag: only plain YAML values (strings, numbers, booleans, "
                     "lists, mappings) are allowed"))
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        scalar = cast(yaml.ScalarNode, node)  # composers make no other kind of node
        self._count_bytes(scalar, path)
        try:
            return _scalar(scalar)
        except _NumberTooLong as exc:
            self.problems.append(Problem(
                f"number too long: {exc.digits} digits (at most {MAX_NUMBER_DIGITS})",
                self.loc(node), _jp(path),
                hint="no field takes a number this long; quote it if it is meant as text"))
            return None

    def _count_bytes(self, node: yaml.ScalarNode, path: JsonPath) -> None:
        self.bytes += _size(node.value)
        if self.bytes > MAX_DOCUMENT_BYTES:
            raise _TooLarge(Problem(
                f"document too large: more than {MAX_DOCUMENT_BYTES >> 20} MiB of text once "
                "aliases are expanded", self.loc(node), _jp(path),
                hint="YAML aliases (*name) are expanded into copies; repeat less, or keep "
                     "large content out of the manifest"))

    def _mapping(self, node: yaml.MappingNode, path: JsonPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.append(Problem("YAML merge keys (<<) are not supported",
                                             self.loc(key_node), _jp(path)))
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _ALLOWED_TAGS:
                self.problems.append(Problem("mapping keys must be plain strings",
                                             self.loc(key_node), _jp(path)))
                continue
            key = key_node.value
            self._count_bytes(key_node, path)
            if key in result:
                first = self.positions.get(path + (key,))
                self.problems.append(Problem(
                    f"duplicate key {key!r}", self.loc(key_node), _jp(path + (key,)),
                    hint=f"first defined at line {first.line}" if first else ""))
                continue
            where = path + (key,)
            result[key] = self.build(value_node, where)
            # A key's own position is more useful than its value's for "unexpected key" errors.
            self.marks[where + ("<value>",)] = self.marks[where]
            mark = key_node.start_mark
            self.marks[where] = (mark.line + 1, mark.column + 1)
        return result


def _jp(path: JsonPath) -> str:
    return json_path(path)


def parse_text(text: str, file: str, memo: Any = None) -> list[Document]:
    """Parse one file's text; raise ManifestError with every problem found in it.

    `memo` (memo.ParseMemo) returns what an identical text parsed to before: the values and
    positions of a text that parsed without problems depend on nothing else."""
    digest = memo.digest(text) if memo is not None else ""
    cached = memo.get(digest) if memo is not None else None
    if cached is not None:
        return [Document(body, Location(file, line, column), _Positions(file, raw))
                for body, (line, column), raw in cached]
    documents = _parse_text(text, file)
    if memo is not None:
        memo.put(digest, [(d.body, (d.source.line, d.source.column),
                           d.positions.marks)  # type: ignore[attr-defined]
                          for d in documents])
    return documents


def _parse_text(text: str, file: str) -> list[Document]:
    from . import fastyaml  # imported here: fastyaml imports this module

    # The common subset of YAML is read directly, about 4 times faster; anything else, and every
    # error, goes through libyaml.
    return fastyaml.load(text, file) or _parse_yaml(text, file)


def _loader() -> type[yaml.SafeLoader]:
    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return loader


def _parse_yaml(text: str, file: str) -> list[Document]:
    documents: list[Document] = []
    problems: list[Problem] = []
    try:
        nodes = list(yaml.compose_all(text, Loader=_loader()))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        hint = ""
        lines = text.split("\n", mark.line + 1) if mark else []
        line = lines[mark.line] if mark and mark.line < len(lines) else ""  # EOF: past the end
        if mark and "\t" in line[:mark.column + 1]:
            hint = "indent YAML with spaces: tabs are not allowed"
        raise ManifestError([Problem(f"invalid YAML: {message}", where, hint=hint)]) from None
    except yaml.reader.ReaderError as exc:  # a control character; position is an offset
        before = text.encode("utf-8")[:exc.position] if _loader() is not yaml.SafeLoader \
            else text[:exc.position].encode("utf-8")  # libyaml counts bytes, Python characters
        byte_lines = before.split(b"\n")
        where = Location(file, len(byte_lines),
                         len(byte_lines[-1].decode("utf-8", "replace")) + 1)
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ManifestError([Problem(f"invalid YAML: unacceptable character {char}: {exc.reason}",
                                     where)]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(f"invalid YAML: {exc}", Location(file))]) from None
    except RecursionError:  # the pure-Python composer recurses per nesting level
        raise ManifestError([Problem("invalid YAML: nested too deeply", Location(file))]) from None
    for node in nodes:
        if node is None:
            continue
        builder = _Builder(file)
        try:
            body = builder.build(node, ())
        except _TooLarge as exc:
            problems.append(exc.problem)
            continue
        problems.extend(builder.problems)
        where = builder.loc(node)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(Problem(
                f"a manifest document must be a mapping, not a {_type_name(body)}", where,
                hint="each document needs apiVersion, kind, metadata and spec"))
            continue
        documents.append(Document(body, where, builder.positions))
    if problems:
        raise ManifestError(problems)
    if not documents:
        raise ManifestError([Problem("no manifest documents in this file", Location(file),
                                     hint="the file is empty or holds only comments")])
    return documents


def _type_name(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number",
            bool: "boolean"}.get(type(value), type(value).__name__)


def _expand(target: str, recursive: bool) -> Iterator[Path]:
    path = Path(target)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        found = sorted(p for p in path.glob(pattern)
                       if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
        if not found:
            raise ManifestError([Problem("no .yaml or .yml files in this directory",
                                         Location(target),
                                         hint="" if recursive else "use -R to search subfolders")])
        yield from found
    elif path.exists():
        yield path
    else:
        raise ManifestError([Problem("no such file or directory", Location(target))])


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError([Problem(f"cannot read: {exc.strerror}", Location(_display(path)))]
                            ) from None
    return _decode(data, _display(path))


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        raise ManifestError([Problem(f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                                     Location(file, line, column),
                                     hint="manifests are UTF-8 YAML text")]) from None


def _read_stdin(stream: Any) -> str:
    raw = getattr(stream, "buffer", None)
    if raw is not None:  # the real standard input: decode it ourselves, whatever the locale
        return _decode(raw.read(), "<stdin>")
    try:
        text: str = stream.read()
        return text
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(f"not UTF-8 text ({exc.reason})", Location("<stdin>"))]
                            ) from None


def load(targets: Iterable[str], recursive: bool = False, stdin: Any = None,
         memo: Any = None) -> list[Document]:
    """Load every document from files, directories and `-` (standard input).

    All files are read even when one fails, so that every problem is reported at once.
    """
    documents: list[Document] = []
    problems: list[Problem] = []
    for target in targets:
        try:
            if target == "-":
                stream = stdin if stdin is not None else sys.stdin
                documents.extend(parse_text(_read_stdin(stream), "<stdin>"))
                continue
            for path in _expand(target, recursive):
                documents.extend(parse_text(_read(path), _display(path), memo))
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return documents


def _display(path: Path) -> str:
    """A path as the user would recognise it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative
