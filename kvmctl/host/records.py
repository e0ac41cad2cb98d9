"""Definition records: proof, kept on the hypervisor with each domain, that its persistent
definition has not drifted since kvmctl defined it.

Right after a define, kvmctl reads the definition back, checks that it has no owned difference
from what it sent (host/facts.py), and records in the domain's metadata (namespace
DEFINITION_NS) three digests: `desired`, of everything the definition was rendered from
(render.definitions.domain_digest); `rendered`, of the XML it was rendered to (with the code
that compares definitions); `defined`, of the definition libvirt returned (`config_digest`: the
text without this record). On the next plan, when the manifests give the same `desired` digest,
or render to the same XML, and the definition still has the `defined` digest, it is the
definition that was checked: it needs no parsing or comparing (and, in the first case, no
rendering; another version of kvmctl has other input digests and renders). Any other definition
(edited by hand, redefined by another tool, rewritten by a newer libvirt) has another digest
and is compared in full: drift is never missed, only the proof is lost until the next define.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from .. import units
from . import ownership

DEFINITION_NS = "https://kvmctl.dev/xmlns/definition/v1"
DEFINITION_KEY = "kvmctl-def"  # the prefix libvirt writes the record's element with

# libvirt writes a metadata element on one line, indented, with its namespace declared on it.
_OPENING = f'<{DEFINITION_KEY}:definition xmlns:{DEFINITION_KEY}="{DEFINITION_NS}"'
_ATTR = re.compile(r'\b(desired|rendered|defined)="([0-9a-f]{64})"')
_UUID = re.compile(r"[ \t]*<uuid>[^<]*</uuid>\n?")


@dataclass(frozen=True)
class DefinitionRecord:
    desired: str  # render.definitions.domain_digest of what was defined
    rendered: str  # rendered_digest of the XML it was rendered to
    defined: str  # config_digest of the definition libvirt returned right after


def _record_span(xml: str) -> tuple[int, int] | None:
    """Where the record's line is in `xml` (its indentation and newline included)."""
    start = xml.find(_OPENING)
    end = xml.find("/>", start)
    if start < 0 or end < 0 or "<" in xml[start + len(_OPENING):end]:
        return None
    while start and xml[start - 1] in " \t":
        start -= 1
    return start, end + (3 if xml.startswith("/>\n", end) else 2)


def find_record(xml: str) -> DefinitionRecord | None:
    """The definition record in a domain's persistent definition, if it has one."""
    span = _record_span(xml)
    if span is None:
        return None
    values = dict(_ATTR.findall(xml[span[0]:span[1]]))
    if set(values) != {"desired", "rendered", "defined"}:
        return None
    return DefinitionRecord(values["desired"], values["rendered"], values["defined"])


def text_digest(xml: str) -> str:
    """sha256 of a whole definition (what a plan's fingerprint of a domain holds: hashing the
    text is several times cheaper than quoting it into JSON)."""
    return hashlib.sha256(xml.encode("utf-8", "surrogatepass")).hexdigest()


def config_digest(xml: str) -> str:
    """sha256 of a persistent definition without its definition record (the record is written
    after the digest is taken, so the digest cannot cover it)."""
    span = _record_span(xml)
    return text_digest(xml if span is None else xml[:span[0]] + xml[span[1]:])


@lru_cache(maxsize=1)
def _comparison_fingerprint() -> str:
    """The code that decides what an owned difference is: facts and what they read."""
    digest = hashlib.sha256()
    for module in (facts_module(), ownership, units):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()


def rendered_digest(xml: str) -> str:
    """sha256 of a rendered definition without its uuid (a new domain's has none, a
    redefinition's carries the host's), and of the code that compares definitions."""
    text = _comparison_fingerprint() + _UUID.sub("", xml, count=1)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def proven(record: DefinitionRecord | None, desired: str, render: Callable[[], str],
           inactive_xml: str) -> bool:
    """Whether `inactive_xml` is, unchanged, the definition recorded as having no owned
    difference from the desired one: the one whose inputs have the digest `desired`, or,
    when those differ (another kvmctl version, a field the definition does not show), the one
    `render` gives, if it renders the same XML as then."""
    if record is None or record.defined != config_digest(inactive_xml):
        return False
    return (bool(desired) and record.desired == desired) or \
        record.rendered == rendered_digest(render())


def facts_module() -> ModuleType:
    from . import facts
    return facts
