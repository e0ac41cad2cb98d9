"""`kvmctl validate`: the corpus of broken manifests, positive controls, output formats, inputs.

Every file in tests/fixtures/invalid/ is one broken manifest. It starts with comment lines:

    # expect: <substring of the output>      (one or more; all must appear)
    # expect-at: <line>:<col>                (optional; where the first expected problem is)

The loader runs the real CLI on each file and checks exit status 1, the expected text, the
location of the problem matching the first `expect`, and that no traceback is ever printed.
"""

from __future__ import annotations

import copy
import json
import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from kvmctl.errors import Location, ManifestError
from kvmctl.manifest import documents, validate
from kvmctl.manifest.documents import Document

REPO = Path(__file__).resolve().parents[2]
INVALID = REPO / "tests" / "fixtures" / "invalid"
EXAMPLES = REPO / "examples"
CASES = sorted(INVALID.glob("*.yaml"))
HEADER = re.compile(rb"^# (expect|expect-at): ?(.*)$")


def _header(path: Path) -> tuple[list[str], tuple[int, int] | None]:
    expects: list[str] = []
    at = None
    for raw in path.read_bytes().split(b"\n"):
        match = HEADER.match(raw)
        if not match:
            break
        key, value = match.group(1).decode(), match.group(2).decode("utf-8").rstrip("\r")
        if key == "expect":
            expects.append(value)
        else:
            line, _, col = value.partition(":")
            at = (int(line), int(col))
    return expects, at


def _no_crash(text: str) -> None:
    assert "Traceback" not in text
    assert "internal error" not in text
    assert "RecursionError" not in text


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    for path in CASES:
        expects, _ = _header(path)
        assert expects, f"{path.name} has no '# expect:' line"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_invalid_manifest(path: Path, cli: Any) -> None:
    expects, at = _header(path)

    text = cli(["validate", "-f", path])
    _no_crash(text.output)
    assert text.code == 1, text.output
    for expected in expects:
        assert expected in text.stdout, f"{expected!r} not in:\n{text.stdout}"
    assert re.search(r"^\d+ problems? found$", text.stdout, re.M)

    as_json = cli(["validate", "-f", path, "-o", "json"])
    _no_crash(as_json.output)
    assert as_json.code == 1
    problems = as_json.json()
    assert problems and all(p["file"].endswith(path.name) for p in problems)
    matching = [p for p in problems if expects[0] in _as_text(p)]
    assert matching, f"no problem matches {expects[0]!r}: {problems}"
    if at is not None:
        assert (matching[0]["line"], matching[0]["column"]) == at, matching[0]


def _as_text(problem: dict[str, Any]) -> str:
    """A JSON problem as the text format shows it, without the location."""
    text = problem["message"] + (f" ({problem['path']})" if problem["path"] else "")
    return text + (f"\n  hint: {problem['hint']}" if problem["hint"] else "")


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.timeout(120)
def test_alias_bomb_neither_hangs_nor_exhausts_memory() -> None:
    """The billion-laughs file, in a child limited to 1 GiB of address space."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run(
        [sys.executable, "-m", "kvmctl", "validate", "-f", str(INVALID / "billion-laughs.yaml")],
        capture_output=True, text=True, timeout=60, preexec_fn=limit, cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert "document too large" in done.stdout
    _no_crash(done.stdout + done.stderr)


def test_legitimate_aliases_still_work(write: Any, cli: Any) -> None:
    path = write("aliases.yaml", textwrap.dedent("""\
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm1
          labels: &labels
            env: test
        spec:
          cloudInit:
            userData:
              write_files: &files
                - path: /etc/a
                  content: a
              bootcmd: *files
        ---
        apiVersion: kvmctl/v1
        kind: StoragePool
        metadata: {name: seeds}
        spec: {path: /var/lib/kvmctl/seeds}
        """))
    assert cli(["validate", "-f", path]).code == 0
    docs = documents.load([str(path)])
    user_data = docs[0].body["spec"]["cloudInit"]["userData"]
    assert user_data["bootcmd"] == user_data["write_files"]


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system",
    "!!python/object/new:os.system",
    "!!python/name:os.system",
])
def test_python_tags_are_refused_never_run(tag: str, tmp_path: Path, write: Any,
                                           cli: Any) -> None:
    marker = tmp_path / "pwned"
    path = write("tag.yaml", textwrap.dedent(f"""\
        apiVersion: kvmctl/v1
        kind: Network
        metadata:
          name: {tag} ["touch {marker}"]
        spec:
          mode: isolated
        """))
    for argv in (["validate", "-f", path], ["render", "-f", path]):
        result = cli(argv)
        _no_crash(result.output)
        assert result.code == 1
        assert "unsupported YAML tag" in result.output
    assert not marker.exists()


def test_empty_file(write: Any, cli: Any) -> None:
    result = cli(["validate", "-f", write("empty.yaml", "")])
    assert result.code == 1
    assert "no manifest documents in this file" in result.stdout


def test_deep_nesting_in_a_string_is_fine(write: Any, cli: Any) -> None:
    """Brackets inside a string are text, not nesting."""
    path = write("brackets.yaml", textwrap.dedent("""\
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm1
        spec:
          boot:
            kernel: /boot/vmlinuz
            cmdline: "%s"
        """) % ("[" * 5000))
    assert cli(["validate", "-f", path]).code == 0


# ----------------------------------------------------------------------------- positive controls

VALID_BASE = """\
apiVersion: kvmctl/v1
kind: StoragePool
metadata:
  name: pool1
spec:
  path: /var/lib/kvmctl/pools/p1
---
apiVersion: kvmctl/v1
kind: Network
metadata:
  name: net1
spec:
  ipv4:
    cidr: 10.0.0.0/24
    dhcp:
      start: 10.0.0.100
      end: 10.0.0.199
"""


def test_readonly_disk_shared_by_two_vms_is_valid(write: Any, cli: Any) -> None:
    path = write("shared.yaml", VALID_BASE + textwrap.dedent("""\
        ---
        apiVersion: kvmctl/v1
        kind: Disk
        metadata:
          name: data
        spec:
          pool: pool1
          size: 1GiB
        ---
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm1
        spec:
          disks:
            - disk: data
              readonly: true
        ---
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm2
        spec:
          disks:
            - disk: data
              readonly: true
        """))
    result = cli(["validate", "-f", path])
    assert result.code == 0, result.output
    assert result.stdout == "5 documents valid\n"


def test_shareable_raw_disk_on_two_vms_is_valid(write: Any, cli: Any) -> None:
    path = write("shareable.yaml", VALID_BASE + textwrap.dedent("""\
        ---
        apiVersion: kvmctl/v1
        kind: Disk
        metadata:
          name: data
        spec:
          pool: pool1
          size: 1GiB
          format: raw
          shareable: true
        ---
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm1
        spec:
          disks: [{disk: data}]
        ---
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm2
        spec:
          disks: [{disk: data}]
        """))
    result = cli(["validate", "-f", path])
    assert result.code == 0, result.output


@pytest.mark.parametrize("size", ["512MB", "512MiB", "1.5GiB", "1GB", "4096B", "512 MiB"])
def test_sizes_that_are_fine(size: str, write: Any, cli: Any) -> None:
    path = write("disk.yaml", VALID_BASE + textwrap.dedent(f"""\
        ---
        apiVersion: kvmctl/v1
        kind: Disk
        metadata:
          name: data
        spec:
          pool: pool1
          size: {size}
        """))
    result = cli(["validate", "-f", path])
    assert result.code == 0, result.output


def test_ip_reservation_inside_the_cidr_is_valid(write: Any, cli: Any) -> None:
    path = write("vm.yaml", VALID_BASE + textwrap.dedent("""\
        ---
        apiVersion: kvmctl/v1
        kind: VirtualMachine
        metadata:
          name: vm1
        spec:
          interfaces:
            - network: net1
              ip: 10.0.0.10
        """))
    assert cli(["validate", "-f", path]).code == 0


@pytest.mark.parametrize("folder", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_examples_are_valid(folder: str, cli: Any) -> None:
    result = cli(["validate", "-f", EXAMPLES / folder])
    assert result.code == 0, result.output


def test_crlf_and_bom_are_accepted(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "dos.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + VALID_BASE.replace("\n", "\r\n").encode())
    result = cli(["validate", "-f", path])
    assert result.code == 0, result.output


# ----------------------------------------------------------------------------- output formats

MULTI = INVALID / "multiple-problems.yaml"


def test_multiple_problems_are_reported_at_once(cli: Any) -> None:
    result = cli(["validate", "-f", MULTI])
    assert result.code == 1
    lines = [line for line in result.stdout.splitlines() if ": error: " in line]
    assert len(lines) == 3, result.stdout
    assert result.stdout.endswith("3 problems found\n")
    assert len({line.split(": error: ")[0] for line in lines}) == 3  # three places


def test_json_output(cli: Any) -> None:
    result = cli(["validate", "-f", MULTI, "-o", "json"])
    assert result.code == 1
    problems = result.json()
    assert isinstance(problems, list) and len(problems) == 3
    for p in problems:
        assert {"file", "line", "column", "message", "path"} <= set(p)
        assert p["file"].endswith("multiple-problems.yaml")
        assert isinstance(p["line"], int) and p["line"] > 0
        assert isinstance(p["column"], int) and p["column"] > 0
    by_message = {p["message"]: p for p in problems}
    unknown = by_message["unknown field 'cpu_count'"]
    assert (unknown["line"], unknown["column"], unknown["path"]) == (11, 3, "spec.cpu_count")
    assert by_message["unsupported apiVersion 'v1'"]["path"] == "apiVersion"


def test_json_output_when_valid(cli: Any) -> None:
    result = cli(["validate", "-f", EXAMPLES / "quickstart", "-o", "json"])
    assert result.code == 0
    assert result.json() == []


def test_github_output(cli: Any) -> None:
    result = cli(["validate", "-f", MULTI, "-o", "github"])
    assert result.code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    pattern = re.compile(r"^::error file=(?P<file>[^,]+),line=(?P<line>\d+),col=(?P<col>\d+)::"
                         r"(?P<message>.+)$")
    for line in lines:
        match = pattern.match(line)
        assert match, line
        assert match["file"].endswith("multiple-problems.yaml")
    assert "::error file=" in lines[0] and ",line=11,col=3::unknown field 'cpu_count'" in lines[0]


def test_github_output_escapes_newlines(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: kvmctl/v1\nkind: Network\nmetadata: {name: x\n")
    result = cli(["validate", "-f", path, "-o", "github"])
    assert result.code == 1
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("::error file=")


def test_github_output_of_a_whole_file_problem(cli: Any) -> None:
    result = cli(["validate", "-f", INVALID / "only-comments.yaml", "-o", "github"])
    (line,) = result.stdout.splitlines()
    assert line.startswith("::error file=")
    assert ",line=" not in line
    assert line.endswith("::no manifest documents in this file "
                         "hint: the file is empty or holds only comments")


def test_github_output_escapes_file_names(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "a,b:c.yaml"
    path.write_text((INVALID / "cpus-zero.yaml").read_text())
    result = cli(["validate", "-f", path, "-o", "github"])
    (line,) = result.stdout.splitlines()
    assert "a%2Cb%3Ac.yaml,line=8,col=9::0 is less than the minimum of 1" in line


# ----------------------------------------------------------------------------- inputs

VM_ON_NET1 = """\
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata:
  name: vm1
spec:
  interfaces:
    - network: net1
      ip: 10.0.0.10
"""


def test_several_files_are_one_manifest_set(write: Any, cli: Any) -> None:
    base, vm = write("base.yaml", VALID_BASE), write("vm.yaml", VM_ON_NET1)
    assert cli(["validate", "-f", vm]).code == 1  # alone, net1 is unknown
    result = cli(["validate", "-f", base, "-f", vm])
    assert result.code == 0, result.output
    assert result.stdout == "3 documents valid\n"


def test_several_bad_files_report_every_problem(cli: Any) -> None:
    first, second = INVALID / "cpus-zero.yaml", INVALID / "graphics-bad-type.yaml"
    result = cli(["validate", "-f", first, "-f", second, "-o", "json"])
    assert result.code == 1
    files = sorted(Path(p["file"]).name for p in result.json())
    assert files == ["cpus-zero.yaml", "graphics-bad-type.yaml"]


def test_syntax_errors_in_one_file_do_not_hide_another_files_problems(cli: Any) -> None:
    result = cli(["validate", "-f", INVALID / "yaml-syntax-error.yaml",
                  "-f", INVALID / "binary-garbage.yaml", "-o", "json"])
    assert result.code == 1
    assert len(result.json()) == 2


def test_directory_and_recursive(tmp_path: Path, write: Any, cli: Any) -> None:
    write("top/base.yaml", VALID_BASE)
    write("top/nested/deeper/vm.yml", VM_ON_NET1)
    write("top/notes.txt", "not a manifest")
    flat = cli(["validate", "-f", tmp_path / "top"])
    assert flat.code == 0 and flat.stdout == "2 documents valid\n"
    deep = cli(["validate", "-R", "-f", tmp_path / "top"])
    assert deep.code == 0 and deep.stdout == "3 documents valid\n"


def test_directory_without_manifests(tmp_path: Path, cli: Any) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text(VALID_BASE)
    result = cli(["validate", "-f", tmp_path])
    assert result.code == 1
    assert "no .yaml or .yml files in this directory" in result.stdout
    assert "use -R" in result.stdout


def test_recursive_directory_reports_nested_problems(tmp_path: Path, write: Any,
                                                      cli: Any) -> None:
    write("d/ok.yaml", VALID_BASE)
    bad = write("d/sub/bad.yaml", (INVALID / "unknown-field.yaml").read_text())
    result = cli(["validate", "-R", "-f", tmp_path / "d", "-o", "json"])
    assert result.code == 1
    (problem,) = result.json()
    assert problem["file"].endswith(str(Path("sub") / bad.name))
    assert (problem["line"], problem["column"]) == (10, 3)


def test_stdin(cli: Any) -> None:
    result = cli(["validate", "-f", "-"], stdin=VALID_BASE)
    assert result.code == 0 and result.stdout == "2 documents valid\n"


def test_stdin_problems_are_located(cli: Any) -> None:
    result = cli(["validate", "-f", "-"], stdin=(INVALID / "cpus-zero.yaml").read_text())
    assert result.code == 1
    assert result.stdout.startswith("<stdin>:8:9: error: 0 is less than the minimum of 1")


def test_stdin_combined_with_files(write: Any, cli: Any) -> None:
    result = cli(["validate", "-f", write("base.yaml", VALID_BASE), "-f", "-"], stdin=VM_ON_NET1)
    assert result.code == 0, result.output


def test_stdin_bytes_that_are_not_utf8() -> None:
    class Raw:
        def __init__(self, data: bytes) -> None:
            import io
            self.buffer = io.BytesIO(data)

    with pytest.raises(ManifestError) as caught:
        documents.load(["-"], stdin=Raw(b"apiVersion: kvmctl/v1\nkind: \xff\n"))
    (problem,) = caught.value.problems
    assert "not UTF-8" in problem.message
    assert (problem.location.file, problem.location.line, problem.location.column) == \
        ("<stdin>", 2, 7)


def test_missing_file(tmp_path: Path, cli: Any) -> None:
    result = cli(["validate", "-f", tmp_path / "nope.yaml"])
    assert result.code == 1
    assert "no such file or directory" in result.stdout


def test_no_manifests_given_is_a_usage_error(cli: Any) -> None:
    result = cli(["validate"])
    assert result.code == 2
    assert "no manifests given" in result.stderr


# ----------------------------------------------------------------------------- the validator


def _raw_validators() -> dict[str, Draft202012Validator]:
    """Validators on the schemas as written, $refs resolved through the registry."""
    compiled = validate.validators()
    return {kind: Draft202012Validator(validate.schema_for(kind), registry=v._registry,
                                       format_checker=Draft202012Validator.FORMAT_CHECKER)
            for kind, v in compiled.items()}


def test_inlined_schemas_have_no_refs_left() -> None:
    for kind, validator in validate.validators().items():
        assert '"$ref"' not in json.dumps(validator.schema), kind
    assert '"$ref"' in json.dumps(validate.schema_for("VirtualMachine"))  # as written


def test_inlining_keeps_recursive_and_local_refs_working() -> None:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schema = {
        "$id": "https://example.test/tree.json",
        "$defs": {"node": {"type": "object", "additionalProperties": False,
                           "properties": {"name": {"$ref": "#/$defs/name"},
                                          "children": {"type": "array",
                                                       "items": {"$ref": "#/$defs/node"}}}},
                  "name": {"type": "string", "pattern": "^[a-z]+$"}},
        "$ref": "#/$defs/node",
    }
    registry = Registry().with_resource(schema["$id"], Resource.from_contents(
        schema, default_specification=DRAFT202012))
    inlined = validate._inline_refs(schema, registry.resolver(base_uri=schema["$id"]),
                                    schema["$id"], ())
    checker = Draft202012Validator(inlined, registry=registry)
    assert checker.is_valid({"name": "a", "children": [{"name": "b", "children": []}]})
    assert not checker.is_valid({"name": "a", "children": [{"name": "B"}]})
    assert not checker.is_valid({"name": "a", "children": [{"extra": 1}]})


def _mutants(body: Any) -> list[Any]:
    """Deterministic breakages of a valid document: each leaf replaced by odd values."""
    odd: list[Any] = [0, "Web", "512", "512XB", True, None, [], {"x": 1}, "rdp", "yes"]
    paths: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if path:
            paths.append(path)
        items = value.items() if isinstance(value, dict) else \
            enumerate(value) if isinstance(value, list) else ()
        for key, sub in items:
            walk(sub, path + (key,))

    walk(body, ())
    result = []
    for n, path in enumerate(paths):
        if path[0] in ("apiVersion", "kind"):
            continue
        mutant = copy.deepcopy(body)
        target = mutant
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = copy.deepcopy(odd[n % len(odd)])
        if isinstance(target, dict) and n % 3 == 0:
            target["extra"] = "x"
        result.append(mutant)
    return result


def test_inlined_validators_report_what_the_schemas_as_written_report(
        monkeypatch: pytest.MonkeyPatch) -> None:
    inlined, raw = validate.validators(), _raw_validators()
    checked = 0
    for doc in documents.load([str(EXAMPLES)], recursive=True):
        for body in _mutants(doc.body):
            mutant = Document(body, Location("m.yaml"), {})
            monkeypatch.setattr(validate, "validators", lambda: raw)
            expected = [str(p) for p in validate.schema_problems(mutant)]
            monkeypatch.setattr(validate, "validators", lambda: inlined)
            assert [str(p) for p in validate.schema_problems(mutant)] == expected, body
            checked += 1
    assert checked > 100


def test_validate_returns_the_model() -> None:
    loaded = documents.load([str(EXAMPLES / "lab")])
    assert "Project" in [d.kind for d in loaded]  # examples/lab/kvmctl.yaml
    manifest = validate.validate(loaded)
    assert [vm.meta.name for vm in manifest.vms] == ["lab-web", "lab-db", "lab-probe"]
    assert manifest.find("Network", "lab-nat") is manifest.networks[0]
    assert manifest.find("Project", "lab") is None  # the project file declares no object


def test_a_project_document_among_manifests_is_schema_checked() -> None:
    """validate sets the project file aside only once it passed its schema."""
    text = ("apiVersion: kvmctl/v1\nkind: Project\nmetadata: {name: p}\n"
            "spec:\n  hosts:\n    - {name: h1, uri: nowhere}\n")
    with pytest.raises(ManifestError) as caught:
        validate.validate(documents.parse_text(text, "kvmctl.yaml"))
    [problem] = caught.value.problems
    assert problem.path == "spec.hosts[0].uri"
    assert (problem.location.file, problem.location.line) == ("kvmctl.yaml", 6)


def test_problems_are_sorted_by_location(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text((INVALID / "multiple-problems.yaml").read_text())
    with pytest.raises(ManifestError) as caught:
        validate.validate(documents.load([str(path)]))
    lines = [p.location.line for p in caught.value.problems]
    assert lines == sorted(lines)
