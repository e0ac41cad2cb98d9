"""`kvmctl import`: manifests written from what a hypervisor has, and proven to change nothing.

From a host's live state (host/state.py) this package writes the documents that declare its
objects: a VirtualMachine in the manifest's own terms (sizes with units, every MAC written out,
the machine type as a manifest says it), a Disk for each of its volumes that lives in a pool,
the Networks and StoragePools it uses (references are followed unless told not to).

Nothing is lost silently. Two checks stand between the host and the files:
- every element of a definition the manifests cannot express is listed with its XML path
  (`unmanaged`): an object with any is not imported unless the caller keeps them unmanaged;
- the documents are validated and planned with --adopt against the same live state, in this
  process: any change but the ownership marks (a field, a restart, a replace) is a problem of
  the import, listed with the field, and the object is not imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from ..host import facts
from ..host.state import LiveDomain, LiveNetwork, LivePool, LiveState, LiveVolume
from ..kinds import Kind, ref
from ..plan import xmledit
from ..plan.types import Plan
from ..units import format_kib, format_size

API_VERSION = "kvmctl/v1"
# A kvmctl object's name (common.schema.json#/$defs/name): an object the host names otherwise
# cannot be declared under its name, and is refused alone.
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

@dataclass(frozen=True)
class Unmanaged:
    """An element of an object's definition the manifests cannot express."""

    ref: str
    path: str  # its XML path, with 1-based indexes where there are several
    xml: str  # the element, as the host has it
    why: str = "the manifests do not model it"


@dataclass(frozen=True)
class Imported:
    """What an import found: the documents (plain values, in apply order), what it could not
    express, and notes (a disk outside any pool, a volume whose name kvmctl cannot keep)."""

    documents: tuple[dict[str, Any], ...]
    unmanaged: tuple[Unmanaged, ...] = ()
    notes: tuple[str, ...] = ()
    refused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # ref -> why

    @property
    def refs(self) -> list[str]:
        return [ref(d["kind"], d["metadata"]["name"]) for d in self.documents]


def document(kind: Kind, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": str(kind), "metadata": {"name": name},
            "spec": spec}


# ---- selection ------------------------------------------------------------------------------

def select(live: LiveState, wanted: Iterable[str], everything: bool, follow: bool
           ) -> tuple[list[tuple[Kind, str]], list[str]]:
    """The objects to import, in apply order, and the refs asked for that the host lacks.
    With `follow`, a VM brings its networks and its disks' pools, a Disk its pool."""
    picked: list[tuple[Kind, str]] = []
    missing: list[str] = []
    if everything:
        picked += [(Kind.POOL, p) for p in live.pools]
        picked += [(Kind.NETWORK, n) for n in live.networks]
        picked += [(Kind.VM, d) for d in live.domains]
    for text in wanted:
        kind_text, _, name = text.partition("/")
        kind = _kind(kind_text)
        have = {Kind.POOL: set(live.pools), Kind.NETWORK: set(live.networks),
                Kind.VM: set(live.domains)}.get(kind) if kind else None
        if kind is None or have is None or name not in have:
            missing.append(text)
            continue
        picked.append((kind, name))
    if follow:
        resolve = facts.volume_resolver(live)
        for kind, name in list(picked):
            if kind is Kind.VM:
                f = facts.domain_facts(live.domains[name].inactive_xml, resolve)
                for value in f.values():
                    if isinstance(value, facts.DiskFact) and isinstance(value.source, tuple) \
                            and value.source[0]:
                        picked.append((Kind.POOL, str(value.source[0])))
                    if isinstance(value, facts.NicFact) and value.type == "network" \
                            and value.source and value.source in live.networks:
                        picked.append((Kind.NETWORK, value.source))
    order = {Kind.POOL: 0, Kind.NETWORK: 1, Kind.VM: 2}
    seen: dict[tuple[Kind, str], None] = {}
    for item in sorted(picked, key=lambda kn: order[kn[0]]):
        seen.setdefault(item, None)
    return list(seen), missing


def _kind(text: str) -> Kind | None:
    aliases = {"vm": Kind.VM, "virtualmachine": Kind.VM, "network": Kind.NETWORK,
               "storagepool": Kind.POOL, "pool": Kind.POOL}
    return aliases.get(text.lower())


# ---- documents ------------------------------------------------------------------------------

def pool_document(pool: LivePool) -> tuple[dict[str, Any] | None, str | None]:
    root = facts.tree(pool.xml) if pool.xml else None
    kind = root.get("type") if root is not None else None
    if kind != "dir":
        return None, (f"StoragePool/{pool.name} is of type {kind!r}: kvmctl manages dir pools "
                      "only")
    spec: dict[str, Any] = {"type": "dir", "path": pool.path, "autostart": pool.autostart}
    return document(Kind.POOL, pool.name, spec), None


def disk_document(vol: LiveVolume) -> tuple[dict[str, Any] | None, str | None]:
    """A Disk for a volume whose name kvmctl would give it (NAME.FORMAT)."""
    suffix = f".{vol.format}"
    if vol.format not in ("qcow2", "raw") or not vol.name.endswith(suffix) \
            or len(vol.name) == len(suffix):
        return None, (f"volume {vol.pool}/{vol.name} ({vol.format}): kvmctl names a Disk's "
                      f"volume NAME.FORMAT (qcow2 or raw), so it cannot take this one over "
                      f"as it is; copy it to such a name (virsh vol-clone {vol.name} "
                      f"NAME.{vol.format if vol.format in ('qcow2', 'raw') else 'qcow2'} "
                      f"--pool {vol.pool}) and point the VM at the copy")
    if vol.backing_path:
        return None, (f"volume {vol.pool}/{vol.name} is an overlay of {vol.backing_path}: "
                      "importing backing chains is not supported yet")
    name = vol.name[:-len(suffix)]
    if not NAME.match(name):
        return None, (f"volume {vol.pool}/{vol.name}: {name!r} is not a name a Disk can have "
                      "(lower-case letters, digits, '.', '_' and '-'); copy it to such a name")
    spec: dict[str, Any] = {"pool": vol.pool, "size": format_size(vol.capacity_bytes),
                            "format": vol.format}
    return document(Kind.DISK, name, spec), None


def network_document(net: LiveNetwork) -> tuple[dict[str, Any] | None, list[str]]:
    """The Network, and what of it the manifests cannot say."""
    f = facts.network_facts(net.xml)
    root = facts.tree(net.xml)
    problems: list[str] = []
    mode = f["mode"]
    if mode not in ("nat", "isolated", "route", "bridge"):
        return None, [f"Network/{net.name}: forward mode {mode!r} is not one kvmctl manages"]
    spec: dict[str, Any] = {"mode": mode}
    bridge = root.find("bridge")
    if bridge is not None and bridge.get("name"):
        spec["bridge"] = bridge.get("name")
    ipv4 = f.get("ipv4")
    if isinstance(ipv4, facts.Ipv4Fact) and ipv4.address and ipv4.prefix:
        import ipaddress
        iface = ipaddress.ip_interface(f"{ipv4.address}/{ipv4.prefix}")
        block: dict[str, Any] = {"cidr": str(iface.network)}
        if iface.ip != next(iface.network.hosts()):
            block["gateway"] = str(iface.ip)
        dhcp = f.get("dhcp.range")
        if isinstance(dhcp, facts.RangeFact) and dhcp.start and dhcp.end:
            block["dhcp"] = {"start": dhcp.start, "end": dhcp.end}
        spec["ipv4"] = block
    dns_hosts = f.get("dns.hosts") or ()
    if f.get("domain") or dns_hosts:
        dns: dict[str, Any] = {}
        if f.get("domain"):
            dns["domain"] = f["domain"]
        if dns_hosts:
            dns["hosts"] = [{"ip": h.ip, "hostnames": list(h.hostnames)} for h in dns_hosts]
        spec["dns"] = dns
    if f.get("mtu"):
        spec["mtu"] = f["mtu"]
    spec["autostart"] = net.autostart  # written out: kvmctl's default is true
    return document(Kind.NETWORK, net.name, spec), problems


def vm_document(dom: LiveDomain, live: LiveState, disk_names: Mapping[tuple[str, str], str],
                reservations: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The VirtualMachine for a domain; problems: what of it has no manifest field."""
    resolve = facts.volume_resolver(live)
    f = facts.domain_facts(dom.inactive_xml, resolve)
    root = facts.tree(dom.inactive_xml)
    problems: list[str] = []
    spec: dict[str, Any] = {}
    vcpus, vmax = f.get("vcpus"), f.get("vcpus.max")
    spec["cpus"] = {"count": vcpus, "max": vmax} if vcpus != vmax else vcpus
    mem, mmax = f.get("memory"), f.get("memory.max")
    if isinstance(mem, int) and isinstance(mmax, int):
        spec["memory"] = ({"size": format_kib(mem), "max": format_kib(mmax)} if mem != mmax
                          else format_kib(mem))
    if f.get("machine"):
        spec["machine"] = f["machine"]
    spec["firmware"] = f["firmware"]
    if f.get("type"):
        spec["domainType"] = f["type"]
    if f.get("cpu.mode"):
        cpu: dict[str, Any] = {"mode": f["cpu.mode"]}
        if f.get("cpu.model"):
            cpu["model"] = f["cpu.model"]
        spec["cpu"] = cpu
    boot: dict[str, Any] = {}
    order = f.get("boot.order") or ("hd",)
    if tuple(order) != ("hd",):
        boot["order"] = list(order)
    for key in ("kernel", "initrd", "cmdline"):
        if f.get(f"boot.{key}"):
            boot[key] = f[f"boot.{key}"]
    if boot:
        spec["boot"] = boot
    disks = []
    for el in root.iterfind("devices/disk"):
        key_fact = facts.domain_facts(_wrap(el), resolve)
        fact = next((v for v in key_fact.values() if isinstance(v, facts.DiskFact)), None)
        target = el.find("target")
        dev = target.get("dev") if target is not None else "?"
        if fact is None:
            continue
        if fact.device != "disk" or el.get("type") not in (None, "file", "volume"):
            continue  # listed as unmanaged (xmledit.unmanaged): kept with keepUnmanaged
        if not isinstance(fact.source, tuple) or (fact.source[0], fact.source[1]) not in \
                disk_names:
            problems.append(f"devices/disk[@dev='{dev}']: {fact.source!r} is not a volume "
                            "kvmctl can declare as a Disk (see the notes)")
            continue
        entry: dict[str, Any] = {"disk": disk_names[(str(fact.source[0]),
                                                     str(fact.source[1]))]}
        if fact.bus and fact.bus != "virtio":
            entry["bus"] = fact.bus
        if fact.readonly:
            entry["readonly"] = True
        disks.append(entry)
    if disks:
        spec["disks"] = disks
    nics = []
    for el in root.iterfind("devices/interface"):
        mac = el.find("mac")
        source = el.find("source")
        model = el.find("model")
        link = el.find("link")
        kind = el.get("type")
        address = mac.get("address") if mac is not None else None
        if kind not in ("network", "bridge") or source is None or address is None:
            problems.append(f"devices/interface[@type='{kind}']: kvmctl attaches NICs to a "
                            "network or a host bridge")
            continue
        nic: dict[str, Any] = ({"network": source.get("network")} if kind == "network"
                               else {"bridge": source.get("bridge")})
        nic["mac"] = address.lower()
        if address.lower() in reservations:
            nic["ip"] = reservations[address.lower()]
        if model is not None and model.get("type") and model.get("type") != "virtio":
            nic["model"] = model.get("type")
        if link is not None and link.get("state") == "down":
            nic["linkState"] = "down"
        nics.append(nic)
    if nics:
        spec["interfaces"] = nics
    graphics = f.get("graphics") or ()
    if graphics:
        kind, listen = graphics[0]
        spec["graphics"] = {"type": kind, "listen": listen} if listen else kind
    if f.get("console.log"):
        spec["console"] = {"log": f["console.log"]}
    if f.get("guestAgent"):
        spec["guestAgent"] = True
    if dom.autostart:
        spec["autostart"] = True
    spec["state"] = "running" if dom.running else "stopped"
    return document(Kind.VM, dom.name, spec), problems


def _wrap(disk: etree._Element) -> str:
    return ("<domain><devices>" + etree.tostring(disk, encoding="unicode")
            + "</devices></domain>")


# ---- what the manifests cannot say ----------------------------------------------------------

def unmanaged_elements(ref_text: str, xml: str) -> list[Unmanaged]:
    """Every element of a domain definition outside what kvmctl renders or libvirt adds."""
    return [Unmanaged(ref_text, path, etree.tostring(el, encoding="unicode").strip(), why)
            for path, _, el, why in xmledit.unmanaged(xml)]


# ---- the whole import -----------------------------------------------------------------------

def build(live: LiveState, picked: list[tuple[Kind, str]], keep_unmanaged: bool = False
          ) -> Imported:
    docs: list[dict[str, Any]] = []
    notes: list[str] = []
    refused: dict[str, tuple[str, ...]] = {}
    unmanaged: list[Unmanaged] = []
    pools_done: set[str] = set()
    picked = list(picked)
    for kind, name in list(picked):
        if not NAME.match(name):
            refused[ref(kind, name)] = (
                f"its name {name!r} is not one a kvmctl object can have (lower-case letters, "
                "digits, '.', '_' and '-', at most 63, starting with a letter or digit): "
                "rename it on the host first (virsh domrename, or define a copy)",)
            picked.remove((kind, name))
    for kind, name in picked:
        if kind is Kind.POOL and name not in pools_done:
            pools_done.add(name)
            doc, why = pool_document(live.pools[name])
            if doc is None:
                refused[ref(kind, name)] = (why or "",)
            else:
                docs.append(doc)
        elif kind is Kind.NETWORK:
            doc, problems = network_document(live.networks[name])
            if doc is None or problems:
                refused[ref(kind, name)] = tuple(problems)
            else:
                docs.append(doc)
    reservations = _reservations(live)
    for kind, name in picked:
        if kind is not Kind.VM:
            continue
        dom = live.domains[name]
        vm_ref = ref(Kind.VM, name)
        disk_names: dict[tuple[str, str], str] = {}
        disk_docs: list[dict[str, Any]] = []
        resolve = facts.volume_resolver(live)
        for value in facts.domain_facts(dom.inactive_xml, resolve).values():
            if not isinstance(value, facts.DiskFact) or value.device != "disk":
                continue
            if isinstance(value.source, tuple) and value.source[0] and value.source[1]:
                vol = live.volume(str(value.source[0]), str(value.source[1]))
                if vol is None:
                    continue
                doc, why = disk_document(vol)
                if doc is None:
                    notes.append(why or "")
                    continue
                if value.shareable:  # attached to several VMs at once, as the host has it
                    doc["spec"]["shareable"] = True
                disk_names[(vol.pool, vol.name)] = doc["metadata"]["name"]
                disk_docs.append(doc)
            elif isinstance(value.source, str):
                folder = value.source.rsplit("/", 1)[0] or "/"
                notes.append(f"{vm_ref}: disk {value.source} is in no pool: a StoragePool "
                             f"over {folder} would cover it (kind: StoragePool, spec: "
                             f"{{type: dir, path: {folder}}}), then import again")
        doc, problems = vm_document(dom, live, disk_names, reservations)
        elements = unmanaged_elements(vm_ref, dom.inactive_xml)
        unmanaged += elements
        if elements and keep_unmanaged:
            doc["spec"]["keepUnmanaged"] = True
        if problems:
            refused[vm_ref] = tuple(problems)
            continue
        docs += [d for d in disk_docs if d not in docs]
        docs.append(doc)
    return Imported(tuple(_in_order(docs)), tuple(unmanaged), tuple(notes), refused)


def _reservations(live: LiveState) -> dict[str, str]:
    """MAC -> the address a network's DHCP reserves for it."""
    out: dict[str, str] = {}
    for net in live.networks.values():
        for host in facts.network_facts(net.xml).get("dhcp.hosts") or ():
            if host.ip:
                out[host.mac.lower()] = host.ip
    return out


def _in_order(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {str(Kind.POOL): 0, str(Kind.DISK): 1, str(Kind.NETWORK): 2, str(Kind.VM): 3}
    return sorted(docs, key=lambda d: rank.get(d["kind"], 9))


# ---- the proof: a plan with --adopt over the same live state --------------------------------

# Steps an adopting plan may hold for an object whose documents say what the host has: the
# ownership marks (a domain's and a network's in their metadata, a volume's and a pool's in
# the pool's record) and kvmctl's definition record.
_OWNERSHIP_STEPS = ("DefineDomain", "SetMetadataLive", "ClaimVolume", "ClaimPool",
                    "DefineNetwork")


# Fields an adopting plan shows because the marks are added: the ownership itself.
_OWNERSHIP_FIELDS = frozenset({"metadata", "owner", "ownership"})


def adopt_plan(docs: list[dict[str, Any]], live: LiveState, project: str,
               domain_type: str) -> Plan:
    """The plan an `apply --adopt` of `docs` would run on the host read as `live`: validated
    with the host's other objects (a network a VM uses, with --no-follow) as a plan sees them.
    ManifestError when the documents do not validate (an import bug: reported as such)."""
    import yaml

    from ..engine import host_facts
    from ..manifest import documents, validate
    from ..plan import Options, make_plan
    from ..render.definitions import render_desired
    text = yaml.safe_dump_all(docs, sort_keys=False)
    m = validate.validate(documents.parse_text(text, "import.yaml"), host_facts(live))
    return make_plan(m, render_desired(m, project, domain_type, live.hints()), live,
                     Options(project, adopt=True))


def prove(plan: Plan) -> dict[str, list[str]]:
    """What the adopting plan would change on the host besides ownership, by ref ({} when
    nothing): the fields it would change, a restart, a replace, a create, a block."""
    from ..plan.types import ChangeClass
    out: dict[str, list[str]] = {}
    for c in plan.changes:
        why: list[str] = []
        if c.change_class in (ChangeClass.REPLACE, ChangeClass.DELETE,
                              ChangeClass.UPDATE_RESTART) or c.pending_restart:
            why.append(f"{c.change_class}" + (": " + "; ".join(c.reasons) if c.reasons else ""))
        if c.change_class is ChangeClass.CREATE:
            why.append("would be created: " + "; ".join(c.reasons))
        why += [f"{d.field}: {d.old!r} -> {d.new!r}" for d in c.fields
                if not d.sensitive and d.field not in _OWNERSHIP_FIELDS]
        why += [f"step {type(st).__name__}" for st in c.steps
                if type(st).__name__ not in _OWNERSHIP_STEPS]
        if c.blocked:
            why.append(f"blocked: {c.blocked}")
        if why:
            out[c.ref] = why
    return out


def added_devices(plan: Plan, live: LiveState) -> dict[str, list[str]]:
    """Devices the adopting plan gives a VM that its definition lacks (kvmctl's VMs have a
    virtio RNG and a memory balloon), by ref: not a field of the manifests, so not refused,
    but said (the guest sees them at its next boot)."""
    from ..plan.steps import DefineDomain
    out: dict[str, list[str]] = {}
    for c in plan.changes:
        dom = live.domains.get(c.name) if c.kind is Kind.VM else None
        for step in c.steps:
            if dom is None or not isinstance(step, DefineDomain):
                continue
            have = {el.tag for el in facts.tree(dom.inactive_xml).iterfind("devices/*")}
            new = sorted({el.tag for el in facts.tree(step.xml).iterfind("devices/*")} - have)
            if new:
                out[c.ref] = new
    return out
