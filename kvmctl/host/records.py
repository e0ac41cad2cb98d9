"""Definition records: proof, kept on the hypervisor with each domain, that its persistent
definition has not drifted since kvmctl defined it.

Right after a define, kvmctl reads the definition back, checks that it has no owned difference
from what it sent (host/facts.py), and records in the domain's metadata (namespace
DEFINITION_NS) two digests: `desired`, of everything the definition was rendered from
(render.definitions.domain_digest), and `defined`, of the definition libvirt returned
(`config_digest`: the text without this record). On the next plan, when the manifests give the
same `desired` digest and the definition still has the `defined` digest, the definition is the
one that was checked, so it needs no parsing or comparing. Any other definition (edited by hand,
redefined by another tool, rewritten by a newer libvirt) has another digest and is compared in
full: drift is never missed, only the proof is lost until the next define.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DEFINITION_NS = "https://kvmctl.dev/xmlns/definition/v1"
DEFINITION_KEY = "kvmctl-def"  # the prefix libvirt writes the record's element with

# libvirt writes a metadata element on one line, indented, with its namespace declared on it.
_RECORD = re.compile(r'[ \t]*<kvmctl-def:definition xmlns:kvmctl-def="'
                     + re.escape(DEFINITION_NS) + r'"([^<>]*)/>\n?')
_ATTR = re.compile(r'\b(desired|defined)="([0-9a-f]{64})"')


@dataclass(frozen=True)
class DefinitionRecord:
    desired: str  # render.definitions.domain_digest of what was defined
    defined: str  # config_digest of the definition libvirt returned right after


def find_record(xml: str) -> DefinitionRecord | None:
    """The definition record in a domain's persistent definition, if it has one."""
    if DEFINITION_NS not in xml:
        return None
    found = _RECORD.search(xml)
    if found is None:
        return None
    values = dict(_ATTR.findall(found.group(1)))
    if set(values) != {"desired", "defined"}:
        return None
    return DefinitionRecord(values["desired"], values["defined"])


def config_digest(xml: str) -> str:
    """sha256 of a persistent definition without its definition record (the record is written
    after the digest is taken, so the digest cannot cover it)."""
    if DEFINITION_NS in xml:
        xml = _RECORD.sub("", xml, count=1)
    return hashlib.sha256(xml.encode("utf-8", "surrogatepass")).hexdigest()


def proven(record: DefinitionRecord | None, desired: str, inactive_xml: str) -> bool:
    """Whether `inactive_xml` is, unchanged, the definition recorded as having no owned
    difference from what the digest `desired` renders."""
    return (record is not None and bool(desired) and record.desired == desired
            and record.defined == config_digest(inactive_xml))
