"""Who owns what on the host: kvmctl's metadata mark in domain and network definitions, and
the per-project ownership record volume in each pool (libvirt 9.0 has no metadata for pools
and volumes)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from lxml import etree

from ..kinds import NAMESPACE, RECORD_PREFIX, Kind, known_kind


@dataclass(frozen=True)
class Owner:
    project: str
    kind: Kind | str  # a Kind when kvmctl wrote it; whatever a foreign record says otherwise
    name: str
    spec_hash: str = ""
    seed_hash: str = ""
    protect: bool = False
    shutdown_timeout_s: float | None = None  # a VM's shutdownTimeout, for deletes of it


def resource_fields(root: etree._Element) -> dict[str, str] | None:
    """The fields of kvmctl's <resource> metadata element, by local name.

    libvirt's setMetadata puts only the element itself in our namespace, not its children, so
    children are matched by local name whatever their namespace.
    """
    found = resource_element(root)
    if found is None:
        return None
    return {etree.QName(child).localname: (child.text or "").strip() for child in found
            if isinstance(child.tag, str)}


def resource_element(root: etree._Element) -> etree._Element | None:
    """kvmctl's <resource> metadata element of a definition (or of a <metadata> fragment)."""
    return root.find(f"metadata/{{{NAMESPACE}}}resource")


def owner_from_xml(xml: str) -> Owner | None:
    """The kvmctl ownership mark in a domain or network definition, if any."""
    # Only the <metadata> element is looked at: it is self-contained (libvirt writes the
    # namespace declarations on its children), and most of a definition is not needed here.
    start, end = xml.find("<metadata>"), xml.find("</metadata>")
    if start < 0 or end < 0 or NAMESPACE not in xml[start:end]:
        return None
    fields = _plain_fields(xml[start:end])
    return _owner(fields) if fields is not None else parsed_owner(xml[start:end + 11])


# The mark as kvmctl writes it and libvirt keeps it: one element per field, plain text.
_RESOURCE = f'<kvmctl:resource xmlns:kvmctl="{NAMESPACE}">'
_FIELD = re.compile(r"<kvmctl:([a-z-]+)>([^<&]*)</kvmctl:\1>")
_UNUSUAL = ("&", "<!", "<?")  # entities, comments, CDATA, processing instructions


def _plain_fields(metadata: str) -> dict[str, str] | None:
    """The mark's fields read as text (a thousand domains are read per plan), or None when it
    is not written the plain way: then it is parsed as XML (parsed_owner)."""
    start = metadata.find(_RESOURCE)
    end = metadata.find("</kvmctl:resource>", start)
    if start < 0 or end < 0 or metadata.count(_RESOURCE) != 1:
        return None
    block = metadata[start + len(_RESOURCE):end]
    if any(sign in block for sign in _UNUSUAL):
        return None
    found = _FIELD.findall(block)
    # Every element in it is one of those fields or a label: anything else (attributes,
    # nesting, an empty element) is left to the parser.
    if block.count("<kvmctl:") != len(found) + block.count('<kvmctl:label key="'):
        return None
    return {name: text.strip() for name, text in found}


def parsed_owner(metadata: str) -> Owner | None:
    """The mark in a `<metadata>` element, parsed as XML."""
    try:
        fragment = etree.fromstring(("<x>" + metadata + "</x>").encode())
    except etree.XMLSyntaxError:
        return None
    fields = resource_fields(fragment)
    return _owner(fields) if fields is not None else None


def _owner(fields: dict[str, str]) -> Owner:
    return Owner(fields.get("project", ""), known_kind(fields.get("kind", "")),
                 fields.get("name", ""),
                 fields.get("spec-hash", ""), fields.get("seed-hash", ""),
                 fields.get("protect") == "true", _seconds(fields.get("shutdown-timeout")))


def _seconds(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value <= 86400 else None


# ---- ownership records ---------------------------------------------------------------------------
#
# A project's record in a pool lives in up to two volumes (libvirt cannot rename a volume):
#   kvmctl-owner-<project>.json       the record (the only one at rest; also the format-1 name)
#   kvmctl-owner-<project>.json.next  the next record, present only while it replaces the first
# A write puts the whole new record into `.json.next`, then rewrites `.json`, then removes
# `.json.next`; a `.json.next` that is complete therefore always holds the newest record, and an
# incomplete one never replaced anything. Readers take the complete `.json.next` if there is
# one, else the complete `.json`, else no record (see `choose_record`). Every record names its
# project and, from format 2 on, carries the sha256 of its content, so a slot cut short or
# overwritten half-way is recognised as such.
RECORD_SUFFIX = ".json"
NEXT_SUFFIX = ".json.next"  # does not end in RECORD_SUFFIX: no project's names collide
RECORD_FORMAT = 2
SLOT_BLOCK = 4096  # slots are whole blocks with room to grow, so most rewrites fit in place


def record_names(project: str) -> tuple[str, str]:
    """The names of a project's record volume and of its next-record volume."""
    return f"{RECORD_PREFIX}{project}{RECORD_SUFFIX}", f"{RECORD_PREFIX}{project}{NEXT_SUFFIX}"


def parse_record_name(name: str) -> tuple[str, bool] | None:
    """(project, is the next-record slot) of a record volume's name; None if it is not one."""
    if not name.startswith(RECORD_PREFIX):
        return None
    rest = name[len(RECORD_PREFIX):]
    for suffix, is_next in ((RECORD_SUFFIX, False), (NEXT_SUFFIX, True)):
        if rest.endswith(suffix):
            return rest[:-len(suffix)], is_next
    return None


def slot_capacity(length: int) -> int:
    """The size of a new record slot for `length` bytes: whole blocks, with as much room again
    for the record to grow before a rewrite no longer fits in place."""
    return max(SLOT_BLOCK, -(-2 * length // SLOT_BLOCK) * SLOT_BLOCK)


def _digest(body: dict[str, object]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class OwnershipRecord:
    """What one project owns in one pool: the pool itself and/or some of its volumes."""

    project: str
    owns_pool: bool
    volumes: dict[str, Owner]

    @property
    def empty(self) -> bool:
        return not self.owns_pool and not self.volumes

    def to_json(self) -> bytes:
        body: dict[str, object] = {
            "version": RECORD_FORMAT, "project": self.project, "owns_pool": self.owns_pool,
            "volumes": {name: [str(o.kind), o.name, o.spec_hash, o.protect]
                        for name, o in sorted(self.volumes.items())}}
        return json.dumps({**body, "digest": _digest(body)}, indent=1).encode()

    @staticmethod
    def from_json(data: bytes, project: str | None = None) -> OwnershipRecord | None:
        """The record in a slot's bytes (zero padding ignored), or None if they are not one
        complete record (of `project`, if given): cut short, torn, of an unknown format.

        Format 1 (no version or version 1, no digest) is what kvmctl wrote before records had
        two slots; it was always written whole into a new volume, so a cut-short one does not
        parse as JSON.
        """
        try:
            raw = json.loads(data.rstrip(b"\0").decode() or "{}")
            if not isinstance(raw, dict):
                return None
            version = raw.get("version", 1)
            if version == RECORD_FORMAT:
                digest = raw.pop("digest", None)
                if digest != _digest(raw):
                    return None
            elif version != 1:
                return None
            owner = raw["project"]
            if not isinstance(owner, str) or (project is not None and owner != project):
                return None
            listed = raw.get("volumes", {})
            if not isinstance(listed, dict):
                return None
            volumes = {str(name): Owner(owner, known_kind(str(kind)), str(obj), str(spec), "",
                                        bool(protect))
                       for name, (kind, obj, spec, protect) in listed.items()}
            return OwnershipRecord(owner, bool(raw.get("owns_pool")), volumes)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None


def choose_record(project: str, current: bytes | None, pending: bytes | None
                  ) -> OwnershipRecord | None:
    """A project's record from the bytes of its two slots (None: that slot does not exist).

    A complete next-record slot is the newest record (it is complete before the record slot is
    touched, and removed only once that slot holds the same); an incomplete one is a write that
    never replaced anything, so the record slot is still the record. Neither complete: no record
    -- a first write cut short, which claimed nothing yet (claims precede creations).
    """
    for data in (pending, current):
        if data is not None and (record := OwnershipRecord.from_json(data, project)):
            return record
    return None
