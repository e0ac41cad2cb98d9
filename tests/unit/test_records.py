"""Definition records (kvmctl/host/records.py): a stopped VM whose definition is provably the one
kvmctl checked is neither rendered nor parsed, and any other definition is compared in full.

Run against libvirt's test driver (testdriver.py), whose defineXML, XMLDesc and setMetadata are
libvirt's own.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from cli_support import CliResult, run_cli
from manifest_docs import changes_by_ref, doc
from testdriver import DriverHypervisor, install, write_manifests

from kvmctl.host import records
from kvmctl.host.records import DefinitionRecord, config_digest, find_record, proven
from kvmctl.plan.steps import DefineDomain, step_json
from kvmctl.render import definitions

PROJECT = "rec"
DIGEST = "a" * 64
KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"


def vm(name: str, memory: str = "64MiB") -> dict[str, Any]:
    return doc("VirtualMachine", name, {"cpus": 1, "memory": memory, "state": "stopped",
                                        "boot": {"kernel": KERNEL}})


def _record_xml(desired: str = DIGEST, rendered: str = "b" * 64, defined: str = "c" * 64) -> str:
    return (f'    <kvmctl-def:definition xmlns:kvmctl-def="{records.DEFINITION_NS}" '
            f'desired="{desired}" rendered="{rendered}" defined="{defined}"/>\n')


DOMAIN = """<domain type='qemu'>
  <name>r</name>
  <metadata>
    <kvmctl:resource xmlns:kvmctl="https://kvmctl.dev/xmlns/resource/v1">
      <kvmctl:project>rec</kvmctl:project>
    </kvmctl:resource>
{record}  </metadata>
  <memory unit='KiB'>65536</memory>
</domain>
"""


# ---- the record and the digests ---------------------------------------------------------------

def test_a_record_is_found_and_left_out_of_the_digest() -> None:
    bare = DOMAIN.format(record="")
    recorded = DOMAIN.format(record=_record_xml())
    assert find_record(bare) is None
    assert find_record(recorded) == DefinitionRecord(DIGEST, "b" * 64, "c" * 64)
    # The digest is taken before the record is written, so it must not cover it.
    assert config_digest(recorded) == config_digest(bare)
    assert config_digest(bare.replace("65536", "65537")) != config_digest(bare)


@pytest.mark.parametrize("broken", [
    _record_xml(desired="a" * 63),  # not a sha256
    _record_xml().replace(' rendered="' + "b" * 64 + '"', ""),  # a digest missing
    _record_xml().replace(records.DEFINITION_NS, "https://example.com/other"),
    _record_xml().replace("kvmctl-def:definition", "kvmctl-def:other"),
])
def test_a_malformed_record_is_no_record(broken: str) -> None:
    assert find_record(DOMAIN.format(record=broken)) is None


def test_proof_needs_the_recorded_definition_and_the_same_inputs_or_xml() -> None:
    bare = DOMAIN.format(record="")
    rendered = "<domain><name>r</name></domain>"
    record = DefinitionRecord(DIGEST, records.rendered_digest(rendered), config_digest(bare))
    never = _never_called
    assert proven(record, DIGEST, never, bare)  # same inputs: nothing rendered
    assert proven(record, "d" * 64, lambda: rendered, bare)  # other inputs, same XML
    assert not proven(record, "d" * 64, lambda: rendered.replace("r<", "s<"), bare)
    assert not proven(record, DIGEST, never, bare.replace("65536", "131072"))  # edited
    assert not proven(None, DIGEST, never, bare)
    assert not proven(record, "", lambda: "<domain/>", bare)


def _never_called() -> str:
    raise AssertionError("rendered although the inputs were the same")


def test_rendered_digest_ignores_only_the_uuid() -> None:
    new = "<domain>\n  <name>r</name>\n  <memory>1</memory>\n</domain>"
    existing = new.replace("  <name>r</name>\n", "  <name>r</name>\n  <uuid>0b1c</uuid>\n")
    assert records.rendered_digest(new) == records.rendered_digest(existing)
    assert records.rendered_digest(new) != records.rendered_digest(new.replace(">1<", ">2<"))


def test_define_steps_show_only_that_digests_are_recorded() -> None:
    shown = step_json(DefineDomain("r", "<domain/>", DIGEST, "b" * 64))
    assert shown == {"op": "define_domain", "name": "r", "xml": "<domain/>", "digest": True,
                     "rendered": True}


# ---- plans and applies on the test driver ------------------------------------------------------

class Host:
    def __init__(self, folder: Path, hv: DriverHypervisor, uri: str) -> None:
        self.folder, self.hv, self.uri = folder, hv, uri

    def cli(self, *argv: Any) -> CliResult:
        return run_cli([argv[0], "--connect", self.uri, "--project", PROJECT,
                        "--domain-type", "qemu", *argv[1:]])

    def apply(self, path: Path) -> None:
        result = self.cli("apply", "-y", "-f", path)
        assert result.code == 0, result

    def plan(self, path: Path) -> dict[str, Any]:
        result = self.cli("plan", "-o", "json", "-f", path)
        assert result.code == 0, result
        return result.json()  # type: ignore[no-any-return]

    def xml(self, name: str) -> str:
        return str(self.hv.conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    hv, uri = install(monkeypatch, tmp_path)
    yield Host(tmp_path, hv, uri)
    hv.close()


@pytest.fixture
def rendered_vms(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the VMs whose definitions are rendered, in order."""
    names: list[str] = []
    original = definitions.domain_xml

    def counting(vm_model: Any, *args: Any, **kwargs: Any) -> str:
        names.append(vm_model.meta.name)
        return original(vm_model, *args, **kwargs)

    monkeypatch.setattr(definitions, "domain_xml", counting)
    return names


def _manifest(host: Host, memory: str = "64MiB") -> Path:
    return write_manifests(host.folder / "vms.yaml", [
        vm("r-one", memory), vm("r-two")])


def test_apply_records_and_a_no_op_plan_renders_nothing(host: Host, rendered_vms: list[str]
                                                        ) -> None:
    path = _manifest(host)
    host.apply(path)
    for name in ("r-one", "r-two"):
        xml = host.xml(name)
        record = find_record(xml)
        assert record is not None and record.defined == config_digest(xml)
    rendered_vms.clear()
    assert not host.plan(path)["changes_present"]
    assert rendered_vms == []


def test_drift_under_a_record_is_found_and_repaired(host: Host, rendered_vms: list[str]) -> None:
    path = _manifest(host)
    host.apply(path)
    # Edited behind kvmctl's back, the record kept (as `virsh edit` keeps all metadata).
    edited = re.sub(r"<memory unit='KiB'>\d+</memory>", "<memory unit='KiB'>131072</memory>",
                    host.xml("r-one"))
    edited = re.sub(r"<currentMemory unit='KiB'>\d+</currentMemory>",
                    "<currentMemory unit='KiB'>131072</currentMemory>", edited)
    host.hv.conn.defineXML(edited)
    assert find_record(host.xml("r-one")) is not None
    rendered_vms.clear()
    plan = host.plan(path)
    changed = {ref: c for ref, c in changes_by_ref(plan).items() if c["class"] != "noop"}
    assert set(changed) == {"VirtualMachine/r-one"}
    assert {"memory", "memory.max"} <= {f["field"] for f in changed["VirtualMachine/r-one"]
                                        ["fields"]}
    assert "r-two" not in rendered_vms
    host.apply(path)
    record = find_record(host.xml("r-one"))
    assert record is not None and record.defined == config_digest(host.xml("r-one"))
    assert not host.plan(path)["changes_present"]


def test_a_definition_without_a_record_is_compared_in_full(host: Host,
                                                          rendered_vms: list[str]) -> None:
    path = _manifest(host)
    host.apply(path)
    dom = host.hv.conn.lookupByName("r-two")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, records.DEFINITION_NS,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert find_record(host.xml("r-two")) is None
    rendered_vms.clear()
    assert not host.plan(path)["changes_present"]
    assert rendered_vms == ["r-two"]


def test_an_apply_with_nothing_to_change_writes_the_missing_records(host: Host,
                                                                     rendered_vms: list[str]
                                                                     ) -> None:
    """Domains defined before records existed, or by a kvmctl whose digests differ, get them
    from the next apply, though it changes nothing."""
    path = _manifest(host)
    host.apply(path)
    dom = host.hv.conn.lookupByName("r-one")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, records.DEFINITION_NS,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    result = host.cli("apply", "-y", "-f", path)
    assert result.code == 0 and "No changes" in result.stdout, result
    record = find_record(host.xml("r-one"))
    assert record is not None and record.defined == config_digest(host.xml("r-one"))
    rendered_vms.clear()
    assert not host.plan(path)["changes_present"]
    assert rendered_vms == []


def test_no_record_is_written_for_a_definition_that_differs(host: Host) -> None:
    path = _manifest(host)
    host.apply(path)
    xml = re.sub(r"<memory unit='KiB'>\d+</memory>", "<memory unit='KiB'>131072</memory>",
                 host.xml("r-one"))
    host.hv.conn.defineXML(xml.replace(records.DEFINITION_NS, "https://example.com/gone"))
    plan = host.cli("plan", "-o", "json", "-f", path).json()
    assert changes_by_ref(plan)["VirtualMachine/r-one"]["class"] != "noop"
    assert find_record(host.xml("r-one")) is None  # a plan writes nothing


def test_a_changed_manifest_is_planned_though_the_record_still_holds(host: Host) -> None:
    path = _manifest(host)
    host.apply(path)
    plan = host.plan(_manifest(host, memory="128MiB"))
    changed = [ref for ref, c in changes_by_ref(plan).items() if c["class"] != "noop"]
    assert changed == ["VirtualMachine/r-one"]


# ---- what the input digest covers ---------------------------------------------------------------

# Modules a rendering imports whose code cannot change a definition's XML: they only word
# errors, turn manifest text into the values the input digest holds itself, or load modules.
NOT_RENDERING = {"kvmctl.errors", "kvmctl.manifest.documents", "kvmctl.lazy"}


def test_the_input_digest_covers_every_module_rendering_runs() -> None:
    """A module missing from RENDER_MODULES could change the XML without changing the input
    digest: the record would then vouch for a definition the new code renders differently."""
    seen: set[str] = set()
    todo = ["kvmctl.render.definitions"]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RENDERING:
            continue
        seen.add(name)
        todo.extend(_kvmctl_imports(name))
    assert seen == set(definitions.RENDER_MODULES)


def _kvmctl_imports(module: str) -> set[str]:
    """The kvmctl modules `module` imports at run time (not those for type checking only)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if importlib.util.find_spec(base) and _is_module(candidate)
                          else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("kvmctl.") and name != "kvmctl.templates"}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ---- labels are part of what is compared -------------------------------------------------------

def test_a_label_change_is_planned_applied_and_then_proven(host: Host) -> None:
    """A changed label was once no change at all (and so never written); it is one now, for a
    VM and for a network, and the record written with it holds afterwards."""
    def docs(team: str) -> list[dict[str, Any]]:
        labelled = vm("r-one")
        labelled["metadata"]["labels"] = {"team": team}
        net = doc("Network", "r-net", {"mode": "isolated", "ipv4": {"cidr": "10.250.9.0/24"}})
        net["metadata"]["labels"] = {"team": team}
        return [net, labelled]

    path = write_manifests(host.folder / "labelled.yaml", docs("red"))
    host.apply(path)
    assert not host.plan(path)["changes_present"]
    path = write_manifests(host.folder / "labelled.yaml", docs("blue"))
    changes = changes_by_ref(host.plan(path))
    for ref in ("VirtualMachine/r-one", "Network/r-net"):
        assert {"field": "labels", "old": "team=red", "new": "team=blue"} in \
            [{k: f[k] for k in ("field", "old", "new")} for f in changes[ref]["fields"]], ref
    host.apply(path)
    assert 'key="team">blue<' in host.xml("r-one")
    # The test driver shows a running network's live definition only, which a redefinition
    # changes at its next start: the network's convergence is tested on real libvirt
    # (test_engine.py).
    assert "VirtualMachine/r-one" not in {ref for ref, c in changes_by_ref(host.plan(path))
                                          .items() if c["class"] != "noop"}
    record = find_record(host.xml("r-one"))
    assert record is not None and record.defined == config_digest(host.xml("r-one"))
