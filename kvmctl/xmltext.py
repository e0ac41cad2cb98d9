"""The characters XML 1.0 can carry, the one place that says so.

XML 1.0 (section 2.2, production [2] Char) allows TAB, LF, CR, U+0020-U+D7FF, U+E000-U+FFFD
and U+10000-U+10FFFF. Anything else (NUL and the other C0 controls, lone surrogates, U+FFFE,
U+FFFF) cannot appear in a document at all, not even escaped as a character reference: libvirt
(libxml2) refuses the whole definition. Every manifest string and every command-line value that
can reach libvirt XML is checked against this before anything is rendered.
"""

from __future__ import annotations

import re

_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def first_non_xml_char(text: str) -> int:
    """The index of the first character XML 1.0 cannot carry in `text`, or -1."""
    if text.isascii() and text.isprintable():  # nearly every manifest string: no C0 control
        return -1
    found = _NOT_XML_CHAR.search(text)
    return found.start() if found else -1


def describe_char(char: str) -> str:
    """`U+0000` style name of one character (control characters have no printable form)."""
    return f"U+{ord(char):04X}"
