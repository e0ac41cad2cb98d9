"""The project file and placement (kvmctl/manifest/project.py): finding kvmctl.yaml, loading and
resolving it with the command line's overrides, VM defaults, and which documents go to which host.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kvmctl.errors import ManifestError, Problem, UsageError
from kvmctl.kinds import PROJECT_FILE, PROJECT_KIND
from kvmctl.manifest import documents
from kvmctl.manifest.documents import Document
from kvmctl.manifest.project import (
    DEFAULT_HOST,
    HostConfig,
    Overrides,
    ProjectConfig,
    find_project_file,
    load_project_file,
    place,
    resolve,
    with_defaults,
)

PROJECT_TEXT = """\
apiVersion: kvmctl/v1
kind: Project
metadata:
  name: lab
spec:
  hosts:
    - name: h1
      uri: qemu:///system
    - name: h2
      uri: qemu+ssh://root@kvm-02/system
      domainType: kvm
"""


def _project(text: str = PROJECT_TEXT, file: str = PROJECT_FILE) -> Document:
    [doc] = documents.parse_text(textwrap.dedent(text), file)
    return doc


def _docs(text: str, file: str = "m.yaml") -> list[Document]:
    return documents.parse_text(textwrap.dedent(text), file)


def _only(caught: pytest.ExceptionInfo[ManifestError]) -> Problem:
    problems = caught.value.problems
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def _resolve_problem(text: str) -> Problem:
    """The one problem that resolving this project file text reports."""
    with pytest.raises(ManifestError) as caught:
        resolve(_project(text), Overrides())
    return _only(caught)


TWO_HOSTS = ProjectConfig("lab", (HostConfig("h1", "qemu:///system"),
                                  HostConfig("h2", "qemu+ssh://root@kvm-02/system")),
                          "h1", source=PROJECT_FILE)


@pytest.fixture(autouse=True)
def _no_libvirt_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)


# ============================================================================= find_project_file


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository (its top holds .git) with a manifest folder app/ inside."""
    top = tmp_path / "repo"
    (top / ".git").mkdir(parents=True)
    (top / "app" / "sub").mkdir(parents=True)
    (top / "app" / "vm.yaml").write_text("{}\n")
    return top


def _write_project(folder: Path) -> Path:
    path = folder / PROJECT_FILE
    path.write_text(PROJECT_TEXT)
    return path


def test_found_in_the_directory_given_with_f(repo: Path) -> None:
    path = _write_project(repo / "app")
    assert find_project_file([str(repo / "app")]) == str(path.resolve())


def test_found_beside_a_file_given_with_f(repo: Path) -> None:
    path = _write_project(repo / "app")
    assert find_project_file([str(repo / "app" / "vm.yaml")]) == str(path.resolve())


def test_found_in_a_parent(repo: Path) -> None:
    path = _write_project(repo)  # the repository top's own project file counts
    assert find_project_file([str(repo / "app" / "sub")]) == str(path.resolve())


def test_the_nearest_one_wins(repo: Path) -> None:
    _write_project(repo)
    nearer = _write_project(repo / "app")
    assert find_project_file([str(repo / "app" / "sub")]) == str(nearer.resolve())


def test_the_search_stops_at_the_top_of_the_repository(repo: Path) -> None:
    _write_project(repo.parent)  # above .git: another repository's business
    assert find_project_file([str(repo / "app")]) is None


def test_a_git_file_also_marks_the_top(repo: Path, tmp_path: Path) -> None:
    """A worktree or submodule has a .git file, not a directory."""
    _write_project(tmp_path)
    worktree = tmp_path / "worktree"
    worktree.mkdir()
    (worktree / ".git").write_text("gitdir: ../repo/.git\n")
    assert find_project_file([str(worktree)]) is None


def test_no_project_file(repo: Path) -> None:
    assert find_project_file([str(repo / "app")]) is None


def test_two_different_project_files_are_a_usage_error(repo: Path) -> None:
    (repo / "other").mkdir()
    first, second = _write_project(repo / "app"), _write_project(repo / "other")
    with pytest.raises(UsageError) as caught:
        find_project_file([str(repo / "app"), str(repo / "other")])
    message = str(caught.value)
    assert str(first.resolve()) in message and str(second.resolve()) in message
    assert "--project-file" in message


def test_one_project_file_reached_twice_is_one(repo: Path) -> None:
    path = _write_project(repo)
    found = find_project_file([str(repo / "app"), str(repo / "app" / "sub"),
                               str(repo / "app" / "vm.yaml")])
    assert found == str(path.resolve())


def test_stdin_searches_from_the_working_directory(repo: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_project(repo / "app")
    assert find_project_file(["-"], start=str(repo / "app" / "sub")) == str(path.resolve())
    monkeypatch.chdir(repo / "app" / "sub")
    assert find_project_file(["-"]) == str(path.resolve())
    assert find_project_file([]) == str(path.resolve())  # no -f at all: the same
    monkeypatch.chdir(repo)
    assert find_project_file(["-"]) is None


def test_stdin_and_a_path_under_different_project_files(repo: Path) -> None:
    (repo / "other").mkdir()
    _write_project(repo / "app")
    _write_project(repo / "other")
    with pytest.raises(UsageError):
        find_project_file(["-", str(repo / "app")], start=str(repo / "other"))


# ============================================================================= load_project_file


def test_load_a_project_file(tmp_path: Path) -> None:
    path = _write_project(tmp_path)
    doc = load_project_file(str(path))
    assert doc.kind == PROJECT_KIND and doc.name == "lab"
    assert doc.body["spec"]["hosts"][1]["domainType"] == "kvm"


def test_schema_errors_are_located(tmp_path: Path) -> None:
    path = tmp_path / PROJECT_FILE
    path.write_text(PROJECT_TEXT.replace("qemu:///system", "not a uri")
                    + "  defaults:\n    virtualMachine:\n      disks: []\n")
    with pytest.raises(ManifestError) as caught:
        load_project_file(str(path))
    where = {p.path: str(p.location) for p in caught.value.problems}
    assert set(where) == {"spec.hosts[0].uri", "spec.defaults.virtualMachine.disks"}
    assert where["spec.hosts[0].uri"].startswith(f"{path}:8:")
    assert where["spec.defaults.virtualMachine.disks"].startswith(f"{path}:14:")


def test_a_vm_default_is_checked_as_the_vm_field(tmp_path: Path) -> None:
    path = tmp_path / PROJECT_FILE
    path.write_text(PROJECT_TEXT + "  defaults:\n    virtualMachine:\n      memory: 512\n")
    with pytest.raises(ManifestError) as caught:
        load_project_file(str(path))
    problem = _only(caught)
    assert problem.path == "spec.defaults.virtualMachine.memory"
    assert (problem.location.line, problem.location.column) == (14, 15)


def test_a_file_with_two_documents_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / PROJECT_FILE
    path.write_text(PROJECT_TEXT + "---\n" + PROJECT_TEXT.replace("name: lab", "name: lab2"))
    with pytest.raises(ManifestError) as caught:
        load_project_file(str(path))
    problem = _only(caught)
    assert "exactly one document of kind Project" in problem.message
    assert problem.location.file == str(path)


def test_a_file_without_a_project_document_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / PROJECT_FILE
    path.write_text("apiVersion: kvmctl/v1\nkind: Network\nmetadata: {name: n}\n"
                    "spec: {mode: isolated}\n")
    with pytest.raises(ManifestError) as caught:
        load_project_file(str(path))
    assert "exactly one document of kind Project" in _only(caught).message


def test_a_missing_project_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_project_file(str(tmp_path / PROJECT_FILE))


# ============================================================================= resolve


def test_without_a_project_file() -> None:
    config = resolve(None, Overrides())
    assert config == ProjectConfig("default", (HostConfig(DEFAULT_HOST, "qemu:///system"),),
                                   DEFAULT_HOST)
    assert config.source is None and not config.multi_host


def test_without_a_project_file_the_overrides_make_the_one_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve(None, Overrides("p", "qemu+ssh://kvm/system", "qemu"))
    assert config.name == "p"
    assert config.hosts == (HostConfig(DEFAULT_HOST, "qemu+ssh://kvm/system", "qemu"),)
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert resolve(None, Overrides()).host(DEFAULT_HOST).uri == "test:///default"


def test_the_file_as_written() -> None:
    config = resolve(_project(), Overrides())
    assert config.name == "lab" and config.source == PROJECT_FILE
    assert config.host_names == ("h1", "h2") and config.multi_host
    assert config.default_host == "h1"  # the first host
    assert config.host("h1") == HostConfig("h1", "qemu:///system", "auto")
    assert config.host("h2") == HostConfig("h2", "qemu+ssh://root@kvm-02/system", "kvm")
    assert config.vm_defaults == {}


def test_labels_and_vm_defaults() -> None:
    text = PROJECT_TEXT.replace("domainType: kvm", "labels: {rack: a1, env: lab}") + (
        "  defaults:\n    virtualMachine:\n      memory: 1GiB\n      cpu: {mode: host-model}\n")
    config = resolve(_project(text), Overrides())
    assert config.host("h2").labels == (("env", "lab"), ("rack", "a1"))
    assert config.vm_defaults == {"memory": "1GiB", "cpu": {"mode": "host-model"}}


def test_project_override() -> None:
    assert resolve(_project(), Overrides(project="other")).name == "other"


def test_a_file_without_hosts_has_the_default_host() -> None:
    config = resolve(_project("apiVersion: kvmctl/v1\nkind: Project\nmetadata: {name: x}\n"),
                     Overrides(connect="qemu+tcp://kvm/system"))
    assert config.name == "x"
    assert config.hosts == (HostConfig(DEFAULT_HOST, "qemu+tcp://kvm/system"),)


def test_connect_replaces_only_the_default_hosts_uri() -> None:
    text = PROJECT_TEXT + "  defaultHost: h2\n"
    config = resolve(_project(text), Overrides(connect="qemu+tls://elsewhere/system"))
    assert config.default_host == "h2"
    assert config.host("h2").uri == "qemu+tls://elsewhere/system"
    assert config.host("h1").uri == "qemu:///system"
    first = resolve(_project(), Overrides(connect="qemu+tls://elsewhere/system"))
    assert first.host("h1").uri == "qemu+tls://elsewhere/system"
    assert first.host("h2").uri == "qemu+ssh://root@kvm-02/system"


def test_domain_type_override_applies_to_every_host() -> None:
    config = resolve(_project(), Overrides(domain_type="qemu"))
    assert [h.domain_type for h in config.hosts] == ["qemu", "qemu"]
    assert [h.domain_type for h in resolve(_project(), Overrides()).hosts] == ["auto", "kvm"]


def test_an_unknown_default_host_is_a_located_error() -> None:
    text = PROJECT_TEXT + "  defaultHost: h3\n"
    problem = _resolve_problem(text)
    assert problem.path == "spec.defaultHost"
    assert (problem.location.file, problem.location.line, problem.location.column) == (
        PROJECT_FILE, 12, 16)
    assert "'h3'" in problem.message and problem.hint == "hosts: h1, h2"


def test_duplicate_host_names_are_a_located_error() -> None:
    text = PROJECT_TEXT + "    - name: h1\n      uri: qemu+ssh://kvm-03/system\n"
    problem = _resolve_problem(text)
    assert "duplicate host 'h1'" in problem.message
    assert problem.path == "spec.hosts[2].name"
    assert (problem.location.line, problem.location.column) == (12, 7)  # the second one


def test_one_hypervisor_under_two_names_is_refused() -> None:
    # A move from one of its names to the other would delete what it copies.
    text = PROJECT_TEXT + "    - name: h3\n      uri: qemu+ssh://root@kvm-02/system\n"
    problem = _resolve_problem(text)
    assert "host 'h3' has the URI of host 'h2'" in problem.message
    assert problem.path == "spec.hosts[2].uri"
    with pytest.raises(UsageError, match="'h1' and 'h2' would both be"):
        resolve(_project(PROJECT_TEXT), Overrides(connect="qemu+ssh://root@kvm-02/system"))


# ============================================================================= with_defaults

VM_TEXT = """\
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata: {name: a}
spec:
  memory: 2GiB
---
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata: {name: b}
spec: {}
---
apiVersion: kvmctl/v1
kind: Network
metadata: {name: n}
spec: {mode: isolated}
"""


def test_with_defaults_fills_only_what_a_vm_leaves_out() -> None:
    defaults = {"memory": "1GiB", "cpu": {"mode": "host-model"}, "state": "stopped"}
    config = ProjectConfig("p", TWO_HOSTS.hosts, "h1", defaults)
    docs = _docs(VM_TEXT)
    a, b, net = with_defaults(docs, config)
    assert a.body["spec"] == {"memory": "2GiB", "cpu": {"mode": "host-model"},
                              "state": "stopped"}
    assert b.body["spec"] == defaults
    assert net is docs[2]
    assert docs[0].body["spec"] == {"memory": "2GiB"}  # the loaded documents are unchanged
    assert a.source == docs[0].source and a.positions is docs[0].positions
    b.body["spec"]["cpu"]["mode"] = "custom"  # each VM has its own copy
    assert a.body["spec"]["cpu"] == {"mode": "host-model"} == config.vm_defaults["cpu"]


def test_a_whole_field_is_filled_never_merged() -> None:
    config = ProjectConfig("p", TWO_HOSTS.hosts, "h1",
                           {"memory": {"size": "1GiB", "max": "4GiB"}})
    [vm] = with_defaults(_docs(VM_TEXT)[:1], config)
    assert vm.body["spec"]["memory"] == "2GiB"


def test_without_defaults_the_documents_are_unchanged() -> None:
    docs = _docs(VM_TEXT)
    assert with_defaults(docs, TWO_HOSTS) == docs


# ============================================================================= place

POOL = """\
apiVersion: kvmctl/v1
kind: StoragePool
metadata: {name: pool}
spec: {path: /var/lib/kvmctl/pools/p%s}
"""
NET = """\
apiVersion: kvmctl/v1
kind: Network
metadata: {name: net}
spec: {mode: isolated%s}
"""
DISK = """\
apiVersion: kvmctl/v1
kind: Disk
metadata: {name: %s}
spec: {pool: pool, size: 1GiB}
"""


def _vm(name: str, host: str | None = None, disks: tuple[str, ...] = (),
        network: str | None = None) -> str:
    lines = ["apiVersion: kvmctl/v1", "kind: VirtualMachine", f"metadata: {{name: {name}}}",
             "spec:"]
    if host:
        lines.append(f"  host: {host}")
    if disks:
        lines.append("  disks:")
        lines += [f"    - disk: {d}" for d in disks]
    if network:
        lines += ["  interfaces:", f"    - network: {network}"]
    if len(lines) == 4:
        lines[-1] = "spec: {}"
    return "\n".join(lines) + "\n"


def _set(*parts: str) -> list[Document]:
    return _docs("---\n".join(parts))


def _names(docs: tuple[Document, ...]) -> list[str]:
    return [f"{d.kind}/{d.name}" for d in docs]


def test_a_vm_without_host_is_on_the_default_host() -> None:
    placement = place(_set(_vm("a"), _vm("b", host="h2")), TWO_HOSTS)
    assert _names(placement.by_host["h1"]) == ["VirtualMachine/a"]
    assert _names(placement.by_host["h2"]) == ["VirtualMachine/b"]
    assert placement.hosts_of("VirtualMachine", "a") == ("h1",)
    assert placement.hosts_of("VirtualMachine", "b") == ("h2",)


def test_an_unknown_vm_host_is_a_located_error_listing_the_hosts() -> None:
    with pytest.raises(ManifestError) as caught:
        place(_set(_vm("a", host="h9")), TWO_HOSTS)
    problem = _only(caught)
    assert problem.message == f"host 'h9' is not a host of the project in {PROJECT_FILE}"
    assert problem.path == "spec.host"
    assert (problem.location.file, problem.location.line, problem.location.column) == (
        "m.yaml", 5, 9)
    assert problem.hint == "hosts: h1, h2"


def test_an_unknown_host_without_a_project_file_says_so() -> None:
    with pytest.raises(ManifestError) as caught:
        place(_set(_vm("a", host="h1")), resolve(None, Overrides()))
    problem = _only(caught)
    assert "(there is no project file)" in problem.message and problem.hint == "hosts: default"


def test_networks_pools_and_images_go_to_their_hosts() -> None:
    image = ("apiVersion: kvmctl/v1\nkind: Image\nmetadata: {name: img}\n"
             "spec: {pool: pool, path: /srv/a.qcow2, hosts: [h2]}\n")
    placement = place(_set(NET % ", hosts: all", POOL % ""), TWO_HOSTS)
    assert placement.hosts_of("Network", "net") == ("h1", "h2")
    assert placement.hosts_of("StoragePool", "pool") == ("h1",)  # the default host
    assert _names(placement.by_host["h2"]) == ["Network/net"]
    with pytest.raises(ManifestError) as caught:  # the image's pool is not on h2
        place(_set(NET % ", hosts: all", POOL % "", image), TWO_HOSTS)
    problem = _only(caught)
    assert problem.path == "spec.pool" and problem.location.line == 14
    assert problem.message == ("StoragePool 'pool' is not on host 'h2', where this Image lives "
                               "(it is on 'h1')")
    placement = place(_set(POOL % ", hosts: [h2, h1]", image), TWO_HOSTS)
    assert placement.hosts_of("StoragePool", "pool") == ("h1", "h2")  # in the project's order
    assert placement.hosts_of("Image", "img") == ("h2",)


def test_an_unknown_host_in_hosts_is_a_located_error() -> None:
    with pytest.raises(ManifestError) as caught:
        place(_set(NET % ", hosts: [h1, h7]"), TWO_HOSTS)
    problem = _only(caught)
    assert problem.path == "spec.hosts[1]" and "'h7'" in problem.message
    assert (problem.location.line, problem.location.column) == (4, 36)
    assert problem.hint == "hosts: h1, h2"


def test_a_disk_follows_its_vm() -> None:
    placement = place(_set(POOL % ", hosts: all", DISK % "d1", DISK % "d2", DISK % "spare",
                           _vm("a", host="h2", disks=("d1", "d2"))), TWO_HOSTS)
    assert placement.hosts_of("Disk", "d1") == ("h2",)
    assert placement.hosts_of("Disk", "d2") == ("h2",)
    assert placement.hosts_of("Disk", "spare") == ("h1",)  # used by no VM: the default host
    assert _names(placement.by_host["h2"]) == ["StoragePool/pool", "Disk/d1", "Disk/d2",
                                               "VirtualMachine/a"]


def test_a_disk_shared_by_vms_on_one_host_is_fine() -> None:
    placement = place(_set(POOL % ", hosts: all", DISK % "d", _vm("a", "h2", ("d",)),
                           _vm("b", "h2", ("d",))), TWO_HOSTS)
    assert placement.hosts_of("Disk", "d") == ("h2",)


def test_a_disk_used_by_vms_on_two_hosts_is_an_error_at_the_second_vm() -> None:
    docs = _set(POOL % ", hosts: all", DISK % "d", DISK % "e", _vm("a", "h1", ("d",)),
                _vm("b", "h2", ("e", "d")))
    with pytest.raises(ManifestError) as caught:
        place(docs, TWO_HOSTS)
    problem = _only(caught)
    assert problem.message == ("Disk 'd' is used by VMs on two hosts: 'a' on 'h1' and 'b' on "
                               "'h2'")
    assert problem.path == "spec.disks[1].disk"
    vm_b = docs[4]
    assert problem.location == vm_b.locate(("spec", "disks", 1, "disk", "<value>"))
    assert (problem.location.line, problem.location.column) == (31, 13)
    assert "its own Disk" in problem.hint


def test_a_vm_whose_network_is_on_another_host_is_an_error() -> None:
    with pytest.raises(ManifestError) as caught:
        place(_set(NET % ", hosts: [h1]", _vm("a", "h2", network="net")), TWO_HOSTS)
    problem = _only(caught)
    assert problem.message == ("Network 'net' is not on host 'h2', where this VM runs "
                               "(it is on 'h1')")
    assert problem.path == "spec.interfaces[0].network"
    assert (problem.location.line, problem.location.column) == (12, 16)
    assert problem.hint == "add 'h2' to the Network's spec.hosts, or use \"all\""
    place(_set(NET % ", hosts: all", _vm("a", "h2", network="net")), TWO_HOSTS)


def test_a_disk_whose_pool_is_not_on_its_host_is_an_error() -> None:
    with pytest.raises(ManifestError) as caught:
        place(_set(POOL % "", DISK % "d", _vm("a", "h2", ("d",))), TWO_HOSTS)
    problem = _only(caught)
    assert problem.message == ("StoragePool 'pool' is not on host 'h2', where this Disk lives "
                               "(with its VM) (it is on 'h1')")
    assert problem.path == "spec.pool"
    assert (problem.location.line, problem.location.column) == (9, 14)


def test_a_disk_whose_image_is_not_on_its_host_is_an_error() -> None:
    image = ("apiVersion: kvmctl/v1\nkind: Image\nmetadata: {name: img}\n"
             "spec: {pool: pool, path: /srv/a.qcow2}\n")
    disk = ("apiVersion: kvmctl/v1\nkind: Disk\nmetadata: {name: d}\n"
            "spec: {pool: pool, image: img, size: 1GiB}\n")
    with pytest.raises(ManifestError) as caught:
        place(_set(POOL % ", hosts: all", image, disk, _vm("a", "h2", ("d",))), TWO_HOSTS)
    problem = _only(caught)
    assert problem.path == "spec.image" and "Image 'img' is not on host 'h2'" in problem.message


def test_references_to_undeclared_objects_are_left_to_the_reference_checks() -> None:
    placement = place(_set(_vm("a", "h2", ("missing",), network="nowhere")), TWO_HOSTS)
    assert _names(placement.by_host["h2"]) == ["VirtualMachine/a"]


def test_an_unknown_vm_host_is_reported_once() -> None:
    with pytest.raises(ManifestError) as caught:
        place(_set(NET % ", hosts: all", POOL % ", hosts: all", DISK % "d",
                   _vm("a", "h9", ("d",), network="net")), TWO_HOSTS)
    assert [p.path for p in caught.value.problems] == ["spec.host"]


# ============================================================================= probable_uris

def test_the_uris_to_connect_to_early_are_read_before_the_schema_check() -> None:
    from kvmctl.manifest.project import probable_uris
    doc = _project()
    assert probable_uris(doc, Overrides()) == ["qemu:///system", "qemu+ssh://root@kvm-02/system"]
    # --connect is where the default host (the first, here) is reached; --host limits
    assert probable_uris(doc, Overrides(connect="qemu+tls://x/system")) == [
        "qemu+tls://x/system", "qemu+ssh://root@kvm-02/system"]
    assert probable_uris(doc, Overrides(), only=("h2",)) == ["qemu+ssh://root@kvm-02/system"]
    # whatever does not look like a host is left out, never an error: the schema says why
    broken = _project(PROJECT_TEXT.replace("uri: qemu:///system", "uri: [1]"))
    assert probable_uris(broken, Overrides()) == ["qemu+ssh://root@kvm-02/system"]
    assert probable_uris(_project("apiVersion: kvmctl/v1\nkind: Project\nspec: {hosts: 3}\n"),
                         Overrides(connect="qemu:///system")) == ["qemu:///system"]
    assert probable_uris(None, Overrides()) == []
