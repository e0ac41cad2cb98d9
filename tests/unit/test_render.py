"""Rendering: golden XML per object, escaping of hostile values, libvirt's RelaxNG schemas.

Golden cases live in tests/golden/render/<case>/: `manifest.yaml` and `expected/<Kind>-<name>.xml`
for every object it renders. To accept new output after a deliberate template change:

    KVMCTL_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_render.py

then review the diff of tests/golden/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from kvmctl.errors import Location
from kvmctl.kinds import LEVEL, PROJECT_KIND
from kvmctl.manifest import documents, model, validate
from kvmctl.manifest.documents import Document
from kvmctl.manifest.model import ManifestSet
from kvmctl.render import definitions as render

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "render"
EXAMPLES = REPO / "examples"
GOLDEN_CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "manifest.yaml").is_file())
EXAMPLE_DIRS = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
UPDATE = os.environ.get("KVMCTL_UPDATE_GOLDEN") == "1"
PROJECT, DOMAIN_TYPE = "golden", "kvm"

LIBVIRT_SCHEMAS = Path("/usr/share/libvirt/schemas")
RNG_FILES = {"VirtualMachine": "domain.rng", "Network": "network.rng",
             "StoragePool": "storagepool.rng", "Disk": "storagevol.rng",
             "Image": "storagevol.rng"}
HOSTILE = "a<b>&c'd\"e]]>f&amp;"


def _render_folder(folder: Path) -> list[render.Rendered]:
    """What a manifest folder renders. Each example folder holds its project file (kvmctl.yaml,
    kind Project): it configures the run and renders nothing, so it is set aside as the engine
    sets it aside (manifest/project.py, split_project)."""
    docs = [d for d in documents.load([str(folder)]) if d.kind != PROJECT_KIND]
    manifest = validate.validate(docs)
    return render.render_all(manifest, PROJECT, DOMAIN_TYPE)


def _model(text: str, check: bool = True) -> ManifestSet:
    docs = documents.parse_text(text, "m.yaml")
    return validate.validate(docs) if check else model.build(docs)


# ----------------------------------------------------------------------------- golden files


def test_there_are_enough_golden_cases() -> None:
    assert len(GOLDEN_CASES) >= 6


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden(case: str) -> None:
    folder = GOLDEN / case
    rendered = {f"{r.kind}-{r.name}.xml": r.xml for r in _render_folder(folder / "manifest.yaml")}
    expected_dir = folder / "expected"
    if UPDATE:
        expected_dir.mkdir(exist_ok=True)
        for stale in expected_dir.glob("*.xml"):
            if stale.name not in rendered:
                stale.unlink()
        for name, xml in rendered.items():
            (expected_dir / name).write_text(xml, encoding="utf-8")
    expected = {p.name: p.read_text(encoding="utf-8") for p in expected_dir.glob("*.xml")}
    assert sorted(rendered) == sorted(expected), \
        "objects differ from the golden files (KVMCTL_UPDATE_GOLDEN=1 rewrites them)"
    for name in sorted(rendered):
        assert rendered[name] == expected[name], \
            f"{case}/expected/{name} differs (KVMCTL_UPDATE_GOLDEN=1 rewrites it)"


def test_rendering_is_deterministic() -> None:
    first = _render_folder(GOLDEN / "vm-everything" / "manifest.yaml")
    second = _render_folder(GOLDEN / "vm-everything" / "manifest.yaml")
    assert first == second


# ----------------------------------------------------------------------------- escaping

HOSTILE_SET = """\
apiVersion: kvmctl/v1
kind: StoragePool
metadata:
  name: pool
  labels:
    note: VALUE
spec:
  path: /var/lib/kvmctl/VALUE
---
apiVersion: kvmctl/v1
kind: Network
metadata:
  name: net
  labels:
    note: VALUE
spec:
  ipv4:
    cidr: 10.96.0.0/24
    dhcp:
      start: 10.96.0.100
      end: 10.96.0.199
---
apiVersion: kvmctl/v1
kind: Image
metadata:
  name: img
spec:
  pool: pool
  path: /images/VALUE
---
apiVersion: kvmctl/v1
kind: Disk
metadata:
  name: root
spec:
  pool: pool
  image: img
  size: 1GiB
---
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata:
  name: vm
  labels:
    note: VALUE
spec:
  boot:
    kernel: /boot/VALUE
    cmdline: console=ttyS0 VALUE
  disks:
    - disk: root
  interfaces:
    - network: net
      ip: 10.96.0.10
  console:
    log: /var/log/VALUE
  cloudInit:
    hostname: vm
    userData: "#cloud-config\\nwrite_files: [{path: /etc/x, content: 'VALUE'}]\\n"
"""


def _yaml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hostile_text(value: str) -> str:
    """HOSTILE_SET with `value` everywhere VALUE is (YAML-quoted where the line is plain)."""
    lines = []
    for line in HOSTILE_SET.splitlines():
        if "VALUE" in line and "userData" not in line:
            key, _, rest = line.partition(": ")
            line = f"{key}: {_yaml_string(rest.replace('VALUE', value))}"
        elif "userData" in line:
            inner = value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "''")
            line = line.replace("VALUE", inner)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _shape(element: Any) -> Any:
    """The structure of an element: tags, attribute names, children; no text or values."""
    return (element.tag, tuple(sorted(element.attrib)),
            tuple(_shape(child) for child in element if isinstance(child.tag, str)))


def _parse(xml: str) -> Any:
    return etree.fromstring(xml.encode("utf-8"))


def _by_kind(rendered: list[render.Rendered]) -> dict[str, Any]:
    return {r.kind: _parse(r.xml) for r in rendered}


NS = {"k": render.NAMESPACE}


@pytest.mark.parametrize("value", [HOSTILE, "<", "&", "'", '"', "]]>", "<!--", "&#x41;",
                                   "<![CDATA[x]]>", "<?pi?>"])
def test_hostile_values_are_escaped(value: str) -> None:
    harmless = _by_kind(render.render_all(_model(_hostile_text("harmless")), "p", "kvm"))
    manifest = _model(_hostile_text(value))
    hostile = _by_kind(render.render_all(manifest, "p", "kvm"))
    assert set(hostile) == set(harmless)
    for kind in hostile:
        assert _shape(hostile[kind]) == _shape(harmless[kind]), kind

    vm, net, pool = hostile["VirtualMachine"], hostile["Network"], hostile["StoragePool"]
    assert vm.findtext("os/cmdline") == f"console=ttyS0 {value}"
    assert vm.findtext("os/kernel") == f"/boot/{value}"
    assert vm.find("devices/serial/log").get("file") == f"/var/log/{value}"
    assert vm.findtext("metadata/k:resource/k:label[@key='note']", namespaces=NS) == value
    assert net.findtext("metadata/k:resource/k:label[@key='note']", namespaces=NS) == value
    assert pool.findtext("target/path") == f"/var/lib/kvmctl/{value}"
    disk = hostile["Disk"]
    assert disk.findtext("backingStore/path") == f"/var/lib/kvmctl/{value}/img.qcow2"
    seed = render.seed_spec(manifest.vms[0], manifest)
    assert seed is not None
    assert yaml.safe_load(seed.content.user_data)["write_files"][0]["content"] == value


@pytest.mark.parametrize("value", [HOSTILE, "]]>", "x\"y'z"])
def test_hostile_project_name(value: str) -> None:
    manifest = _model(_hostile_text("harmless"))
    harmless = _by_kind(render.render_all(manifest, "p", "kvm"))
    hostile = _by_kind(render.render_all(manifest, value, "kvm"))
    for kind in hostile:
        assert _shape(hostile[kind]) == _shape(harmless[kind])
    assert hostile["VirtualMachine"].findtext("metadata/k:resource/k:project",
                                              namespaces=NS) == value
    assert hostile["VirtualMachine"].findtext("title") == f"vm (kvmctl project {value})"


def test_cloud_init_strings_reach_the_seed_unchanged() -> None:
    text = ("#cloud-config\nwrite_files:\n  - path: /etc/motd\n"
            f"    content: {_yaml_string(HOSTILE)}\n")
    body = {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine", "metadata": {"name": "vm"},
            "spec": {"cloudInit": {"userData": text, "instanceId": HOSTILE}}}
    doc = Document(body, Location("m.yaml"), {})
    manifest = model.build([doc, *documents.parse_text(
        "apiVersion: kvmctl/v1\nkind: StoragePool\nmetadata: {name: p}\nspec: {path: /p}\n",
        "p.yaml")])
    seed = render.seed_spec(manifest.vms[0], manifest)
    assert seed is not None
    assert seed.content.user_data == text
    assert seed.content.instance_id == HOSTILE
    xml = render.domain_xml(manifest.vms[0], manifest, "p", "kvm")
    assert _parse(xml).findtext("metadata/k:resource/k:seed-hash", namespaces=NS) == \
        seed.digest


def _unchecked_vm_and_network(value: str) -> ManifestSet:
    """A model built without validation: values the schemas would refuse reach the templates."""
    net = {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": f"net{value}"},
           "spec": {"ipv4": {"cidr": "10.95.0.0/24",
                             "dhcp": {"start": "10.95.0.100", "end": "10.95.0.199"}},
                    "bridge": f"br{value}", "dns": {"domain": f"d{value}",
                                                    "hosts": [{"ip": "10.95.0.10",
                                                               "hostnames": [f"h{value}"]}]}}}
    vm = {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine", "metadata": {"name": f"vm{value}"},
          "spec": {"interfaces": [{"network": f"net{value}", "ip": "10.95.0.10"},
                                  {"bridge": f"br{value}"}],
                   "cpu": {"mode": "custom", "model": f"m{value}"},
                   "graphics": {"type": "vnc", "listen": f"l{value}"}}}
    docs = [Document(body, Location("m.yaml"), {}) for body in (net, vm)]
    return model.build(docs)


@pytest.mark.parametrize("value", [HOSTILE, "]]>", "\"'"])
def test_templates_escape_even_values_the_schemas_refuse(value: str) -> None:
    """Names, bridges, DNS hostnames, CPU model: the schemas refuse markup, the templates would
    escape it anyway."""
    harmless = _unchecked_vm_and_network("x")
    hostile = _unchecked_vm_and_network(value)
    for which in ("net", "vm"):
        def xml(m: ManifestSet) -> Any:
            if which == "net":  # noqa: B023 (xml is used within this iteration)
                return _parse(render.network_xml(m.networks[0], m, "p"))
            return _parse(render.domain_xml(m.vms[0], m, "p", "kvm"))
        assert _shape(xml(hostile)) == _shape(xml(harmless))
    net = _parse(render.network_xml(hostile.networks[0], hostile, "p"))
    assert net.findtext("name") == f"net{value}"
    assert net.find("bridge").get("name") == f"br{value}"
    assert net.find("domain").get("name") == f"d{value}"
    assert net.findtext("dns/host/hostname") == f"h{value}"
    assert net.find("ip/dhcp/host").get("name") == f"vm{value}"
    vm = _parse(render.domain_xml(hostile.vms[0], hostile, "p", "kvm"))
    assert vm.findtext("name") == f"vm{value}"
    assert vm.findtext("cpu/model") == f"m{value}"
    assert vm.find("devices/graphics").get("listen") == f"l{value}"
    assert vm.find("devices/interface[@type='network']/source").get("network") == f"net{value}"


@pytest.mark.parametrize("hostname", ["web<1>", "a&b", "x'y", 'q"r', "]]>"])
def test_schemas_refuse_markup_in_dns_hostnames(hostname: str, cli: Any, tmp_path: Path
                                                ) -> None:
    path = tmp_path / "net.yaml"
    path.write_text(
        "apiVersion: kvmctl/v1\nkind: Network\nmetadata: {name: n}\n"
        "spec:\n  mode: isolated\n  dns:\n    hosts:\n"
        f"      - ip: 10.0.0.1\n        hostnames: [{_yaml_string(hostname)}]\n")
    result = cli(["validate", "-f", path])
    assert result.code == 1 and "is not valid here" in result.stdout


# ----------------------------------------------------------------------------- libvirt schemas


def _relaxng(folder: Path = LIBVIRT_SCHEMAS) -> dict[str, Any]:
    """libvirt's schemas; a missing one fails the test (never a skip: the check would vanish)."""
    missing = [name for name in sorted(set(RNG_FILES.values()))
               if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"libvirt's RelaxNG schemas are missing from {folder} "
                    f"({', '.join(missing)}): run scripts/host-setup (as root) to install "
                    "libvirt, then rerun the tests", pytrace=False)
    parsed = {name: etree.RelaxNG(etree.parse(str(folder / name)))
              for name in set(RNG_FILES.values())}
    return {kind: parsed[name] for kind, name in RNG_FILES.items()}


@pytest.fixture(scope="module")
def relaxng() -> dict[str, Any]:
    return _relaxng()


def test_missing_libvirt_schemas_fail_with_a_way_out(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="run scripts/host-setup"):
        _relaxng(tmp_path)


def _sources() -> Iterator[Any]:
    for name in EXAMPLE_DIRS:
        yield pytest.param(EXAMPLES / name, id=f"examples/{name}")
    for name in GOLDEN_CASES:
        yield pytest.param(GOLDEN / name / "manifest.yaml", id=f"golden/{name}")


@pytest.mark.parametrize("source", list(_sources()))
def test_rendered_xml_satisfies_libvirt_relaxng(source: Path, relaxng: dict[str, Any]) -> None:
    rendered = _render_folder(source)
    assert rendered
    failures = []
    for r in rendered:
        schema = relaxng[r.kind]
        if not schema.validate(_parse(r.xml)):
            failures.append(f"{r.kind}/{r.name}: {schema.error_log.last_error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("domain_type", ["kvm", "qemu"])
def test_hostile_values_satisfy_libvirt_relaxng(domain_type: str,
                                                relaxng: dict[str, Any]) -> None:
    for r in render.render_all(_model(_hostile_text(HOSTILE)), HOSTILE, domain_type):
        assert relaxng[r.kind].validate(_parse(r.xml)), (r.kind, relaxng[r.kind].error_log)


def test_examples_and_golden_cases_are_all_checked() -> None:
    assert len(EXAMPLE_DIRS) >= 1 and len(GOLDEN_CASES) >= 6


@pytest.mark.parametrize("name", EXAMPLE_DIRS)
def test_project_file_renders_nothing(name: str) -> None:
    """A folder's project file is no object: with it or without it, the same XML."""
    project_file = EXAMPLES / name / "kvmctl.yaml"
    assert [d.kind for d in documents.load([str(project_file)])] == [PROJECT_KIND]
    assert render.render_all(validate.validate(documents.load([str(project_file)])),
                             PROJECT, DOMAIN_TYPE) == []
    with_it = render.render_all(validate.validate(documents.load([str(EXAMPLES / name)])),
                                PROJECT, DOMAIN_TYPE)
    assert with_it == _render_folder(EXAMPLES / name)


# ----------------------------------------------------------------------------- details


def test_seed_content_is_shared_between_validate_and_render_but_never_mixed_up() -> None:
    from kvmctl.manifest.cloudinit import seed_content

    def vm_set(content: Any) -> ManifestSet:
        return _model(
            "apiVersion: kvmctl/v1\nkind: StoragePool\nmetadata: {name: p}\nspec: {path: /p}\n"
            "---\napiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata: {name: vm}\n"
            f"spec:\n  cloudInit:\n    userData: {{a: {content}}}\n")

    seen = set()
    for content in ("1", "'1'", "1.0", "true", "[1]", "{b: 1}"):
        manifest = vm_set(content)
        vm = manifest.vms[0]
        ci = vm.cloud_init
        assert ci is not None
        fresh = seed_content(vm.meta.name, ci.hostname, ci.user_data, ci.network_config,
                             list(ci.ssh_authorized_keys), ci.instance_id)
        assert render.seed_content_of(vm) == fresh
        seen.add(fresh.user_data)
    assert len(seen) == 6


def test_render_all_is_in_apply_order() -> None:
    kinds = [r.kind for r in _render_folder(GOLDEN / "vm-everything" / "manifest.yaml")]
    order = [LEVEL[k] for k in kinds]
    assert order == sorted(order)


def _backing_path(manifest: ManifestSet) -> str:
    return render.disk_volume(manifest.disks[0], manifest).backing_path or ""


def test_lookups_follow_the_manifest_set_they_are_given() -> None:
    """Each ManifestSet indexes its own objects: a set must never see another's."""
    first, second = _model(_hostile_text("one")), _model(_hostile_text("two"))
    for manifest, word in ((first, "one"), (second, "two"), (first, "one")):
        assert _backing_path(manifest) == f"/var/lib/kvmctl/{word}/img.qcow2"
    # Sets that die free their entry, so a new set at a reused address is indexed afresh.
    for n in range(20):
        assert _backing_path(_model(_hostile_text(f"w{n}"))) == f"/var/lib/kvmctl/w{n}/img.qcow2"
