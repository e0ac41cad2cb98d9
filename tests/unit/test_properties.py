"""Properties of the whole pipeline (load, schemas, checks, model, render) over generated input.

- Any text at all, any YAML, any plain value as a document: the outcome is documents, a model
  and XML, or a ManifestError whose problems are located in the file and printable. Never
  another exception.
- Manifest sets that are valid but for a few fields (hostile strings, odd numbers, wrong types,
  values past the limits): the same, and every XML rendered parses with lxml and satisfies
  libvirt's RelaxNG schema of its kind.
- A hostile string (quotes, <, &, ]]>, CDATA, control characters, unicode) in a value that
  reaches the XML, or as the project: refused with a located problem, or rendered with the
  same element and attribute paths as a benign string, the value arriving unchanged.

Bounded for CI: the fixed profile below is derandomized (the same examples every run, no
example database) with a set number of examples per property; the totals, the time and how
many examples got as far as rendering are printed at the end of the module (`-s` not needed).
"""

from __future__ import annotations

import copy
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from kvmctl.errors import Location, ManifestError, Problem
from kvmctl.kinds import NAMESPACE
from kvmctl.manifest import documents, validate
from kvmctl.manifest.documents import Document
from kvmctl.manifest.model import ManifestSet
from kvmctl.render import definitions as render

LIBVIRT_SCHEMAS = Path("/usr/share/libvirt/schemas")
RNG_FILES = {"VirtualMachine": "domain.rng", "Network": "network.rng",
             "StoragePool": "storagepool.rng", "Disk": "storagevol.rng",
             "Image": "storagevol.rng"}

settings.register_profile(
    "kvmctl-properties", derandomize=True, database=None, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much])
PROFILE = settings.get_profile("kvmctl-properties")


def bounded(examples: int) -> settings:
    return settings(PROFILE, max_examples=examples)


STATS: Counter[str] = Counter()
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    examples = sum(v for k, v in STATS.items() if k.startswith("examples:"))
    lines = [f"hypothesis (profile kvmctl-properties, derandomized): {examples} examples in "
             f"{elapsed:.1f} s"]
    for key in sorted(STATS):
        if key.startswith("examples:"):
            name = key.removeprefix("examples:")
            lines.append(f"  {name}: {STATS[key]} examples, {STATS['rendered:' + name]} "
                         f"rendered, {TIMES.get(name, 0):.1f} s")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover (pytest without its terminal)
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


NAMES: dict[str, str] = {}


def counted(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Count the examples a property runs (its time, generation included, is taken by
    `timed`)."""
    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        NAMES[test.__name__] = name

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            STATS["examples:" + name] += 1
            test(*args, **kwargs)
        return run
    return wrap


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.perf_counter()
    yield
    name = NAMES.get(request.node.name)
    if name:
        TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - started


@pytest.fixture(scope="module")
def relaxng() -> dict[str, Any]:
    missing = [n for n in set(RNG_FILES.values()) if not (LIBVIRT_SCHEMAS / n).is_file()]
    if missing:
        pytest.fail(f"libvirt's RelaxNG schemas are missing from {LIBVIRT_SCHEMAS}: run "
                    "scripts/host-setup", pytrace=False)
    parsed = {n: etree.RelaxNG(etree.parse(str(LIBVIRT_SCHEMAS / n)))
              for n in set(RNG_FILES.values())}
    return {kind: parsed[name] for kind, name in RNG_FILES.items()}


# ---------------------------------------------------------------------------- the outcome


def _check_problems(exc: ManifestError, file: str = "m.yaml") -> None:
    assert exc.problems, "a ManifestError without problems"
    for problem in exc.problems:
        assert isinstance(problem, Problem)
        assert problem.location.file == file, problem
        for text in (problem.message, problem.path, problem.hint):
            assert text.isprintable(), f"unprintable problem text: {text!r}"
        assert str(problem)


def outcome(run: Callable[[], ManifestSet]) -> ManifestSet | None:
    """The model `run` builds, or None for a ManifestError (checked); anything else fails."""
    try:
        return run()
    except ManifestError as exc:
        _check_problems(exc)
        return None


def render_checked(manifest: ManifestSet, relaxng: dict[str, Any], project: str = "p"
                   ) -> dict[tuple[str, str], Any]:
    """Every object's XML, parsed and validated against libvirt's schema of its kind."""
    parsed = {}
    for domain_type in ("kvm", "qemu"):
        for r in render.render_all(manifest, project, domain_type):
            root = etree.fromstring(r.xml.encode("utf-8"))
            schema = relaxng[r.kind]
            assert schema.validate(root), (r.kind, r.name, schema.error_log.last_error, r.xml)
            parsed[(r.kind, r.name)] = root
    desired = render.render_desired(manifest, project, "kvm")
    for seed in desired.seeds.values():
        assert seed.content.user_data is not None
    return parsed


# ---------------------------------------------------------------------------- strategies


HOSTILE_PIECES = ["<", ">", "&", "'", '"', "]]>", "<!--", "-->", "&amp;", "&#x41;", "&#0;",
                  "<![CDATA[x]]>", "<?xml version='1.0'?>", "</domain>", "\x00", "\x01", "\x08",
                  "\x0b", "\x1b", "\x1f", "\t", "\n", "\r", "\r\n", "\x7f", "\x85", "\xa0",
                  "\u2028", "\ufeff", "\ufffe", "\uffff", "\ud800", "\udfff", "é", "ß", "€",
                  "😀", "\U0010ffff", "{{ 7*7 }}", "{%", "$", "\\", "\\n", "%s", "*a", "&a",
                  "#", ": ", "- ", "? ", "!!python/object", "~", "null", "true", "0x10"]
hostile_strings = st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES),
                                     st.text(max_size=4)), max_size=6).map("".join)
odd_numbers = st.one_of(
    st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1.0, 2.0, 1500.0, 1e308, -0.0, 0.5,
                                                2**63, 2**64, 10**40, 65536, 1025]),
    st.floats(allow_nan=False, allow_infinity=True))
wrong_types = st.one_of(st.none(), st.booleans(), st.just([]), st.just({}),
                        st.lists(st.integers(), max_size=2), st.dictionaries(
                            st.sampled_from(["a", "b"]), st.integers(), max_size=2))
oddities = st.one_of(hostile_strings, odd_numbers, wrong_types)


def field(valid: st.SearchStrategy[Any], odd: st.SearchStrategy[Any] = oddities
          ) -> st.SearchStrategy[Any]:
    """Mostly `valid`; one time in 40 something odd (not at 0: hypothesis favours 0)."""
    return st.integers(0, 39).flatmap(lambda n: odd if n == 23 else valid)


def odd_suffix(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid string; one time in 40 with a hostile tail, one in 40 with a trailing newline."""
    return st.tuples(valid, st.integers(0, 39), hostile_strings).map(
        lambda t: t[0] + t[2] if t[1] == 23 else (t[0] + "\n" if t[1] == 31 else t[0]))


ODD_SIZES = st.sampled_from(["2TB", "0B", "20G", "1023B", "16EiB", "18446744073709551616B",
                             "3KiB", "1e3MiB", "-1GiB", "1.5B", "9" * 50 + "GiB", "512", "GiB"])
small_sizes = field(st.sampled_from(["64MiB", "256MiB", "512MiB", "1 GiB"]), ODD_SIZES)
large_sizes = field(st.sampled_from(["1GiB", "1.5GiB", "2GiB"]), ODD_SIZES)
paths = odd_suffix(st.sampled_from(["/var/lib/kvmctl/p", "/images/base.qcow2", "/boot/vmlinuz",
                                    "/var/log/vm.log", "/p"]))
labels = st.dictionaries(odd_suffix(st.sampled_from(["env", "kvmctl.dev/owner", "team"])),
                         field(st.sampled_from(["lab", "team-a", ""]), hostile_strings),
                         max_size=3)


def _meta(name: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"name": odd_suffix(st.just(name))},
                                 optional={"labels": labels})


def _pool(i: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"apiVersion": st.just("kvmctl/v1"), "kind": st.just("StoragePool"),
         "metadata": _meta(f"pool{i}"),
         "spec": st.fixed_dictionaries({"path": paths},
                                       optional={"autostart": field(st.booleans()),
                                                 "type": field(st.just("dir"))})})


def _network(i: int) -> st.SearchStrategy[dict[str, Any]]:
    base = f"10.{200 + i}.0"
    ipv4 = st.fixed_dictionaries(
        {"cidr": odd_suffix(st.just(f"{base}.0/24")),
         "dhcp": field(st.fixed_dictionaries({"start": odd_suffix(st.just(f"{base}.100")),
                                              "end": odd_suffix(st.just(f"{base}.199"))}))},
        optional={"gateway": odd_suffix(st.sampled_from([f"{base}.1", f"{base}.254"]))})
    dns = st.fixed_dictionaries({}, optional={
        "domain": odd_suffix(st.just("lab.test")),
        "hosts": st.lists(st.fixed_dictionaries(
            {"ip": odd_suffix(st.just(f"{base}.50")),
             "hostnames": st.lists(odd_suffix(st.sampled_from(["web", "db"])), min_size=1,
                                   max_size=2, unique=True)}),
            max_size=2)})
    return st.fixed_dictionaries(
        {"apiVersion": st.just("kvmctl/v1"), "kind": st.just("Network"),
         "metadata": _meta(f"net{i}"),
         "spec": st.fixed_dictionaries(
             {"mode": field(st.sampled_from(["nat", "isolated", "route"])), "ipv4": field(ipv4)},
             optional={"dns": field(dns), "mtu": field(st.sampled_from([1500, 9000, 68, 65535])),
                       "bridge": odd_suffix(st.just(f"virbr-k{i}")),
                       "autostart": field(st.booleans()), "protect": field(st.booleans())})})


def _disk(i: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"apiVersion": st.just("kvmctl/v1"), "kind": st.just("Disk"),
         "metadata": _meta(f"disk{i}"),
         "spec": st.fixed_dictionaries(
             {"pool": field(st.just("pool0")), "size": large_sizes},
             optional={"format": field(st.just("qcow2")), "protect": field(st.booleans())})})


def _interface(vm: int, nets: int) -> st.SearchStrategy[dict[str, Any]]:
    on_network = st.integers(0, max(0, nets - 1)).flatmap(lambda n: st.fixed_dictionaries(
        {"network": field(st.just(f"net{n}"))},
        optional={"ip": odd_suffix(st.just(f"10.{200 + n}.0.X")),
                  "mac": odd_suffix(st.just("52:54:00:12:34:X")),
                  "model": field(st.sampled_from(["virtio", "e1000e", "e1000", "rtl8139"])),
                  "linkState": field(st.sampled_from(["up", "down"]))}))
    on_bridge = st.fixed_dictionaries({"bridge": odd_suffix(st.just("kvmbr0"))},
                                      optional={"mac": odd_suffix(st.just("52:54:00:ab:cd:X"))})
    return st.one_of(on_network, on_network, on_bridge) if nets else on_bridge


def _vm(i: int, disks: list[int], nets: int) -> st.SearchStrategy[dict[str, Any]]:
    attachment = st.fixed_dictionaries(
        {"disk": field(st.sampled_from(disks).map(lambda n: f"disk{n}") if disks
                       else st.just("disk0"))},
        optional={"bus": field(st.sampled_from(["virtio", "sata", "scsi"])),
                  "readonly": field(st.booleans())})
    user_data = st.one_of(
        st.fixed_dictionaries({}, optional={
            "packages": st.lists(field(st.just("qemu-guest-agent"), hostile_strings), max_size=2),
            "ssh_authorized_keys": field(st.lists(st.just("ssh-rsa AAAA x"), max_size=1)),
            "write_files": st.lists(st.fixed_dictionaries(
                {"path": paths, "content": field(st.just("hello"), hostile_strings)}),
                max_size=2)}),
        field(st.just("#cloud-config\npackage_update: true\n"), st.builds(
            lambda body: "#cloud-config\n" + body, st.one_of(
                hostile_strings, st.just("ssh_authorized_keys: [[a], {b: c}]\n"),
                st.integers(1, 3000).map(lambda n: "x: " + "[" * n + "]" * n + "\n"),
                st.just("when: 2024-13-45\n")))))
    cloud_init = st.fixed_dictionaries({}, optional={
        "hostname": odd_suffix(st.just(f"vm{i}")), "userData": user_data,
        "sshAuthorizedKeys": st.lists(odd_suffix(st.just("ssh-ed25519 AAAA me@lab")),
                                      max_size=2),
        "instanceId": field(st.just(f"vm{i}-1"), hostile_strings),
        "networkConfig": field(st.just({"version": 2}))})
    boot = st.one_of(
        st.fixed_dictionaries({"order": field(st.lists(st.sampled_from(["hd", "cdrom", "network"]),
                                                       min_size=1, max_size=3, unique=True))}),
        st.fixed_dictionaries({"kernel": paths}, optional={
            "initrd": paths, "cmdline": field(st.just("console=ttyS0"), hostile_strings)}))
    spec = st.fixed_dictionaries({}, optional={
        "cpus": field(st.one_of(st.integers(1, 8), st.fixed_dictionaries(
            {"count": field(st.integers(1, 2))}, optional={"max": field(st.integers(2, 8))}))),
        "memory": field(st.one_of(small_sizes, st.fixed_dictionaries(
            {"size": small_sizes}, optional={"max": large_sizes}))),
        "machine": field(st.sampled_from(["q35", "pc"])),
        "firmware": field(st.sampled_from(["bios", "uefi"])),
        "domainType": field(st.sampled_from(["kvm", "qemu"])),
        "cpu": field(st.one_of(
            st.fixed_dictionaries({"mode": st.sampled_from(["host-passthrough", "host-model"])}),
            st.fixed_dictionaries({"mode": st.just("custom"),
                                   "model": field(st.just("qemu64"), hostile_strings)}))),
        "boot": field(boot),
        "disks": field(st.lists(attachment, max_size=3) if disks else st.just([])),
        "interfaces": field(st.lists(_interface(i, nets), max_size=3)),
        "cloudInit": field(cloud_init),
        "graphics": field(st.one_of(st.sampled_from(["none", "vnc", "spice"]),
                                    st.fixed_dictionaries({"type": st.sampled_from(["vnc"])},
                                                          optional={"listen": odd_suffix(
                                                              st.just("127.0.0.1"))}))),
        "console": field(st.fixed_dictionaries({"log": paths})),
        "guestAgent": field(st.booleans()), "autostart": field(st.booleans()),
        "state": field(st.sampled_from(["running", "stopped"])),
        "onRestartNeeded": field(st.sampled_from(["defer", "restart", "fail"])),
        "shutdownTimeout": field(st.integers(1, 86400))})
    return st.fixed_dictionaries(
        {"apiVersion": st.just("kvmctl/v1"), "kind": st.just("VirtualMachine"),
         "metadata": _meta(f"vm{i}"), "spec": spec})


def _number_placeholders(docs: list[dict[str, Any]]) -> None:
    """Give every generated `...X` address a value of its own: reservations and MACs are
    unique across the set, as the rules want (a hostile tail stays where it is)."""
    counter = 10
    for doc in docs:
        spec = doc.get("spec")
        nics = spec.get("interfaces") if isinstance(spec, dict) else None
        for nic in nics if isinstance(nics, list) else ():
            if not isinstance(nic, dict):
                continue
            for key in ("ip", "mac"):
                if isinstance(nic.get(key), str) and "X" in nic[key]:
                    counter += 1
                    nic[key] = nic[key].replace("X", str(counter) if key == "ip"
                                                else f"{counter:02x}", 1)


@st.composite
def manifest_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    disks, nets, vms = draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 2))
    docs = [draw(_pool(0))]
    docs += [draw(_disk(i)) for i in range(disks)]
    docs += [draw(_network(i)) for i in range(nets)]
    # each VM its own disks (a disk attached to two VMs is a rule of its own, tested elsewhere)
    docs += [draw(_vm(i, [d for d in range(disks) if d % 2 == i], nets)) for i in range(vms)]
    _number_placeholders(docs)
    if draw(st.integers(0, 19)) == 13:  # a mistyped envelope
        doc = draw(st.sampled_from(docs))
        doc[draw(st.sampled_from(["apiVersion", "kind", "metadata", "spec"]))] = draw(oddities)
    return docs


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, allow_unicode=True, sort_keys=False, width=2**16)


# ---------------------------------------------------------------------------- properties

YAML_ALPHABET = st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?~\n\n  \t\\") +
                                ["apiVersion: kvmctl/v1\n", "kind: VirtualMachine\n",
                                 "metadata: {name: v}\n", "spec:\n", "  cpus: ", "---\n",
                                 "&a ", "*a", "<<: ", "!!binary ", "!!python/object ", "9" * 40,
                                 "1.0", "\x00", "\ufffe", "é", "\r"])
yaml_texts = st.one_of(st.text(max_size=200),
                       st.lists(st.one_of(YAML_ALPHABET, st.text(max_size=3)), max_size=60)
                       .map("".join))


@bounded(500)
@given(text=yaml_texts)
@counted("any text")
def test_any_text_ends_in_a_model_or_located_problems(text: str) -> None:
    outcome(lambda: validate.validate(documents.parse_text(text, "m.yaml")))


@bounded(300)
@given(docs=manifest_sets())
@counted("generated manifest sets")
def test_generated_manifest_sets_end_in_located_problems_or_xml_libvirt_accepts(
        docs: list[dict[str, Any]], relaxng: dict[str, Any]) -> None:
    text = to_yaml(docs)
    manifest = outcome(lambda: validate.validate(documents.parse_text(text, "m.yaml")))
    if manifest is not None:
        render_checked(manifest, relaxng)
        STATS["rendered:generated manifest sets"] += 1


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), odd_numbers, hostile_strings,
              st.floats(allow_nan=True)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(hostile_strings, st.sampled_from(
                                ["count", "max", "size", "disk", "network", "ipv4", "cidr",
                                 "userData", "labels", "name"])), inner, max_size=3)),
    max_leaves=12)


@bounded(200)
@given(docs=manifest_sets(), where=st.lists(st.integers(0, 2**16), min_size=2, max_size=5),
       value=json_values)
@counted("plain values in place of fields")
def test_any_plain_value_in_place_of_any_field_ends_in_located_problems_or_xml(
        docs: list[dict[str, Any]], where: list[int], value: Any,
        relaxng: dict[str, Any]) -> None:
    """Documents built without YAML: NaN, nested lists and maps, any key, anywhere."""
    bodies = copy.deepcopy(docs)
    target: Any = bodies[where[0] % len(bodies)]
    for step in where[1:]:
        if isinstance(target, dict) and target:
            key = sorted(target, key=str)[step % len(target)]
            if isinstance(target[key], (dict, list)) and target[key]:
                target = target[key]
    if isinstance(target, dict) and target:
        target[sorted(target, key=str)[where[-1] % len(target)]] = value
    elif isinstance(target, list) and target:
        target[where[-1] % len(target)] = value
    located = [Document(body, Location("m.yaml", 1, 1), {}) for body in bodies]
    manifest = outcome(lambda: validate.validate(located))
    if manifest is not None:
        render_checked(manifest, relaxng)
        STATS["rendered:plain values in place of fields"] += 1


# ---- hostile strings never change the structure --------------------------------------------

TEMPLATE = [
    {"apiVersion": "kvmctl/v1", "kind": "StoragePool",
     "metadata": {"name": "pool", "labels": {"note": "VALUE"}},
     "spec": {"path": "/var/lib/kvmctl/VALUE"}},
    {"apiVersion": "kvmctl/v1", "kind": "Network",
     "metadata": {"name": "net", "labels": {"note": "VALUE"}},
     "spec": {"ipv4": {"cidr": "10.96.0.0/24",
                       "dhcp": {"start": "10.96.0.100", "end": "10.96.0.199"}}}},
    {"apiVersion": "kvmctl/v1", "kind": "Image", "metadata": {"name": "img"},
     "spec": {"pool": "pool", "path": "/images/VALUE"}},
    {"apiVersion": "kvmctl/v1", "kind": "Disk", "metadata": {"name": "root"},
     "spec": {"pool": "pool", "image": "img", "size": "1GiB"}},
    {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
     "metadata": {"name": "vm", "labels": {"note": "VALUE"}},
     "spec": {"cpu": {"mode": "custom", "model": "VALUE"},
              "boot": {"kernel": "/boot/VALUE", "initrd": "/boot/VALUE.img",
                       "cmdline": "console=ttyS0 VALUE"},
              "disks": [{"disk": "root"}], "interfaces": [{"network": "net", "ip": "10.96.0.10"}],
              "console": {"log": "/var/log/VALUE"},
              "cloudInit": {"hostname": "vm", "instanceId": "VALUE",
                            "userData": {"write_files": [{"path": "/etc/x",
                                                          "content": "VALUE"}]}}}},
]


def _substituted(value: str) -> list[dict[str, Any]]:
    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: sub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node.replace("VALUE", value) if isinstance(node, str) else node
    return [sub(doc) for doc in TEMPLATE]


def element_paths(root: Any) -> set[str]:
    """Every element path and attribute name of a document: its structure, not its text."""
    found: set[str] = set()

    def walk(element: Any, prefix: str) -> None:
        path = f"{prefix}/{element.tag}"
        found.add(path)
        found.update(f"{path}/@{name}" for name in element.attrib)
        for child in element:
            if isinstance(child.tag, str):
                walk(child, path)
            else:  # a comment or processing instruction would be a structure change too
                found.add(f"{path}/<{type(child).__name__}>")
    walk(root, "")
    return found


def _xml_text(value: str) -> str:
    """What an XML parser gives back for `value` written as escaped text (line ends become
    newlines: XML 1.0 section 2.11)."""
    return value.replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture(scope="module")
def benign(relaxng: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    manifest = validate.validate(documents.parse_text(to_yaml(_substituted("harmless")),
                                                      "m.yaml"))
    return {key: element_paths(root) for key, root in render_checked(manifest, relaxng).items()}


@bounded(400)
@given(value=hostile_strings)
@counted("hostile strings in every XML value")
def test_a_hostile_string_is_refused_or_leaves_the_xml_structure_unchanged(
        value: str, relaxng: dict[str, Any], benign: dict[tuple[str, str], set[str]]) -> None:
    text = to_yaml(_substituted(value))
    manifest = outcome(lambda: validate.validate(documents.parse_text(text, "m.yaml")))
    if manifest is None:
        return
    parsed = render_checked(manifest, relaxng)
    assert {key: element_paths(root) for key, root in parsed.items()} == benign
    # The values as the model holds them (YAML itself folds a raw U+0085 or U+2028 line
    # break) arrive in the XML unchanged.
    model_vm, pool = manifest.vms[0], manifest.pools[0]
    vm = parsed[("VirtualMachine", "vm")]
    ns = {"k": NAMESPACE}
    assert vm.findtext("os/cmdline") == _xml_text(model_vm.cmdline or "")
    assert vm.findtext("cpu/model") == _xml_text(model_vm.cpu_model or "")
    assert vm.findtext("metadata/k:resource/k:label[@key='note']", namespaces=ns) == \
        _xml_text(dict(model_vm.meta.labels)["note"])
    assert parsed[("StoragePool", "pool")].findtext("target/path") == _xml_text(pool.path)
    log = model_vm.console_log or ""
    if not any(c in log for c in "\t\n\r"):  # attribute values are whitespace-normalized
        assert vm.find("devices/serial/log").get("file") == log
    STATS["rendered:hostile strings in every XML value"] += 1


@bounded(150)
@given(project=hostile_strings)
@counted("hostile project names")
def test_a_hostile_project_name_is_refused_by_the_cli_or_leaves_the_structure_unchanged(
        project: str, relaxng: dict[str, Any], benign: dict[tuple[str, str], set[str]]) -> None:
    import argparse

    from kvmctl.cli.options import project_name
    try:
        project_name(project)
    except argparse.ArgumentTypeError as exc:
        assert ("which XML cannot carry" in str(exc) or "more than one line" in str(exc)) \
            and str(exc).isprintable()
        return
    manifest = validate.validate(documents.parse_text(to_yaml(_substituted("harmless")),
                                                      "m.yaml"))
    parsed = render_checked(manifest, relaxng, project=project)
    assert {key: element_paths(root) for key, root in parsed.items()} == benign
    assert parsed[("VirtualMachine", "vm")].findtext(
        "metadata/k:resource/k:project", namespaces={"k": NAMESPACE}) == _xml_text(project)
    STATS["rendered:hostile project names"] += 1


def test_the_properties_reached_rendering_often_enough() -> None:
    """A property whose examples all stop at validation would check nothing about the XML."""
    for name, least in (("generated manifest sets", 0.2), ("hostile strings in every XML value",
                                                           0.2), ("hostile project names", 0.3)):
        ran = STATS["examples:" + name]
        if ran:  # the property ran in this session (not deselected)
            assert STATS["rendered:" + name] >= least * ran, (name, dict(STATS))
