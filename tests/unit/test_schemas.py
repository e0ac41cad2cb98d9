"""The JSON Schemas in schemas/, and the manifests in examples/ that must satisfy them.

Five kind schemas describe the objects kvmctl plans; project.schema.json describes the project
file (kind Project, `kvmctl.yaml`), a document that configures a run and declares no object.

Schemas are loaded the way the validator loads them: every *.schema.json into one
referencing.Registry keyed by its $id; kind schemas reach common.schema.json through relative
$refs resolved against their own $id.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
EXAMPLES = ROOT / "examples"
BASE_ID = "https://kvmctl.dev/schemas/v1/"
KINDS = ("StoragePool", "Image", "Disk", "Network", "VirtualMachine", "Snapshot")
PROJECT = "Project"  # the project file's kind: a document schema, not an object kind
DOCUMENT_KINDS = (*KINDS, PROJECT)
PROJECT_FILE = "kvmctl.yaml"
SCHEMA_FILES = sorted(p.name for p in SCHEMAS.glob("*.schema.json"))
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")

# Objects that are maps or free-form by design (no `properties`, any keys allowed).
FREE_FORM_OBJECTS = {
    "common.schema.json#/$defs/labels",
    "virtualmachine.schema.json#/properties/spec/properties/cloudInit/properties/userData",
    "virtualmachine.schema.json#/properties/spec/properties/cloudInit/properties/networkConfig",
}


def _load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text(encoding="utf-8"))


ALL = {name: _load(name) for name in SCHEMA_FILES}
REGISTRY: Registry = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012))
    for schema in ALL.values())


def validator_for(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=REGISTRY,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def kind_validator(kind: str) -> Draft202012Validator:
    return validator_for(ALL[f"{kind.lower()}.schema.json"])


def errors(kind: str, doc: dict[str, Any]) -> list[Any]:
    return list(kind_validator(kind).iter_errors(doc))


# ----------------------------------------------------------------------------- walking schemas

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "contains", "not", "if", "then",
               "else", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


def _esc(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (JSON pointer, subschema) in `schema`, itself included; annotations are skipped."""
    if not isinstance(schema, dict):
        return
    yield pointer, schema
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            yield from subschemas(sub, f"{pointer}/{key}/{_esc(name)}")
    for key in _SCHEMA_ONE:
        if key in schema:
            yield from subschemas(schema[key], f"{pointer}/{key}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()):
            yield from subschemas(sub, f"{pointer}/{key}/{i}")


def _is_object_type(schema: dict[str, Any]) -> bool:
    t = schema.get("type")
    return t == "object" or (isinstance(t, list) and "object" in t)


def all_subschemas() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for name, schema in ALL.items():
        for pointer, sub in subschemas(schema):
            yield name, pointer, sub


# ----------------------------------------------------------------------------- examples/

def example_files() -> list[Path]:
    return sorted(EXAMPLES.rglob("*.yaml")) + sorted(EXAMPLES.rglob("*.yml"))


def split_documents(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(raw text, parsed value) of each YAML document in the file."""
    text = path.read_text(encoding="utf-8")
    chunks = re.split(r"(?m)^---[ \t]*$\n?", text)
    out = []
    for chunk in chunks:
        value = yaml.safe_load(chunk)
        if value is None:
            continue
        out.append((chunk, value))
    # The chunking above must agree with a real multi-document parse.
    assert [v for _, v in out] == [d for d in yaml.safe_load_all(text) if d is not None], path
    return out


def example_documents() -> list[tuple[str, Path, str, dict[str, Any]]]:
    docs = []
    for path in example_files():
        for i, (raw, value) in enumerate(split_documents(path)):
            ident = f"{path.relative_to(EXAMPLES)}#{i}"
            docs.append((ident, path, raw, value))
    return docs


EXAMPLE_DOCS = example_documents()


# ============================================================================= schema files


def test_expected_schema_files_exist() -> None:
    expected = {f"{k.lower()}.schema.json" for k in DOCUMENT_KINDS} | {"common.schema.json"}
    assert set(SCHEMA_FILES) == expected
    assert (SCHEMAS / "__init__.py").exists()


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = ALL[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == BASE_ID + name
    assert schema.get("title") and schema.get("description")
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_schema_covers_the_whole_document(kind: str) -> None:
    schema = ALL[f"{kind.lower()}.schema.json"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["apiVersion", "kind", "metadata", "spec"]
    assert schema["properties"]["kind"]["const"] == kind


def test_project_schema_is_a_document_schema() -> None:
    """A Project document has no required spec (every field has a default) and is closed."""
    schema = ALL["project.schema.json"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["apiVersion", "kind", "metadata"]
    assert schema["properties"]["kind"]["const"] == PROJECT


def test_project_vm_defaults_are_virtualmachine_spec_fields() -> None:
    """Each VM default is the VirtualMachine spec field of the same name, by reference."""
    vm_defaults = (ALL["project.schema.json"]["properties"]["spec"]["properties"]["defaults"]
                   ["properties"]["virtualMachine"]["properties"])
    vm_spec = ALL["virtualmachine.schema.json"]["properties"]["spec"]["properties"]
    assert vm_defaults
    for key, sub in vm_defaults.items():
        assert key in vm_spec, key
        assert sub["$ref"] == f"virtualmachine.schema.json#/properties/spec/properties/{key}"
    # What places a VM, names it, or attaches it to other objects is no default.
    assert not set(vm_defaults) & {"host", "disks", "interfaces", "cloudInit", "boot"}


def test_refs_are_relative_to_common_or_local() -> None:
    """Relative refs work both in a $id-keyed registry and in editors (sibling files)."""
    for name, pointer, sub in all_subschemas():
        target = sub.get("$ref")
        if target is None:
            continue
        file, hash_, fragment = target.partition("#")
        assert hash_ and fragment.startswith("/"), (name, pointer, target)
        assert file == "" or file in SCHEMA_FILES, (name, pointer, target)  # a sibling file
        resolved = REGISTRY.resolver(base_uri=ALL[name]["$id"]).lookup(target)
        assert isinstance(resolved.contents, dict), (name, pointer, target)


def test_no_format_keyword() -> None:
    """Patterns assert everything; `format` would depend on which format checkers are installed."""
    for name, pointer, sub in all_subschemas():
        assert "format" not in sub, (name, pointer)


def test_every_property_has_description_and_examples() -> None:
    missing = []
    for name, pointer, sub in all_subschemas():
        if not (_is_object_type(sub) and "properties" in sub):
            continue
        for prop, prop_schema in sub["properties"].items():
            where = f"{name}#{pointer}/properties/{prop}"
            if not isinstance(prop_schema, dict):
                missing.append(f"{where}: boolean schema")
                continue
            if not str(prop_schema.get("description", "")).strip():
                missing.append(f"{where}: description")
            if not prop_schema.get("examples"):
                missing.append(f"{where}: examples")
    assert not missing, "\n".join(missing)


def test_every_definition_has_description_and_examples() -> None:
    for name, schema in ALL.items():
        for def_name, sub in schema.get("$defs", {}).items():
            assert sub.get("description") and sub.get("examples"), (name, def_name)


def test_objects_are_closed() -> None:
    """Every object with declared properties rejects unknown ones; maps are listed explicitly."""
    problems = []
    for name, pointer, sub in all_subschemas():
        if not _is_object_type(sub):
            continue
        where = f"{name}#{pointer}"
        if "properties" in sub:
            if sub.get("additionalProperties") is not False:
                problems.append(f"{where}: additionalProperties is not false")
        elif where not in FREE_FORM_OBJECTS:
            problems.append(f"{where}: object without properties")
    assert not problems, "\n".join(problems)


def test_schema_examples_are_valid() -> None:
    """Every `examples` value in every (sub)schema is valid against that (sub)schema."""
    bad = []
    for name, pointer, sub in all_subschemas():
        if "examples" not in sub:
            continue
        wrapper = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                   "$ref": f"{ALL[name]['$id']}#{pointer}"}
        validator = validator_for(wrapper)
        for example in sub["examples"]:
            err = best_match(validator.iter_errors(example))
            if err is not None:
                bad.append(f"{name}#{pointer}: {example!r}: {err.message}")
    assert not bad, "\n".join(bad)


def test_defaults_are_valid() -> None:
    bad = []
    for name, pointer, sub in all_subschemas():
        if "default" not in sub:
            continue
        wrapper = {"$ref": f"{ALL[name]['$id']}#{pointer}"}
        err = best_match(validator_for(wrapper).iter_errors(sub["default"]))
        if err is not None:
            bad.append(f"{name}#{pointer}: {sub['default']!r}: {err.message}")
    assert not bad, "\n".join(bad)


# ============================================================================= examples/


def test_example_folders() -> None:
    folders = {p.name for p in EXAMPLES.iterdir() if p.is_dir()}
    assert {"quickstart", "lab", "bridged", "cloud-image"} <= folders
    for folder in folders:
        assert list((EXAMPLES / folder).glob("*.yaml")), folder
    assert (EXAMPLES / "cloud-image" / "README.md").is_file()


@pytest.mark.parametrize("ident,path,raw,doc", EXAMPLE_DOCS, ids=[d[0] for d in EXAMPLE_DOCS])
def test_example_document_is_valid(ident: str, path: Path, raw: str, doc: dict[str, Any]) -> None:
    assert doc.get("kind") in DOCUMENT_KINDS, ident
    # A Project document is the project file, alone in kvmctl.yaml; nothing else is there.
    assert (doc["kind"] == PROJECT) == (path.name == PROJECT_FILE), ident
    errs = errors(doc["kind"], doc)
    assert not errs, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errs)


@pytest.mark.parametrize("ident,path,raw,doc", EXAMPLE_DOCS, ids=[d[0] for d in EXAMPLE_DOCS])
def test_example_document_has_modeline(ident: str, path: Path, raw: str,
                                      doc: dict[str, Any]) -> None:
    first = raw.lstrip("\n").splitlines()[0]
    match = MODELINE.match(first)
    assert match, f"{ident}: first line must be the yaml-language-server modeline, got {first!r}"
    target = (path.parent / match.group(1)).resolve()
    assert target == (SCHEMAS / f"{doc['kind'].lower()}.schema.json").resolve(), ident


def _folder_objects(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The objects a folder declares (its project file is none)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for _, path, _, doc in EXAMPLE_DOCS:
        if path.parent == folder and doc["kind"] != PROJECT:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"duplicate {key} in {folder.name}"
            objects[key] = doc["spec"]
    return objects


def _folder_project(folder: Path) -> dict[str, Any]:
    """The folder's project file: one Project document in kvmctl.yaml."""
    projects = [doc for _, path, _, doc in EXAMPLE_DOCS
                if path.parent == folder and doc["kind"] == PROJECT]
    assert len(projects) == 1, f"{folder.name}: {len(projects)} Project documents"
    assert len(split_documents(folder / PROJECT_FILE)) == 1, folder.name
    return projects[0]


@pytest.mark.parametrize("folder", sorted({d[1].parent for d in EXAMPLE_DOCS}),
                         ids=lambda p: p.name)
def test_example_folder_is_self_consistent(folder: Path) -> None:
    """References resolve inside the folder; addresses fit their networks; objects are placed
    on hosts of the folder's project file, with what a VM uses on the VM's host."""
    objects = _folder_objects(folder)
    project = _folder_project(folder)
    assert project["metadata"]["name"] == folder.name
    hosts = [h["name"] for h in project.get("spec", {}).get("hosts", [{"name": "default"}])]
    assert len(set(hosts)) == len(hosts), folder.name
    default = project.get("spec", {}).get("defaultHost", hosts[0])
    assert default in hosts, folder.name

    def has(kind: str, name: str) -> bool:
        return (kind, name) in objects

    def hosts_of(kind: str, name: str) -> set[str]:
        wanted = objects[(kind, name)].get("hosts", [default])
        assert wanted == "all" or set(wanted) <= set(hosts), (kind, name, wanted)
        return set(hosts) if wanted == "all" else set(wanted)

    for (kind, name), spec in objects.items():
        if kind in ("Network", "StoragePool", "Image"):
            hosts_of(kind, name)
        if kind == "VirtualMachine":
            host = spec.get("host", default)
            assert host in hosts, (name, host)
            for nic in spec.get("interfaces", []):
                if "network" in nic:
                    assert host in hosts_of("Network", nic["network"]), (name, nic)
            for attachment in spec.get("disks", []):
                disk = objects[("Disk", attachment["disk"])]
                assert host in hosts_of("StoragePool", disk["pool"]), (name, attachment)
                if "image" in disk:
                    assert host in hosts_of("Image", disk["image"]), (name, attachment)
        if kind in ("Image", "Disk"):
            assert has("StoragePool", spec["pool"]), (name, spec["pool"])
        if kind == "Disk" and "image" in spec:
            assert has("Image", spec["image"]), (name, spec["image"])
        if kind == "Network" and "ipv4" in spec:
            net = ipaddress.ip_network(spec["ipv4"]["cidr"])  # strict: host bits are zero
            dhcp = spec["ipv4"].get("dhcp")
            if dhcp:
                start, end = (ipaddress.ip_address(dhcp[k]) for k in ("start", "end"))
                assert start in net and end in net and start <= end, name
            for host in spec.get("dns", {}).get("hosts", []):
                assert ipaddress.ip_address(host["ip"]) in net, (name, host)
        if kind == "VirtualMachine":
            for attachment in spec.get("disks", []):
                assert has("Disk", attachment["disk"]), (name, attachment)
            for nic in spec.get("interfaces", []):
                if "network" in nic:
                    assert has("Network", nic["network"]), (name, nic)
                    if "ip" in nic:
                        ipv4 = objects[("Network", nic["network"])]["ipv4"]
                        assert "dhcp" in ipv4, (name, nic)
                        assert ipaddress.ip_address(nic["ip"]) in ipaddress.ip_network(
                            ipv4["cidr"]), (name, nic)
                if "mac" in nic:
                    assert int(nic["mac"].split(":")[0], 16) % 2 == 0, (name, nic)


def test_quickstart_is_as_documented() -> None:
    project = _folder_project(EXAMPLES / "quickstart")
    assert project["metadata"]["name"] == "quickstart"
    assert project["spec"]["hosts"] == [
        {"name": "local", "uri": "qemu:///system", "domainType": "auto"}]
    objects = _folder_objects(EXAMPLES / "quickstart")
    assert set(objects) == {("Network", "qs-net"), ("VirtualMachine", "qs-vm")}
    vm = objects[("VirtualMachine", "qs-vm")]
    assert "domainType" not in vm and "disks" not in vm
    assert vm["boot"]["kernel"] == "/var/cache/kvmctl/test-guest/vmlinuz"
    assert vm["interfaces"] == [{"network": "qs-net", "ip": "10.213.7.10"}]
    assert "host" not in vm  # on the project's one host


# ============================================================================= negative cases

def doc(kind: str, spec: dict[str, Any], name: str = "x", **top: Any) -> dict[str, Any]:
    return {"apiVersion": "kvmctl/v1", "kind": kind, "metadata": {"name": name}, "spec": spec,
            **top}


POOL = {"path": "/var/lib/kvmctl/pools/x"}
DISK = {"pool": "p", "size": "1GiB"}
NAT = {"ipv4": {"cidr": "10.0.0.0/24"}}
VM = {"cpus": 1, "memory": "256MiB"}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


VALID = [
    ("StoragePool", POOL),
    ("Image", {"pool": "p", "path": "/srv/a.qcow2"}),
    ("Image", {"pool": "p", "url": "https://example.org/a.qcow2", "sha256": "0" * 64}),
    ("Disk", DISK),
    ("Disk", with_(DISK, image="base", clone=True, format="raw")),
    ("Disk", with_(DISK, format="raw", shareable=True)),
    ("Network", NAT),
    ("Network", {"mode": "isolated"}),
    ("Network", {"mode": "bridge", "bridge": "kvmbr0"}),
    ("VirtualMachine", {}),
    ("VirtualMachine", with_(VM, cpus={"count": 1, "max": 4}, memory={"size": "1GiB"})),
    ("VirtualMachine", with_(VM, graphics={"type": "vnc"})),
    ("VirtualMachine", with_(VM, graphics="spice")),
    ("VirtualMachine", with_(VM, cloudInit={"userData": "#cloud-config\n{}\n"})),
    ("VirtualMachine", with_(VM, interfaces=[{"bridge": "kvmbr0", "mac": "52:54:00:00:00:01"}])),
    ("VirtualMachine", with_(VM, host="kvm-01")),
    ("Network", with_(NAT, hosts="all")),
    ("StoragePool", with_(POOL, hosts=["h1", "h2"])),
    ("Image", {"pool": "p", "path": "/srv/a.qcow2", "hosts": ["h1"]}),
]


@pytest.mark.parametrize("kind,spec", VALID)
def test_valid_edge_cases(kind: str, spec: dict[str, Any]) -> None:
    errs = errors(kind, doc(kind, spec))
    assert not errs, [e.message for e in errs]


INVALID = [
    # (id, kind, document, substring expected in one of the error messages)
    ("bare-number-size", "Disk", doc("Disk", with_(DISK, size=1024)), "is not of type 'string'"),
    ("size-without-unit", "Disk", doc("Disk", with_(DISK, size="1024")), "does not match"),
    ("size-unknown-unit", "Disk", doc("Disk", with_(DISK, size="1G")), "does not match"),
    ("bare-number-memory", "VirtualMachine", doc("VirtualMachine", with_(VM, memory=512)),
     "is not of type 'string', 'object'"),
    ("memory-max-bare", "VirtualMachine",
     doc("VirtualMachine", with_(VM, memory={"size": "1GiB", "max": 2048})), "is not of type"),
    ("name-uppercase", "Network", doc("Network", NAT, name="Lab"), "does not match"),
    ("name-leading-dash", "Network", doc("Network", NAT, name="-lab"), "does not match"),
    ("name-too-long", "Network", doc("Network", NAT, name="a" * 64), "does not match"),
    ("name-missing", "Network", {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {},
                                 "spec": NAT}, "'name' is a required property"),
    ("label-value-not-string", "Network",
     doc("Network", NAT) | {"metadata": {"name": "n", "labels": {"tier": 1}}}, "not of type"),
    ("label-key-bad", "Network",
     doc("Network", NAT) | {"metadata": {"name": "n", "labels": {"-x": "y"}}}, "does not match"),
    ("bridge-mode-without-bridge", "Network", doc("Network", {"mode": "bridge"}),
     "'bridge' is a required property"),
    ("bridge-mode-with-ipv4", "Network",
     doc("Network", {"mode": "bridge", "bridge": "kvmbr0", "ipv4": {"cidr": "10.0.0.0/24"}}),
     "'ipv4' is not one of"),
    ("nat-without-ipv4", "Network", doc("Network", {"mode": "nat"}),
     "'ipv4' is a required property"),
    ("default-mode-without-ipv4", "Network", doc("Network", {}), "'ipv4' is a required property"),
    ("bad-cidr", "Network", doc("Network", {"ipv4": {"cidr": "10.0.0.0/33"}}), "does not match"),
    ("bad-ipv4", "Network",
     doc("Network", {"ipv4": {"cidr": "10.0.0.0/24", "gateway": "10.0.0.256"}}),
     "does not match"),
    ("dhcp-without-end", "Network",
     doc("Network", {"ipv4": {"cidr": "10.0.0.0/24", "dhcp": {"start": "10.0.0.2"}}}),
     "'end' is a required property"),
    ("dns-host-without-names", "Network",
     doc("Network", with_(NAT, dns={"hosts": [{"ip": "10.0.0.5", "hostnames": []}]})),
     "should be non-empty"),
    ("mtu-too-small", "Network", doc("Network", with_(NAT, mtu=10)), "less than the minimum"),
    ("bridge-name-too-long", "Network",
     doc("Network", {"mode": "bridge", "bridge": "a-very-long-bridge0"}), "does not match"),
    ("interface-network-and-bridge", "VirtualMachine",
     doc("VirtualMachine", with_(VM, interfaces=[{"network": "n", "bridge": "kvmbr0"}])),
     "is valid under each of"),
    ("interface-neither", "VirtualMachine",
     doc("VirtualMachine", with_(VM, interfaces=[{"model": "virtio"}])),
     "is not valid under any of the given schemas"),
    ("interface-bridge-with-ip", "VirtualMachine",
     doc("VirtualMachine", with_(VM, interfaces=[{"bridge": "kvmbr0", "ip": "10.0.0.5"}])),
     "'ip' is not one of"),
    ("bad-mac", "VirtualMachine",
     doc("VirtualMachine", with_(VM, interfaces=[{"network": "n", "mac": "52-54-00-00-00-01"}])),
     "does not match"),
    ("bad-nic-model", "VirtualMachine",
     doc("VirtualMachine", with_(VM, interfaces=[{"network": "n", "model": "ne2k"}])),
     "is not one of"),
    ("unknown-spec-field", "VirtualMachine", doc("VirtualMachine", with_(VM, cpu_count=2)),
     "Additional properties are not allowed ('cpu_count' was unexpected)"),
    ("unknown-top-field", "StoragePool", doc("StoragePool", POOL, status={}),
     "Additional properties are not allowed ('status' was unexpected)"),
    ("unknown-nested-field", "VirtualMachine",
     doc("VirtualMachine", with_(VM, disks=[{"disk": "d", "cache": "none"}])),
     "('cache' was unexpected)"),
    ("wrong-api-version", "Disk", doc("Disk", DISK) | {"apiVersion": "kvmctl/v2"},
     "'kvmctl/v1' was expected"),
    ("wrong-kind", "Disk", doc("Volume", DISK), "'Disk' was expected"),
    ("missing-spec", "Disk", {"apiVersion": "kvmctl/v1", "kind": "Disk",
                              "metadata": {"name": "d"}}, "'spec' is a required property"),
    ("cpus-zero", "VirtualMachine", doc("VirtualMachine", with_(VM, cpus=0)),
     "less than the minimum"),
    ("cpus-string", "VirtualMachine", doc("VirtualMachine", with_(VM, cpus="2")),
     "is not of type 'integer', 'object'"),
    ("cpus-object-without-count", "VirtualMachine",
     doc("VirtualMachine", with_(VM, cpus={"max": 2})), "'count' is a required property"),
    ("cpu-custom-without-model", "VirtualMachine",
     doc("VirtualMachine", with_(VM, cpu={"mode": "custom"})), "'model' is a required property"),
    ("initrd-without-kernel", "VirtualMachine",
     doc("VirtualMachine", with_(VM, boot={"initrd": "/boot/initrd.img"})),
     "'kernel' is a dependency of 'initrd'"),
    ("boot-order-duplicate", "VirtualMachine",
     doc("VirtualMachine", with_(VM, boot={"order": ["hd", "hd"]})), "non-unique elements"),
    ("relative-kernel-path", "VirtualMachine",
     doc("VirtualMachine", with_(VM, boot={"kernel": "vmlinuz"})), "does not match"),
    ("graphics-typo", "VirtualMachine", doc("VirtualMachine", with_(VM, graphics="vcn")),
     "is not one of"),
    ("graphics-object-none", "VirtualMachine",
     doc("VirtualMachine", with_(VM, graphics={"type": "none"})), "is not one of"),
    ("bad-state", "VirtualMachine", doc("VirtualMachine", with_(VM, state="paused")),
     "is not one of"),
    ("console-log-relative", "VirtualMachine",
     doc("VirtualMachine", with_(VM, console={"log": "vm.log"})), "does not match"),
    ("image-no-source", "Image", doc("Image", {"pool": "p"}),
     "is not valid under any of the given schemas"),
    ("image-two-sources", "Image",
     doc("Image", {"pool": "p", "path": "/a.raw", "url": "https://e.org/a", "sha256": "0" * 64}),
     "is valid under each of"),
    ("image-url-without-sha256", "Image", doc("Image", {"pool": "p", "url": "https://e.org/a"}),
     "'sha256' is a dependency of 'url'"),
    ("image-sha256-uppercase", "Image",
     doc("Image", {"pool": "p", "url": "https://e.org/a", "sha256": "A" * 64}),
     "does not match"),
    ("image-ftp-url", "Image",
     doc("Image", {"pool": "p", "url": "ftp://e.org/a", "sha256": "0" * 64}), "does not match"),
    ("image-bad-format", "Image", doc("Image", {"pool": "p", "path": "/a", "format": "vmdk"}),
     "is not one of"),
    ("disk-without-pool", "Disk", doc("Disk", {"size": "1GiB"}), "'pool' is a required property"),
    ("disk-clone-without-image", "Disk", doc("Disk", with_(DISK, clone=True)),
     "'image' is a required property"),
    ("disk-raw-overlay", "Disk", doc("Disk", with_(DISK, image="base", format="raw")),
     "'raw' is not one of ['qcow2']"),
    ("disk-shareable-qcow2", "Disk", doc("Disk", with_(DISK, shareable=True)),
     "'format' is a required property"),
    ("pool-without-path", "StoragePool", doc("StoragePool", {}), "'path' is a required property"),
    ("pool-bad-type", "StoragePool", doc("StoragePool", with_(POOL, type="lvm")), "is not one of"),
    ("pool-relative-path", "StoragePool", doc("StoragePool", {"path": "pools/x"}),
     "does not match"),
    ("vm-host-uppercase", "VirtualMachine", doc("VirtualMachine", with_(VM, host="H1")),
     "does not match"),
    ("vm-hosts-list", "VirtualMachine", doc("VirtualMachine", with_(VM, hosts=["h1"])),
     "('hosts' was unexpected)"),
    ("disk-hosts", "Disk", doc("Disk", with_(DISK, hosts=["h1"])), "('hosts' was unexpected)"),
    ("network-hosts-empty", "Network", doc("Network", with_(NAT, hosts=[])),
     "should be non-empty"),
    ("network-hosts-duplicate", "Network", doc("Network", with_(NAT, hosts=["h1", "h1"])),
     "non-unique elements"),
    ("network-hosts-any", "Network", doc("Network", with_(NAT, hosts="any")), "'all' was expected"),
]


@pytest.mark.parametrize("kind,document,expected", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_documents_are_rejected(kind: str, document: dict[str, Any],
                                        expected: str) -> None:
    errs = errors(kind, document)
    assert errs, "document was accepted"
    messages = [e.message for e in errs]
    messages += [c.message for e in errs for c in (e.context or ())]
    assert any(expected in m for m in messages), messages


@pytest.mark.parametrize("spec,expected", [
    ({"network": "n", "bridge": "kvmbr0"}, "an interface needs exactly one of network or bridge"),
    ({}, "an interface needs exactly one of network or bridge"),
])
def test_one_of_errors_carry_an_error_message(spec: dict[str, Any], expected: str) -> None:
    """kvmctl's validator shows `errorMessage` of the failing schema instead of oneOf's text."""
    errs = errors("VirtualMachine", doc("VirtualMachine", with_(VM, interfaces=[spec])))
    one_of = [e for e in errs if e.validator == "oneOf"]
    assert one_of and one_of[0].schema.get("errorMessage") == expected


def test_image_source_error_message() -> None:
    errs = errors("Image", doc("Image", {"pool": "p"}))
    assert [e.schema.get("errorMessage") for e in errs if e.validator == "oneOf"] == [
        "an Image needs exactly one source: url (with sha256) or path"]


def test_yaml_integers_are_not_sizes() -> None:
    """The point of a string type: `size: 20` in YAML is an int and must fail."""
    document = yaml.safe_load(
        "apiVersion: kvmctl/v1\nkind: Disk\nmetadata: {name: d}\nspec: {pool: p, size: 20}\n")
    assert any(e.validator == "type" for e in errors("Disk", document))


@pytest.mark.parametrize("kind,document,expected", [
    ("Disk", doc("Disk", with_(DISK, clone=True)), "clone: true needs image (the Image to copy)"),
    ("Disk", doc("Disk", with_(DISK, image="base", format="raw")),
     "a disk layered on an image (without clone: true) must be qcow2"),
    ("Disk", doc("Disk", with_(DISK, shareable=True)), "a shareable disk needs format: raw"),
    ("Disk", doc("Disk", with_(DISK, shareable=True, format="qcow2")),
     "a shareable disk needs format: raw"),
    ("Network", doc("Network", {"mode": "bridge"}),
     "mode bridge needs bridge: the name of the existing host bridge"),
    ("Network", doc("Network", {"mode": "route"}),
     "modes nat (the default) and route need ipv4 with a cidr"),
], ids=["clone", "raw-overlay", "shareable", "shareable-qcow2", "bridge", "route"])
def test_conditional_rules_carry_an_error_message(kind: str, document: dict[str, Any],
                                                  expected: str) -> None:
    errs = errors(kind, document)
    assert expected in [e.schema.get("errorMessage") for e in errs], [e.message for e in errs]


def test_interface_with_both_network_and_bridge_reports_only_the_one_of() -> None:
    errs = errors("VirtualMachine",
                  doc("VirtualMachine", with_(VM, interfaces=[{"network": "n", "bridge": "b"}])))
    assert [e.validator for e in errs] == ["oneOf"]


# ============================================================================= docs/manifests.md

DOC = ROOT / "docs" / "manifests.md"


def _doc_yaml_documents() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [d for block in blocks for d in yaml.safe_load_all(block)
            if isinstance(d, dict) and "kind" in d]


def _field_paths(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name, sub in schema.get("properties", {}).items():
        yield prefix + name
        yield from _field_paths(sub, f"{prefix}{name}.")
        if isinstance(sub.get("items"), dict):
            yield from _field_paths(sub["items"], f"{prefix}{name}[].")


def test_doc_examples_are_valid() -> None:
    documents = _doc_yaml_documents()
    assert {d["kind"] for d in documents} == set(DOCUMENT_KINDS)
    for document in documents:
        errs = errors(document["kind"], document)
        assert not errs, (document["metadata"], [e.message for e in errs])


@pytest.mark.parametrize("kind", DOCUMENT_KINDS)
def test_doc_lists_every_field(kind: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    spec = ALL[f"{kind.lower()}.schema.json"]["properties"]["spec"]
    missing = [p for p in _field_paths(spec) if f"`{p}`" not in text]
    assert not missing, missing
