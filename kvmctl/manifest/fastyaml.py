"""A direct reader for the plain subset of YAML that manifests are written in.

`load` gives exactly what documents._parse_yaml gives (the same bodies, sources, positions and
document boundaries), about 4 times faster, for texts made only of: `---` separators (`...`
only right before one or at the end), comments and blank lines, block mappings and sequences
nested by indentation (a sequence may sit at its key's indentation; an item may start a mapping
or a sequence: `- a: 1`, `- - 1`), and one-line plain, single- and double-quoted scalars. For
anything else, and for anything that may be an error, it returns None: libyaml reads the text
then, and reports any error as it always has.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import Location
from .documents import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_VALUES,
    Document,
    JsonPath,
    _NumberTooLong,
    _Positions,
    _size,
    plain_value,
)

# Characters libyaml reads as plain text: no tab, CR, control character, NEL, LS, PS or BOM.
_UNUSUAL = re.compile("[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd"
                      "\U00010000-\U0010ffff]")
_PLAIN_ASCII = bytes(range(0x20, 0x7f)) + b"\n"
# What a plain scalar may not start with (`-` may, before a non-space: `-5`).
_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
_SINGLE = re.compile(r"'((?:[^']|'')*)'")
_DOUBLE = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f",
            "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\"}
_MAX_KEY = 1000  # libyaml refuses a key longer than 1024 characters
_ITEM = ("-", "- ")  # `text[:2] in _ITEM`: the text is a sequence item

# What a line holds, read once per file (a file repeats most of its lines): its indentation
# (or _SKIP: blank or comment, or _SEPARATOR: `---` or `...`), its key or None, the column
# of its scalar in the text after the indentation (1-based; 0: none; -1: the line is a
# sequence item), that scalar (for an item: its content as a line of its own, indented to its
# column; for a separator: `---` or `...`), and the column just after its key's colon.
Info = tuple[int, str | None, int, Any, int]
Marks = dict[JsonPath, tuple[int, int]]
_SKIP, _SEPARATOR = -2, -1
_BLANK: Info = (_SKIP, None, 0, None, 0)
_END: Info = (_SEPARATOR, None, 0, None, 0)


class _Decline(Exception):
    """The text is outside the subset (or may hold an error): libyaml reads it."""


def load(text: str, file: str) -> list[Document] | None:
    """The documents in `text`, or None when it is not all in the subset (or holds none)."""
    if _unusual(text) or _size(text) > MAX_DOCUMENT_BYTES:
        return None
    reader = _Reader(text.split("\n"))
    documents = []
    i, state = 0, "start"  # "open": in a document; "ended": after `...` (then `---` or the end)
    try:
        while i < reader.end:
            at, _, _, mark, _ = reader.get(reader.lines[i]) or reader.read(reader.lines[i])
            if at == _SKIP:
                i += 1
            elif at == _SEPARATOR:
                if mark == "..." and state != "open":
                    raise _Decline
                state = "ended" if mark == "..." else "open"
                i += 1
            elif state == "ended":
                raise _Decline
            else:
                state = "open"
                body, marks, i = reader.document(i)
                if len(marks) > MAX_VALUES:  # marks: one or two per value
                    return None
                documents.append(Document(body, Location(file, *marks[()]),
                                          _Positions(file, marks)))
    except _Decline:
        return None
    return documents or None


def _unusual(text: str) -> bool:
    if text.isascii():  # the common case, 10 times faster
        return bool(text.encode().translate(None, _PLAIN_ASCII))
    return _UNUSUAL.search(text) is not None


def _info(line: str) -> Info:
    text = line.lstrip(" ")
    indent = len(line) - len(text)
    text = text.rstrip(" ")
    first = text[:1]
    if first in ("", "#"):
        return _BLANK
    if first in ("-", "."):
        if indent == 0 and text[:3] in ("---", "...") and text[3:4] in ("", " "):
            if text[3:].lstrip(" ")[:1] not in ("", "#"):
                raise _Decline  # `--- value`, `--- |`, ...
            return _SEPARATOR, None, 0, text[:3], 0
        if text[:2] in _ITEM:
            rest = text[1:].lstrip(" ")
            return indent, None, -1, " " * (indent + len(text) - len(rest)) + rest, 0
    if first in ("'", '"'):
        key, end = _quoted(text)
        after = text[end:].lstrip(" ")
        if after[:1] != ":" or after[1:2] not in ("", " "):
            return indent, None, 1, _scalar(text), 0  # no key: a scalar
        colon = len(text) - len(after)
    else:
        code = text[:text.find(" #")].rstrip(" ") if " #" in text else text  # no comment
        colon = code.find(": ")
        if colon < 0:
            if code[-1] != ":":
                return indent, None, 1, _scalar(text), 0
            colon = len(code) - 1
        key = code[:colon].rstrip(" ")
        if first in _INDICATORS or key == "<<":  # (a merge key is refused by the builder)
            raise _Decline
    if colon > _MAX_KEY:
        raise _Decline
    rest = text[colon + 1:].lstrip(" ")
    if not rest or rest[0] == "#":
        return indent, key, 0, None, colon + 2
    return indent, key, len(text) - len(rest) + 1, _scalar(rest), 0


def _quoted(text: str) -> tuple[str, int]:
    """The value of the quoted scalar `text` starts with, and the index after it."""
    if text[0] == "'":
        match = _SINGLE.match(text)
        if match is None:  # it goes on over lines
            raise _Decline
        return match[1].replace("''", "'"), match.end()
    match = _DOUBLE.match(text)
    if match is None:
        raise _Decline
    value = match[1]
    return (_ESCAPE.sub(_unescape, value) if "\\" in value else value), match.end()


def _unescape(match: re.Match[str]) -> str:
    if match[1] not in _ESCAPES:  # \x, \u, \U, \N, \_, \L, \P, a line break: left to libyaml
        raise _Decline
    return _ESCAPES[match[1]]


def _scalar(text: str) -> Any:
    """The value of a one-line scalar, perhaps followed by a comment."""
    first = text[0]
    if first == "'" or first == '"':
        value, end = _quoted(text)
        if end < len(text) and (text[end] != " " or text[end:].lstrip(" ")[0] != "#"):
            raise _Decline
        return value
    if first in _INDICATORS and (first != "-" or len(text) == 1 or text[1] == " "):
        raise _Decline  # a flow collection, an anchor, a tag, a block scalar, `- x`, ...
    cut = text.find(" #")
    if cut >= 0:
        text = text[:cut].rstrip(" ")
    if ": " in text or text[-1] == ":":
        raise _Decline
    try:
        return plain_value(text)
    except _NumberTooLong:
        raise _Decline from None


class _Reader:
    """Builds documents' values and marks (as documents._Builder does) from a file's lines.
    Each method reads a block from line `i` (0-based) on and returns it with the index of the
    line after it. A line's Info is `self.get(line) or self.read(line)`."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.end = len(lines)
        self.seen: dict[str, Info] = {}
        self.get = self.seen.get
        self.marks: Marks = {}
        # The documents of a file share their paths, built once: path -> key -> the key's
        # path and its value's (path + (key,), path + (key, "<value>")).
        self.keys: dict[JsonPath, dict[str, tuple[JsonPath, JsonPath]]] = {}

    def read(self, line: str) -> Info:
        found = self.seen[line] = _info(line)
        return found

    def peek(self, i: int) -> tuple[int, Info]:
        """The first line from `i` on that is no blank or comment line, and what it holds."""
        while i < self.end:
            found = self.get(self.lines[i]) or self.read(self.lines[i])
            if found[0] != _SKIP:
                return i, found
            i += 1
        return i, _END

    def document(self, i: int) -> tuple[dict[str, Any], Marks, int]:
        self.marks = {}
        first = self.get(self.lines[i]) or self.read(self.lines[i])
        if first[2] < 0:  # a sequence, not a mapping: libyaml reports it
            raise _Decline
        body, i = self.block(i, first, ())
        if self.peek(i)[1][0] != _SEPARATOR:  # a line less indented than the first
            raise _Decline
        return body, self.marks, i

    def block(self, i: int, first: Info, path: JsonPath, parent: int = -1) -> tuple[Any, int]:
        """The mapping or sequence starting at line `i`, which holds `first` (and is inside a
        line indented at `parent`)."""
        if len(path) >= MAX_DEPTH:  # its values would be nested too deep
            raise _Decline
        indent, _, column, _, _ = first
        self.marks[path] = (i + 1, indent + 1)
        if column < 0:
            return self.sequence(i, indent, path, indent == parent)
        return self.mapping(i, indent, path)

    def mapping(self, i: int, indent: int, path: JsonPath) -> tuple[dict[str, Any], int]:
        lines, marks, get, end = self.lines, self.marks, self.get, self.end
        keys = self.keys.get(path) or self.keys.setdefault(path, {})
        result: dict[str, Any] = {}
        while i < end:
            at, key, column, value, empty = get(lines[i]) or self.read(lines[i])
            if at != indent:
                if at == _SKIP:
                    i += 1
                    continue
                if at < indent:
                    break
                raise _Decline  # a continuation line, or an odd indentation
            if key is None or key in result:
                raise _Decline
            i += 1
            row = i  # the number (1-based) of the line read
            paths = keys.get(key)
            if paths is None:
                paths = keys[key] = (path + (key,), path + (key, "<value>"))
            where, value_at = paths
            marks[where] = (row, at + 1)
            if column:
                marks[value_at] = (row, at + column)
            else:
                j, next_line = self.peek(i)
                if next_line[0] > at or next_line[0] == at and next_line[2] < 0:
                    value, i = self.block(j, next_line, where, at)  # a sequence may be at `at`
                    marks[value_at] = marks[where]
                    marks[where] = (row, at + 1)
                else:
                    marks[value_at] = (row, at + empty)  # just after the colon
            result[key] = value
        return result, i

    def sequence(self, i: int, indent: int, path: JsonPath,
                 indentless: bool) -> tuple[list[Any], int]:
        lines, marks, get, end = self.lines, self.marks, self.get, self.end
        result: list[Any] = []
        while i < end:
            at, _, column, content, _ = get(lines[i]) or self.read(lines[i])
            if at != indent or column >= 0:
                if at == _SKIP:
                    i += 1
                    continue
                if at < indent or at == indent and indentless:
                    break  # (indentless: its key's mapping goes on)
                raise _Decline
            where = path + (len(result),)
            inner = get(content) or self.read(content)
            at, key, column, value, _ = inner
            if key is not None or column < 0:  # `- a: 1`, `- - 1`: a block on this line
                lines[i] = content
                value, i = self.block(i, inner, where)
            elif column:
                marks[where] = (i + 1, at + column)
                i += 1
            else:
                j, next_line = self.peek(i + 1)
                if next_line[0] > indent:
                    value, i = self.block(j, next_line, where)
                else:
                    marks[where] = (i + 1, indent + 2)  # just after the dash
                    i += 1
            result.append(value)
        return result, i
