"""Hostile input, class by class: each is refused at its root with a located problem, for every
field of its shape (found from the schemas and the golden manifests, not listed by hand), and
never crashes. The invalid-manifest corpus (tests/fixtures/invalid/) holds one example of each
class end to end through the CLI; these tests hold the classes.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import pytest
import yaml
from lxml import etree

from kvmctl import xmltext
from kvmctl.errors import Location, ManifestError, Problem, RenderError
from kvmctl.manifest import cloudinit, devices, documents, model, validate
from kvmctl.manifest.cloudinit import SeedError, seed_content
from kvmctl.manifest.documents import Document, json_path
from kvmctl.render import definitions as render

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
GOLDEN = REPO / "tests" / "golden" / "render"
MANIFEST_SOURCES = sorted(
    [p / "manifest.yaml" for p in GOLDEN.iterdir() if (p / "manifest.yaml").is_file()]
    + [p for p in (REPO / "examples").iterdir() if p.is_dir()])
LIBVIRT_SCHEMAS = Path("/usr/share/libvirt/schemas")


def problems(text: str) -> list[Problem]:
    """The problems of a manifest text: loading and validating it must raise ManifestError."""
    with pytest.raises(ManifestError) as caught:
        validate.validate(documents.parse_text(text, "m.yaml"))
    return caught.value.problems


def one(found: list[Problem], fragment: str) -> Problem:
    matching = [p for p in found if fragment in p.message]
    assert matching, f"no problem mentions {fragment!r}: {[str(p) for p in found]}"
    return matching[0]


def _documents() -> list[Document]:
    docs: list[Document] = []
    for source in MANIFEST_SOURCES:
        docs.extend(documents.load([str(source)]))
    return docs


def leaves(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...],
                                                                              Any]]:
    """(path, value) of every scalar, and (path + ("<key>",), key) of every mapping key."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path + (key, "<key>"), key
            yield from leaves(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, path + (i,))
    else:
        yield path, value


def with_value(doc: Document, path: tuple[str | int, ...], new: Any) -> Document:
    """`doc` with the value (or, for a path ending in "<key>", the key) at `path` replaced."""
    body = copy.deepcopy(doc.body)
    *parents, last = path
    if last == "<key>":
        *parents, last = parents
        holder = body
        for part in parents:
            holder = holder[part]
        holder[new] = holder.pop(last)
    else:
        holder = body
        for part in parents:
            holder = holder[part]
        holder[last] = new
    return Document(body, doc.source, doc.positions)


def schema_problems(doc: Document) -> list[Problem]:
    return validate.schema_problems(doc)


# ============================================================================ 1. number length


SPOTS = {
    "schema field": "spec:\n  mode: isolated\n  mtu: {n}\n",
    "label value": "spec:\n  mode: isolated\n  labels: {{a: {n}}}\n",
    "list item": "spec:\n  mode: isolated\n  extra: [1, 2, {n}]\n",
    "unknown field": "spec:\n  mode: isolated\n  nested: {{deep: {{deeper: {n}}}}}\n",
}
NET = "apiVersion: kvmctl/v1\nkind: Network\nmetadata: {name: n}\n"


@pytest.mark.parametrize("spot", sorted(SPOTS))
@pytest.mark.parametrize("number", ["9" * 4301, "-" + "1" * 5000, "1_" * 4300 + "1",
                                    "1" * 4301 + ".5", "0." + "5" * 4301])
def test_a_number_longer_than_4300_digits_is_a_located_problem_in_any_field(
        spot: str, number: str) -> None:
    text = NET + SPOTS[spot].format(n=number)
    with pytest.raises(ManifestError) as caught:
        documents.parse_text(text, "m.yaml")
    (problem,) = caught.value.problems
    assert problem.message.startswith("number too long:")
    assert "(at most 4300)" in problem.message
    line = text.splitlines().index(next(x for x in text.splitlines() if number in x)) + 1
    assert problem.location.line == line
    assert problem.location.column == text.splitlines()[line - 1].index(number) + 1


@pytest.mark.parametrize("number", ["9" * 4300, "-" + "9" * 4300, "+1_" + "0" * 4299,
                                    "1." + "5" * 4299])
def test_numbers_of_up_to_4300_digits_still_load(number: str) -> None:
    (doc,) = documents.parse_text(f"{NET}spec: {{x: {number}}}\n", "m.yaml")
    assert isinstance(doc.body["spec"]["x"], (int, float))


def test_a_lower_int_limit_from_the_environment_is_a_problem_not_a_crash() -> None:
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)  # what PYTHONINTMAXSTRDIGITS=640 would do
    try:
        with pytest.raises(ManifestError) as caught:
            documents.parse_text(f"{NET}spec: {{x: {'7' * 1000}}}\n", "m.yaml")
    finally:
        sys.set_int_max_str_digits(old)
    assert "number too long: 1000 digits" in caught.value.problems[0].message


# ============================================================================ 2. patterns


def _schema_patterns() -> Iterator[tuple[str, str, str, list[Any]]]:
    """(file, JSON pointer, pattern, examples of the subschema) of every pattern in schemas/."""
    def walk(node: Any, pointer: str, file: str) -> Iterator[tuple[str, str, str, list[Any]]]:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                yield file, pointer + "/pattern", node["pattern"], list(node.get("examples", []))
            for key in node.get("patternProperties", {}):
                yield file, pointer + "/patternProperties", key, []
            for key, value in node.items():
                yield from walk(value, f"{pointer}/{key}", file)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{pointer}/{i}", file)
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        yield from walk(json.loads(path.read_text(encoding="utf-8")), "", path.name)


PATTERNS = list(_schema_patterns())


def test_the_schemas_have_patterns_and_each_has_examples_to_test_with() -> None:
    assert len(PATTERNS) >= 13
    for file, pointer, _, examples in PATTERNS:
        assert examples, f"{file}#{pointer}: add examples (the trailing-newline test uses them)"


def _validator(schema: dict[str, Any]) -> Any:
    return validate._validator_class()(schema)


@pytest.mark.parametrize(("file", "pointer", "pattern", "examples"), PATTERNS,
                         ids=[f"{f}#{p}" for f, p, _, _ in PATTERNS])
def test_every_schema_pattern_refuses_its_examples_with_a_trailing_newline(
        file: str, pointer: str, pattern: str, examples: list[Any]) -> None:
    checker = _validator({"pattern": pattern})
    for example in examples:
        assert checker.is_valid(example), (example, pattern)
        assert not checker.is_valid(example + "\n"), (example, pattern)
        assert not checker.is_valid(example + "\n\n"), (example, pattern)


def _normalized(parsed: Any, end: int) -> Any:
    """A parsed regular expression as nested tuples, AT_END (`$`) written as `end`."""
    def norm(item: Any) -> Any:
        if isinstance(item, sre_parse.SubPattern):
            return tuple(norm(x) for x in item.data)
        if isinstance(item, (list, tuple)):
            return tuple(norm(x) for x in item)
        if item is sre_parse.AT_END or (end == 0 and item is sre_parse.AT_END_STRING):
            return end
        return item
    return norm(parsed)


@pytest.mark.parametrize("pattern", sorted({p for _, _, p, _ in PATTERNS}))
def test_anchoring_a_schema_pattern_changes_its_end_anchors_and_nothing_else(
        pattern: str) -> None:
    anchored = validate.anchored(pattern).pattern
    assert anchored != pattern
    assert _normalized(sre_parse.parse(pattern), 0) == _normalized(sre_parse.parse(anchored), 0)
    assert _normalized(sre_parse.parse(pattern), 1) != _normalized(sre_parse.parse(anchored), 1)


@pytest.mark.parametrize(("pattern", "expected"), [
    ("^a$", r"^a\Z"), (r"^a\$$", r"^a\$\Z"), ("^[$]$", r"^[$]\Z"), ("^[]$]$", r"^[]$]\Z"),
    ("^[^]$]$", r"^[^]$]\Z"), (r"^[\]$]$", r"^[\]$]\Z"), (r"^\\$", r"^\\\Z"),
    ("^(a$|b$)", r"^(a\Z|b\Z)"), ("a", "a"), (r"^[a-z]{0,3}(?:x|y)$", r"^[a-z]{0,3}(?:x|y)\Z"),
])
def test_anchoring_rewrites_only_dollar_anchors(pattern: str, expected: str) -> None:
    assert validate.anchored(pattern).pattern == expected


def test_pattern_properties_and_the_additional_properties_they_decide_are_anchored() -> None:
    schema = {"type": "object", "patternProperties": {"^[a-z]+$": {"type": "integer"}},
              "additionalProperties": False}
    checker = _validator(schema)
    assert checker.is_valid({"abc": 1})
    assert not checker.is_valid({"abc\n": 1})  # an additional property, not a pattern one
    (error,) = checker.iter_errors({"abc\n": 1})
    assert error.validator == "additionalProperties"
    assert error.message == "'abc\\n' does not match any of the regexes: '^[a-z]+$'"
    schema = {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}
    assert not _validator(schema).is_valid({"abc\n": 1})


def test_pattern_errors_keep_jsonschemas_message_with_the_pattern_as_written() -> None:
    (error,) = _validator({"pattern": "^a$"}).iter_errors("a\n")
    assert error.message == "'a\\n' does not match '^a$'"


def test_no_schema_uses_unevaluated_properties() -> None:
    """jsonschema's unevaluatedProperties reads patternProperties with re.search: anchoring it
    too would be needed before a schema uses the two together."""
    for path in SCHEMAS.glob("*.schema.json"):
        assert "unevaluatedProperties" not in path.read_text(encoding="utf-8"), path.name


# Strings a manifest may end with a newline: free text, not checked by any pattern.
FREE_TEXT = (("boot", "cmdline"), ("cpu", "model"), ("cloudInit", "userData"),
             ("cloudInit", "networkConfig"), ("cloudInit", "sshAuthorizedKeys"),
             ("cloudInit", "instanceId"), ("metadata", "labels"))


def _free_text(path: tuple[str | int, ...]) -> bool:
    names = [p for p in path if isinstance(p, str)]
    if names[-1:] == ["<key>"] and names[:2] == ["metadata", "labels"]:
        return False  # a label key has a pattern
    return any(names[i:i + 2] == list(pair) for pair in FREE_TEXT for i in range(len(names)))


def _string_leaves() -> list[tuple[Document, tuple[str | int, ...], str]]:
    return [(doc, path, value) for doc in _documents() for path, value in leaves(doc.body)
            if isinstance(value, str)]


def test_every_string_field_of_the_golden_manifests_but_free_text_refuses_a_trailing_newline(
        ) -> None:
    """Names, references, MACs, host names, bridges, paths, addresses, cidrs, DHCP bounds,
    sizes, label keys, enums: whatever fields the golden cases and examples use."""
    checked = 0
    for doc, path, value in _string_leaves():
        label_key = path[:2] == ("metadata", "labels") and len(path) == 4
        if path[:1] in (("apiVersion",), ("kind",)) or path[-1] == "<key>" and not label_key:
            continue  # the envelope is checked first; unknown keys are their own problem
        found = schema_problems(with_value(doc, path, value + "\n"))
        if _free_text(path):
            assert not found, (doc.name, path, found)
            continue
        where = json_path(path[:-2] + (value + "\n",)) if label_key else json_path(path)
        assert any(p.path == where for p in found), (doc.name, path, [str(p) for p in found])
        checked += 1
    assert checked >= 100


@pytest.mark.parametrize(("field", "path"), [
    ("cidr", "spec.ipv4.cidr"), ("gateway", "spec.ipv4.gateway"),
    ("start", "spec.ipv4.dhcp.start"), ("end", "spec.ipv4.dhcp.end")])
def test_network_addresses_ending_in_a_newline_are_refused_before_the_model(field: str,
                                                                           path: str) -> None:
    values = {"cidr": "10.213.9.0/24", "gateway": "10.213.9.1", "start": "10.213.9.100",
              "end": "10.213.9.199"}
    values[field] += "\n"
    quoted = {k: json.dumps(v) for k, v in values.items()}
    found = problems(f"{NET}spec:\n  ipv4:\n    cidr: {quoted['cidr']}\n"
                     f"    gateway: {quoted['gateway']}\n"
                     f"    dhcp: {{start: {quoted['start']}, end: {quoted['end']}}}\n")
    assert [p.path for p in found] == [path]
    assert found[0].message == f"{values[field]!r} is not valid here"


@pytest.mark.parametrize("spot", ["pool path", "image path", "kernel", "initrd", "console log"])
@pytest.mark.parametrize("char", ["\r", "\n"])
def test_paths_are_one_line_as_libvirts_schemas_want(spot: str, char: str) -> None:
    """libvirt's RelaxNG path types (`/.*`) refuse a carriage return as well as a newline,
    anywhere in the path (found by test_properties.py)."""
    bad = json.dumps(f"/var/lib/a{char}b")
    values = {"pool path": '"/p"', "image path": '"/i.raw"', "kernel": '"/k"',
              "initrd": '"/i"', "console log": '"/l"'}
    values[spot] = bad
    text = ("apiVersion: kvmctl/v1\nkind: StoragePool\nmetadata: {name: p}\n"
            f"spec: {{path: {values['pool path']}}}\n---\n"
            "apiVersion: kvmctl/v1\nkind: Image\nmetadata: {name: i}\n"
            f"spec: {{pool: p, path: {values['image path']}, format: raw}}\n---\n"
            "apiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec:\n"
            f"  boot: {{kernel: {values['kernel']}, initrd: {values['initrd']}}}\n"
            f"  console: {{log: {values['console log']}}}\n")
    (problem,) = problems(text)
    assert problem.message == f"{json.loads(bad)!r} is not valid here"


# ============================================================================ 3. disks and ports


def _vm_set(disks: list[str], machine: str = "q35", interfaces: int = 0,
            cloud_init: bool = False) -> str:
    text = ("apiVersion: kvmctl/v1\nkind: StoragePool\nmetadata: {name: p}\nspec: {path: /p}\n"
            "---\napiVersion: kvmctl/v1\nkind: Disk\nmetadata: {name: d}\n"
            "spec: {pool: p, size: 1GiB, format: raw, shareable: true}\n---\n"
            "apiVersion: kvmctl/v1\nkind: Network\nmetadata: {name: n}\nspec: {mode: isolated}\n"
            f"---\napiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata: {{name: v}}\nspec:\n"
            f"  machine: {machine}\n")
    if cloud_init:
        text += "  cloudInit: {hostname: v}\n"
    if disks:
        text += "  disks:\n" + "".join(f"    - {{disk: d, bus: {bus}}}\n" for bus in disks)
    if interfaces:
        text += "  interfaces:\n" + "".join("    - {network: n}\n" for _ in range(interfaces))
    return text


def _line_of_item(text: str, key: str, index: int) -> int:
    lines = text.splitlines()
    start = lines.index(f"  {key}:")
    return start + 2 + index


def test_the_limits_follow_from_the_template_layout() -> None:
    assert devices.TARGET_NAMES == len(list(devices.target_names("vd"))) == 702
    assert devices.Q35_ROOT_PORTS == 232 and devices.Q35_DEVICES == 222
    assert devices.pcie_root_ports(devices.Q35_DEVICES, 0) == devices.Q35_ROOT_PORTS


@pytest.mark.parametrize(("disks", "interfaces", "key", "index"), [
    (223, 0, "disks", 222), (200, 23, "interfaces", 22), (0, 223, "interfaces", 222),
    (300, 5, "disks", 222)])
def test_q35_refuses_more_disks_and_interfaces_than_root_ports_at_the_first_one_too_many(
        disks: int, interfaces: int, key: str, index: int) -> None:
    text = _vm_set(["virtio"] * disks, interfaces=interfaces)
    problem = one(problems(text), "too many disks and interfaces for machine q35")
    assert f"{disks + interfaces} (at most 222)" in problem.message
    assert problem.path == f"spec.{key}[{index}]"
    assert problem.location.line == _line_of_item(text, key, index)


def test_sata_and_scsi_disks_count_for_q35_root_ports_too() -> None:
    one(problems(_vm_set(["sata", "scsi"] * 111 + ["virtio"])), "machine q35: 223")


def test_virtio_disks_stop_at_vdzz() -> None:
    text = _vm_set(["virtio"] * 703, machine="pc")
    problem = one(problems(text), "too many virtio disks: 703 (at most 702")
    assert problem.path == "spec.disks[702]"
    assert problem.location.line == _line_of_item(text, "disks", 702)


@pytest.mark.parametrize(("buses", "cloud_init", "index"), [
    (["sata"] * 703, False, 702), (["scsi"] * 703, False, 702),
    (["sata", "scsi"] * 352, False, 702),
    (["sata"] * 702, True, 701), (["virtio"] * 5 + ["scsi"] * 702, True, 706)])
def test_sata_scsi_and_the_seed_share_the_sd_names(buses: list[str], cloud_init: bool,
                                                   index: int) -> None:
    text = _vm_set(buses, machine="pc", cloud_init=cloud_init)
    problem = one(problems(text), "too many sata and scsi disks")
    assert problem.path == f"spec.disks[{index}]"


def _relaxng() -> Any:
    return etree.RelaxNG(etree.parse(str(LIBVIRT_SCHEMAS / "domain.rng")))


@pytest.mark.parametrize(("buses", "machine", "interfaces", "cloud_init"), [
    (["virtio"] * 222, "q35", 0, True), (["virtio"] * 111, "q35", 111, False),
    (["virtio"] * 702, "pc", 3, False), (["sata"] * 350 + ["scsi"] * 351, "pc", 0, True)])
def test_a_vm_at_the_limits_validates_and_renders_to_valid_xml(
        buses: list[str], machine: str, interfaces: int, cloud_init: bool) -> None:
    manifest = validate.validate(documents.parse_text(
        _vm_set(buses, machine, interfaces, cloud_init), "m.yaml"))
    xml = etree.fromstring(render.domain_xml(manifest.vms[0], manifest, "p", "kvm").encode())
    assert _relaxng().validate(xml), _relaxng().error_log
    ports = xml.findall("devices/controller[@model='pcie-root-port']")
    assert len(ports) <= devices.Q35_ROOT_PORTS
    targets = [t.get("dev") for t in xml.iterfind("devices/disk/target")]
    assert len(targets) == len(set(targets)) == len(buses) + cloud_init


def test_render_of_an_unchecked_model_past_the_names_is_a_render_error_not_a_crash() -> None:
    docs = documents.parse_text(_vm_set(["virtio"] * 703, machine="pc"), "m.yaml")
    manifest = model.build(docs)
    with pytest.raises(RenderError, match="more disks than target names"):
        render.domain_xml(manifest.vms[0], manifest, "p", "kvm")


# ============================================================================ 4. cloud-init


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample me@laptop"


def _seed(user_data: Any, keys: tuple[str, ...] = (KEY,), hostname: str | None = "vm"
          ) -> cloudinit.SeedContent:
    return seed_content("vm", hostname, user_data, None, list(keys))


@pytest.mark.parametrize("levels", [101, 500, 2000, 10000])
@pytest.mark.parametrize("brackets", ["[]", "{}"])
def test_deeply_nested_cloud_config_strings_are_a_seed_error(levels: int, brackets: str
                                                             ) -> None:
    inner = "a: " if brackets == "{}" else ""
    text = "#cloud-config\nx: " + (brackets[0] + inner) * levels + "1" + brackets[1] * levels
    with pytest.raises(SeedError) as caught:
        _seed(text)
    assert caught.value.field == "userData"
    assert "nested more than 100 levels deep" in str(caught.value)


def test_a_cloud_config_string_of_100_levels_is_still_merged() -> None:
    text = "#cloud-config\nx: " + "[" * 99 + "1" + "]" * 99 + "\n"
    assert KEY in yaml.safe_load(_seed(text).user_data)["ssh_authorized_keys"]


SHAPES = {
    "a list of lists": "ssh_authorized_keys: [[a, b]]",
    "a list of maps": "ssh_authorized_keys: [{key: a}]",
    "a map": "ssh_authorized_keys: {key: a}",
    "a number": "ssh_authorized_keys: 12",
    "a boolean": "ssh_authorized_keys: true",
    "numbers in the list": "ssh_authorized_keys: [1, 2]",
    "a null in the list": "ssh_authorized_keys: [~]",
    "a date in the list": "ssh_authorized_keys: [2024-01-02]",
}


@pytest.mark.parametrize("form", ["string", "mapping"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ssh_authorized_keys_of_any_other_shape_in_user_data_is_a_seed_error(
        shape: str, form: str) -> None:
    line = SHAPES[shape]
    user_data: Any = f"#cloud-config\n{line}\n"
    if form == "mapping":
        user_data = yaml.safe_load(line)
    with pytest.raises(SeedError, match="ssh_authorized_keys in user data must be a list of "
                                        "strings") as caught:
        _seed(user_data)
    assert caught.value.field == "userData"


@pytest.mark.parametrize(("line", "keys"), [
    ("ssh_authorized_keys: ssh-rsa AAAA x", ["ssh-rsa AAAA x", KEY]),
    ("ssh_authorized_keys: [ssh-rsa AAAA x]", ["ssh-rsa AAAA x", KEY]),
    ("ssh_authorized_keys:", [KEY]), ("ssh_authorized_keys: []", [KEY]),
    (f"ssh_authorized_keys: ['{KEY}']", [KEY])])
def test_ssh_authorized_keys_as_a_string_or_list_of_strings_still_merge(line: str,
                                                                       keys: list[str]) -> None:
    merged = yaml.safe_load(_seed(f"#cloud-config\n{line}\n").user_data)
    assert merged["ssh_authorized_keys"] == keys


@pytest.mark.parametrize(("text", "fragment"), [
    ("expires: 2024-13-45", "month must be in 1..12"),
    ("n: " + "9" * 5000, "not valid #cloud-config YAML"),
    ("a: &a [*a]", "user data is too large"),  # a cycle: nested without end
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e]", "too many aliases"),
    ("a: &s " + "x" * 100_000 + "\n" + "".join(f"b{i}: *s\n" for i in range(12)), "MiB of text"),
    ("!!python/object:os.system x", "not valid #cloud-config YAML"),
    ("a: !!binary 'a'", "not valid #cloud-config YAML"),
    ("- a\n- b", "must be a YAML mapping"),
    ("a: b\n---\nc: d", "not valid #cloud-config YAML"),
    ("? [a]\n: b", "not valid #cloud-config YAML"),
])
def test_cloud_config_strings_of_every_shape_are_a_seed_error_or_merge(text: str,
                                                                      fragment: str) -> None:
    with pytest.raises(SeedError, match=re.escape(fragment)):
        _seed("#cloud-config\n" + text + "\n")


@pytest.mark.parametrize("text", ["#!/bin/sh\n" + "[" * 5000, "#cloud-config\n" + "[" * 5000,
                                  "#cloud-config\nssh_authorized_keys: [[a]]\n"])
def test_a_user_data_string_without_a_merge_passes_through_untouched(text: str) -> None:
    assert _seed(text, keys=(), hostname=None).user_data == text


def test_seed_errors_are_located_at_user_data() -> None:
    text = ("apiVersion: kvmctl/v1\nkind: StoragePool\nmetadata: {name: p}\nspec: {path: /p}\n"
            "---\napiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec:\n"
            "  cloudInit:\n    sshAuthorizedKeys: [ssh-rsa AAAA me]\n    userData: |\n"
            "      #cloud-config\n      ssh_authorized_keys: {a: b}\n")
    problem = one(problems(text), "ssh_authorized_keys in user data")
    assert problem.path == "spec.cloudInit.userData"
    assert (problem.location.line, problem.location.column) == (12, 15)


def test_odd_ssh_authorized_keys_with_nothing_to_merge_into_them_pass_through() -> None:
    merged = yaml.safe_load(_seed("#cloud-config\nssh_authorized_keys: {a: b}\n", keys=(),
                                  hostname="vm").user_data)
    assert merged == {"ssh_authorized_keys": {"a": "b"}, "hostname": "vm"}


# ============================================================================ 5. XML characters


NOT_XML = ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f", "\ud800", "\udfff", "\ufffe",
           "\uffff"]


@pytest.mark.parametrize("char", NOT_XML, ids=[f"U+{ord(c):04X}" for c in NOT_XML])
def test_every_string_and_key_of_every_document_refuses_characters_xml_cannot_carry(
        char: str) -> None:
    checked = 0
    for doc in _documents():
        for path, value in leaves(doc.body):
            if not isinstance(value, str) or path[:1] in (("apiVersion",), ("kind",)):
                continue
            mutated = value[:1] + char + value[1:]
            found = schema_problems(with_value(doc, path, mutated))
            where = (json_path(path[:-2] + (mutated,)) if path[-1] == "<key>"
                     else json_path(path))
            expected = [p for p in found if p.path == where and "which XML cannot carry" in
                        p.message]
            assert len(expected) == 1, (doc.name, path, [str(p) for p in found])
            assert f"U+{ord(char):04X} at character {min(2, len(mutated))}" in \
                expected[0].message
            assert [p for p in found if p.path == where] == expected  # no second, pattern one
            checked += 1
    assert checked >= 200


@pytest.mark.parametrize("text", ["tab\there", "new\nline", "cr\rhere", "ü€😀", "\u2028",
                                  "\x7f\x85\xa0", "\ufffd", "\U0010ffff"])
def test_characters_xml_can_carry_are_accepted_in_free_text(text: str) -> None:
    manifest = validate.validate(documents.parse_text(
        "apiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata:\n  name: v\n  labels:\n"
        f"    note: {_quoted(text)}\nspec:\n  boot:\n    kernel: /k\n"
        f"    cmdline: {_quoted(text)}\n", "m.yaml"))
    xml = render.domain_xml(manifest.vms[0], manifest, "p", "kvm")
    assert etree.fromstring(xml.encode()).findtext("os/cmdline") is not None


def _quoted(text: str) -> str:
    """`text` as a YAML double-quoted scalar: escapes for what YAML cannot hold raw."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or 0x7f <= ord(char) <= 0x9f:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def test_a_character_problem_is_located_at_the_value_or_the_key() -> None:
    text = ('apiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata:\n  name: v\n'
            'spec:\n  cloudInit:\n    userData:\n      "k\\x01": 1\n      ok: "\\0"\n')
    found = problems(text)
    key = one(found, "key holds U+0001")
    value = one(found, "text holds U+0000")
    assert (key.location.line, key.location.column) == (8, 7)
    assert (value.location.line, value.location.column) == (9, 11)
    assert value.path == "spec.cloudInit.userData.ok"
    assert key.path == 'spec.cloudInit.userData["k\\u0001"]'


@pytest.mark.parametrize("command", [["render", "-f", "examples/quickstart"],
                                     ["plan", "-f", "examples/quickstart"],
                                     ["apply", "-f", "examples/quickstart"],
                                     ["get", "vms"], ["destroy", "-f", "examples/quickstart"]])
@pytest.mark.parametrize("project", ["a\x00b", "x\x1b[31m", "\ufffe", "\ud800"])
def test_a_project_name_xml_cannot_carry_is_a_usage_error(
        command: list[str], project: str, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli([*command, "--project", project])
    err = capsys.readouterr().err  # argparse writes its usage errors to sys.stderr
    assert result.code == 2, result.output
    assert "argument --project:" in err and "which XML cannot carry" in err
    at = xmltext.first_non_xml_char(project)
    assert f"{xmltext.describe_char(project[at])} at character {at + 1}" in err
    assert "Traceback" not in err + result.output


def test_a_project_name_from_the_environment_is_checked_too(
        cli: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVMCTL_PROJECT", "bad\x07")
    result = cli(["render", "-f", str(REPO / "examples" / "quickstart")])
    assert result.code == 2 and "$KVMCTL_PROJECT" in capsys.readouterr().err


@pytest.mark.parametrize("project", ["two\nlines", "cr\r"])
def test_a_project_name_of_more_than_one_line_is_a_usage_error(
        project: str, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """It is part of each VM's <title>, which libvirt keeps to one line (found by
    test_properties.py)."""
    result = cli(["render", "-f", str(REPO / "examples" / "quickstart"), "--project", project])
    assert result.code == 2 and "more than one line" in capsys.readouterr().err


def test_diff_reports_a_bad_project_name_with_exit_status_1(cli: Any) -> None:
    result = cli(["diff", "-f", "examples/quickstart", "--project", "a\x00"])
    assert result.code == 1


@pytest.mark.parametrize("project", ["team-a", "équipe ü", "a<b>&'\"", "tab\tproject"])
def test_project_names_xml_can_carry_render(project: str, cli: Any) -> None:
    result = cli(["render", "-f", str(REPO / "examples" / "quickstart"), "--project", project])
    assert result.code == 0, result.output


# ============================================================================ 6. expanded size


def _alias_bomb(size: int, copies: int) -> str:
    return ("apiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec:\n"
            "  cloudInit:\n    userData:\n"
            f"      a: &s \"{'x' * size}\"\n"
            + "".join(f"      b{i}: *s\n" for i in range(copies)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("size", "copies"), [(1 << 20, 40), (100_000, 200), (30_000, 5000)])
def test_a_string_alias_bomb_is_refused_quickly_at_the_alias_that_crosses_the_limit(
        size: int, copies: int) -> None:
    text = _alias_bomb(size, copies)
    # (it took minutes before: the timeout marker above catches a return to that, no clock here)
    with pytest.raises(ManifestError) as caught:
        documents.parse_text(text, "m.yaml")
    (problem,) = caught.value.problems
    assert problem.message.startswith("document too large: more than 1 MiB of text")
    # An alias is its anchor's node: the location is the aliased string, the path its use.
    assert (problem.location.line, problem.location.column) == (7, 10)
    fitting = documents.MAX_DOCUMENT_BYTES // size  # uses that fit: `a` and fitting - 1 aliases
    assert problem.path == ("spec.cloudInit.userData." +
                            ("a" if fitting == 1 else f"b{fitting - 1}"))


def test_a_document_just_under_the_size_limit_loads() -> None:
    text = _alias_bomb(100_000, 9)  # 1,000,000 bytes of strings, and a few keys
    (doc,) = documents.parse_text(text, "m.yaml")
    assert len(doc.body["spec"]["cloudInit"]["userData"]) == 10


def test_the_size_limit_counts_utf8_bytes_and_keys() -> None:
    text = ("apiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec:\n"
            f"  note: \"{'é' * 600_000}\"\n")  # 600,000 characters, 1,200,000 bytes
    with pytest.raises(ManifestError, match="document too large"):
        documents.parse_text(text, "m.yaml")
    keys = "".join(f"  {'k' * 1000}{i}: 1\n" for i in range(1100))
    with pytest.raises(ManifestError, match="document too large"):
        documents.parse_text("apiVersion: kvmctl/v1\nkind: Network\nspec:\n" + keys, "m.yaml")


def test_the_limit_is_per_document() -> None:
    one_doc = _alias_bomb(100_000, 8)
    docs = documents.parse_text("\n---\n".join([one_doc] * 3), "m.yaml")
    assert len(docs) == 3


# ============================================================================ 7. integers


def _integer_fields() -> Iterator[tuple[str, tuple[str, ...]]]:
    """(kind file, document path) of every property whose type includes integer."""
    def walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if not isinstance(node, dict):
            return
        types = node.get("type")
        if "integer" in (types if isinstance(types, list) else [types]):
            yield path
        for key, sub in node.get("properties", {}).items():
            yield from walk(sub, path + (key,))
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        for found in walk(schema, ()):
            yield path.name, found


INTEGER_FIELDS = list(_integer_fields())
MINIMAL = {"network.schema.json": {"apiVersion": "kvmctl/v1", "kind": "Network",
                                   "metadata": {"name": "n"}, "spec": {"mode": "isolated"}},
           "virtualmachine.schema.json": {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
                                          "metadata": {"name": "v"}, "spec": {}}}


def test_the_integer_fields_are_found() -> None:
    assert {p[-1] for _, p in INTEGER_FIELDS} >= {"mtu", "cpus", "count", "max",
                                                   "shutdownTimeout"}


@pytest.mark.parametrize(("file", "path"), INTEGER_FIELDS,
                         ids=[f"{f}:{'.'.join(p)}" for f, p in INTEGER_FIELDS])
@pytest.mark.parametrize("number", [100.0, 1500.0, 1e3, float("inf"), -0.0, 2.5])
def test_an_integral_float_in_an_integer_field_is_refused_where_it_is(
        file: str, path: tuple[str, ...], number: float) -> None:
    body = copy.deepcopy(MINIMAL[file])
    holder = body
    for part in path[:-1]:
        holder = holder.setdefault(part, {})
    holder[path[-1]] = number
    if path[-1] == "max":
        holder["count"] = 1
    good = copy.deepcopy(body)
    _set(good, path, 100)
    doc = Document(body, Location("m.yaml"), {})
    found = schema_problems(doc)
    assert any(p.path == ".".join(path) and "is not of type" in p.message and "'integer'" in
               p.message for p in found), [str(p) for p in found]
    assert not schema_problems(Document(good, Location("m.yaml"), {}))


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    holder = body
    for part in path[:-1]:
        holder = holder[part]
    holder[path[-1]] = value


def test_booleans_are_still_not_integers() -> None:
    doc = Document({**MINIMAL["network.schema.json"], "spec": {"mode": "isolated", "mtu": True}},
                   Location("m.yaml"), {})
    assert schema_problems(doc)


# ============================================================================ the memo


def test_the_memo_fingerprint_covers_every_module_of_every_stage(tmp_path: Path) -> None:
    """A verdict remembered by older code must not skip newer checks: a change in
    manifest/validate.py (not only in kvmctl/*.py) starts a new memo."""
    import importlib.util
    package = tmp_path / "kvmctl"
    (package / "manifest").mkdir(parents=True)
    shutil.copy(REPO / "kvmctl" / "memo.py", package / "memo.py")
    (package / "manifest" / "validate.py").write_text("A = 1\n")

    def fingerprint() -> str:
        spec = importlib.util.spec_from_file_location("memo_copy", package / "memo.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return str(module.code_fingerprint())

    before = fingerprint()
    (package / "manifest" / "validate.py").write_text("A = 2\n")
    assert fingerprint() != before



@pytest.mark.parametrize("value", ["!!bool maybe", "!!timestamp foo", "!!int ''", "!!float x",
                                   "!!int 0x", "!!timestamp 2024-13-45"])
def test_user_data_with_a_tag_its_value_does_not_fit_is_a_located_error(value: str) -> None:
    from kvmctl.manifest.cloudinit import SeedError, seed_content
    with pytest.raises(SeedError, match="not valid #cloud-config YAML"):
        seed_content("vm", None, f"#cloud-config\na: {value}\n", None, ["ssh-ed25519 AAAA k"])
