"""schemacheck: the compiled predicates give exactly the verdicts of validate.py's jsonschema
validator, on every document of the repository, on mutants of the valid ones, and on the
corners of each keyword; a keyword it does not know is refused when compiling; a valid manifest
set is checked without importing jsonschema.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_docs import disk, doc, image, pool

from kvmctl.errors import ManifestError
from kvmctl.manifest import documents, validate
from kvmctl.manifest.schemacheck import Compiler, SchemaCompileError, anchored

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
CORPUS_FOLDERS = ("examples", "tests/fixtures", "tests/golden")


def _repository_documents() -> Iterator[Any]:
    """Every document of a YAML file under CORPUS_FOLDERS, the schemas' own examples and the
    documents tests/manifest_docs.py builds."""
    for folder in CORPUS_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in documents.MANIFEST_SUFFIXES:
                continue
            try:
                loaded = documents.load([str(path)])
            except ManifestError:  # not YAML a document can be read from: nothing to validate
                continue
            yield from (each.body for each in loaded)
    for schema_file in sorted(SCHEMAS.glob("*.schema.json")):
        yield from json.loads(schema_file.read_text(encoding="utf-8")).get("examples", [])
    yield from (pool("p", "/var/lib/kvmctl/pools/p"), image("i", "p", path="/srv/i.img"),
                disk("d", "p"), disk("o", "p", image="i", format="raw"),
                doc("Network", "n", {"mode": "isolated"}))


@cache
def _corpus() -> list[tuple[str, Any]]:
    """(kind, body) of every repository document of a known kind."""
    return [(body["kind"], body) for body in _repository_documents()
            if isinstance(body, dict) and body.get("kind") in validate.KINDS]


def _verdicts(kind: str, body: Any) -> tuple[bool, bool]:
    """(compiled, jsonschema) verdicts on `body` against the schema of `kind`."""
    return validate.predicates()[kind](body), validate.validators()[kind].is_valid(body)


def test_the_same_verdict_on_every_document_of_the_repository() -> None:
    verdicts = [(kind, body, *_verdicts(kind, body)) for kind, body in _corpus()]
    assert [(kind, body) for kind, body, compiled, expected in verdicts
            if compiled != expected] == []
    valid = sum(expected for *_, expected in verdicts)
    assert valid > 300 and len(verdicts) - valid > 20  # both verdicts are compared, many times
    assert {kind for kind, *_ in verdicts} == set(validate.KINDS)


# ---------------------------------------------------------------------------- mutants


def _schema_atoms() -> list[Any]:
    """Values the schemas name (enum and const values, bounds and their neighbours, property
    names, examples) and the odd values beside them: what a mutant is made of."""
    atoms: list[Any] = [None, True, False, 0, 1, -1, 2.0, 1.5, "", " ", "x", "\n", [], {}]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            atoms.extend(node.get("enum", []))
            if "const" in node:
                atoms.append(node["const"])
            for bound in ("minimum", "maximum", "minLength", "maxLength", "minItems"):
                if bound in node:
                    value = node[bound]
                    atoms.extend([value, value - 1, value + 1, float(value)])
            atoms.extend(node.get("properties", {}))
            atoms.extend(e for e in node.get("examples", []) if not isinstance(e, dict))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(SCHEMAS.glob("*.schema.json")):
        walk(json.loads(path.read_text(encoding="utf-8")))
    unique = {json.dumps(a, sort_keys=True): a for a in atoms}
    return [unique[k] for k in sorted(unique)]


ATOMS = _schema_atoms()


@cache
def _valid_bodies() -> list[tuple[str, Any]]:
    seen: dict[str, tuple[str, Any]] = {}
    for kind, body in _corpus():
        if validate.validators()[kind].is_valid(body):
            seen.setdefault(json.dumps(body, sort_keys=True), (kind, body))
    return [seen[key] for key in sorted(seen)]


def _spots(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value inside `value` but the envelope (apiVersion and kind are
    checked before the schema)."""
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        if path or key not in ("apiVersion", "kind"):
            yield path + (key,)
            yield from _spots(sub, path + (key,))


def _place(kind: str, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """Where a path leads in any document of `kind`: list positions do not count."""
    return (kind, *("[]" if isinstance(part, int) else part for part in path))


@cache
def _grafts() -> dict[tuple[Any, ...], dict[Any, list[Any]]]:
    """The values under each key (or list position) of each place in the valid documents:
    grafted onto another document, they make the combinations the schemas' if/then, oneOf and
    dependentRequired decide on (an interface with both a network and a bridge)."""
    found: dict[tuple[Any, ...], dict[Any, list[Any]]] = {}
    for kind, body in _valid_bodies():
        for path in _spots(body):
            key = "[]" if isinstance(path[-1], int) else path[-1]
            values = found.setdefault(_place(kind, path[:-1]), {}).setdefault(key, [])
            if _at(body, path) not in values:
                values.append(_at(body, path))
    return found


def _variants(old: Any) -> list[Any]:
    """Near misses of a valid value: the mistakes the schemas are there to catch."""
    if isinstance(old, bool):
        return [not old, int(old), str(old).lower(), None]
    if isinstance(old, int):
        return [float(old), old + 1, old - 1, -old, 0, True, str(old), old + 0.5]
    if isinstance(old, str):
        return [old + "\n", old + "\n\n", "\n" + old, old + " ", old.upper(), old[:1], "",
                old * 2, old + "/", "a" * 70, old.replace(".", "")]
    if isinstance(old, list):
        return [[], old + old[:1], old[:1] * 2, [old], old[::-1]]
    return [{}, [old], "x"]


Mutation = Callable[[st.DataObject, str, dict[str, Any]], None]


def _graft(data: st.DataObject, kind: str, body: dict[str, Any]) -> None:
    """A key (or list item) found at the same place in another document, or a stray key."""
    path = data.draw(st.sampled_from([path for path in [(), *_spots(body)]
                                      if isinstance(_at(body, path), (dict, list))]))
    target = _at(body, path)
    grafts = {**_grafts().get(_place(kind, path), {}), "extra": ATOMS}
    key = data.draw(st.sampled_from(sorted(grafts)))
    value = copy.deepcopy(data.draw(st.sampled_from(grafts[key])))
    if isinstance(target, dict):
        target[key] = value
    else:
        target.append(value)


def _duplicate(data: st.DataObject, kind: str, body: dict[str, Any]) -> None:
    """An item of a list repeated (uniqueItems)."""
    lists = [path for path in _spots(body) if isinstance(_at(body, path), list) and _at(body, path)]
    if lists:
        target = _at(body, data.draw(st.sampled_from(lists)))
        target.append(copy.deepcopy(data.draw(st.sampled_from(target))))


def _change(operation: str) -> Mutation:
    """Drop a value, replace it with a value the schemas name, or with a near miss of it."""
    def change(data: st.DataObject, kind: str, body: dict[str, Any]) -> None:
        spots = list(_spots(body))
        if not spots:  # everything but the envelope was dropped
            return
        path = data.draw(st.sampled_from(spots))
        parent = _at(body, path[:-1])
        if operation == "drop":
            del parent[path[-1]]
        elif operation == "replace":
            parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(ATOMS)))
        else:
            parent[path[-1]] = data.draw(st.sampled_from(_variants(parent[path[-1]])))
    return change


# Near misses and grafts are the likeliest to tell two validators apart: drawn most often.
MUTATIONS: list[Mutation] = [_change("near")] * 3 + [_graft] * 2 + [
    _duplicate, _change("replace"), _change("drop")]


def _at(body: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        body = body[key]
    return body


@settings(max_examples=1000, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_same_verdict_on_mutants_of_valid_documents(data: st.DataObject) -> None:
    kind, body = data.draw(st.sampled_from(_valid_bodies()))
    mutant = copy.deepcopy(body)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]))):
        data.draw(st.sampled_from(MUTATIONS))(data, kind, mutant)
    compiled, expected = _verdicts(kind, mutant)
    assert compiled == expected, mutant


# ---------------------------------------------------------------------------- each keyword

NAN = float("nan")
KEYWORD_CASES: list[tuple[dict[str, Any], list[Any]]] = [
    ({"enum": [1, "a", None, [1], {"a": 1}]},
     [1, 1.0, True, "a", None, [1], [1.0], [True], {"a": 1}, {"a": 1.0}, {"a": True}, 0, "1"]),
    ({"enum": ["a", "b"]}, ["a", "c", 1, None, ["a"]]),
    ({"const": True}, [True, 1, 1.0, "true", False]),
    ({"const": 0}, [0, 0.0, -0.0, False, None]),
    ({"const": [1, {"b": False}]}, [[1, {"b": False}], [1.0, {"b": False}], [True, {"b": False}],
                                    [1, {"b": 0}], [1]]),
    ({"uniqueItems": True}, [[1, 1.0], [1, True], [0, False], [True, True], [[1], [True]],
                             [{"a": 1}, {"a": 1.0}], ["a", "b"], ["a", "a"], [None, None],
                             [1, "1"], [], [[1, 2], [1, 2]], [NAN, NAN], "aa"]),
    ({"type": "integer"}, [1, 2.0, True, -3, 1.5, "1", None, 10**30]),
    ({"type": "number"}, [1, 2.0, True, float("inf"), "1", None]),
    ({"type": ["integer", "null"]}, [None, 1, 1.0, False]),
    ({"type": "boolean"}, [True, 0, "true"]),
    ({"type": "object"}, [{}, [], "x"]),
    ({"type": "array", "minItems": 1}, [[1], [], {}]),
    ({"type": "string", "pattern": "^a$"}, ["a", "a\n", 1]),
    ({"minimum": 1, "maximum": 10},
     [0, 1, 10, 11, 0.999, 1.0, 10.0, 10.5, True, False, "5", NAN, None]),
    ({"minLength": 2, "maxLength": 3}, ["a", "ab", "abc", "abcd", "é", "😀😀", "e\u0301", 5]),
    ({"pattern": "^[a-z]+$"}, ["abc", "abc\n", "ABC", "", 5, "a$"]),
    ({"pattern": "[0-9]"}, ["a1b", "ab", ""]),
    ({"patternProperties": {"^x-[a-z]+$": {"type": "integer"}},
      "properties": {"a": {"type": "string"}, "x-b": {"minimum": 5}},
      "additionalProperties": False},
     [{"a": "s"}, {"x-y": 1}, {"x-y\n": 1}, {"x-y": "s"}, {"b": 1}, {}, {"x-b": 6},
      {"x-b": 4}, {"x-b": 6.0}, [], "s"]),
    ({"propertyNames": {"maxLength": 2}}, [{"ab": 1}, {"abc": 1}, {}, "abc"]),
    ({"propertyNames": {"enum": ["a"]}, "properties": {"a": {"type": "string"}}},
     [{"a": "x"}, {"a": 1}, {"b": 1}]),
    ({"additionalProperties": {"type": "string"}, "properties": {"n": {"type": "integer"}}},
     [{"n": 1}, {"n": "1"}, {"m": "1"}, {"m": 1}]),
    ({"required": ["a"], "dependentRequired": {"b": ["c"]}},
     [{"a": 1}, {"a": 1, "b": 1}, {"a": 1, "b": 1, "c": 1}, {}, [], "a"]),
    ({"items": {"type": "string"}, "minItems": 1, "maxItems": 2},
     [[], ["a"], ["a", "b", "c"], [1], {}, "ab"]),
    ({"items": False}, [[], [1], "x"]),
    ({"oneOf": [{"type": "integer"}, {"minimum": 5}]}, [1, 7, 7.0, "x"]),
    ({"not": {"type": "string"}}, ["a", 1]),
    ({"if": {"type": "integer"}, "then": {"minimum": 3}, "else": {"type": "string"}},
     [2, 3, "a", None, 2.5]),
    ({"if": {"required": ["a"]}, "then": {"required": ["b"]}}, [{}, {"a": 1}, {"a": 1, "b": 2}]),
    ({"then": {"type": "string"}, "minimum": 2}, [1, 3, "a"]),  # without an if, then is inert
    ({"allOf": [{"minimum": 1}, {"maximum": 2}]}, [0, 1, 2, 3]),
    ({"properties": {"a": True, "b": False}}, [{"a": 1}, {"b": 1}, {}]),
    ({"type": ["string", "object"], "if": {"type": "string"}, "then": {"enum": ["none"]},
      "required": ["type"], "additionalProperties": False,
      "properties": {"type": {"enum": ["vnc"]}}},
     ["none", "vnc", {"type": "vnc"}, {"type": "none"}, {}, 1]),
]


@pytest.mark.parametrize(("schema", "instances"), KEYWORD_CASES,
                         ids=[json.dumps(s)[:60] for s, _ in KEYWORD_CASES])
def test_each_keyword_gives_the_verdicts_of_the_jsonschema_validator(
        schema: dict[str, Any], instances: list[Any]) -> None:
    predicate = Compiler().compile(schema)
    checker = validate._validator_class()(schema)
    verdicts = [(instance, predicate(instance), checker.is_valid(instance))
                for instance in instances]
    assert [v for v in verdicts if v[1] != v[2]] == []
    assert {v[2] for v in verdicts} == {True, False}  # each case holds both verdicts


def test_recursive_and_cross_file_references_resolve() -> None:
    tree = {"$id": "https://example.test/tree.json", "$ref": "#/$defs/node",
            "$defs": {"node": {"type": "object", "additionalProperties": False,
                               "properties": {"name": {"$ref": "names.json#/$defs/name"},
                                              "children": {"type": "array",
                                                           "items": {"$ref": "#/$defs/node"}}}}}}
    names = {"$id": "https://example.test/names.json",
             "$defs": {"name": {"type": "string", "pattern": "^[a-z]+$"}}}
    predicate = Compiler([names]).compile(tree)
    assert predicate({"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]})
    assert not predicate({"name": "a", "children": [{"name": "b", "children": [{"name": "C"}]}]})
    assert not predicate({"name": "a", "children": [{"extra": 1}]})


@pytest.mark.parametrize(("schema", "refused"), [
    ({"type": "string", "contentEncoding": "base64"}, "unknown schema keyword(s) 'contentEncod"),
    ({"properties": {"a": {"type": "integer", "multipleOf": 2}}}, "'multipleOf'"),
    ({"items": {"anyOf": [{"type": "string"}]}}, "'anyOf'"),
    ({"$defs": {"x": {"exclusiveMinimum": 0}}, "$ref": "#/$defs/x"}, "'exclusiveMinimum'"),
    ({"type": "string", "format": "ipv4"}, "'format' is not supported"),
    ({"type": "strng"}, "unknown type(s) 'strng'"),
    ({"$ref": "#name"}, "only JSON pointers"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "other.json#/$defs/x"}, "no schema has the $id"),
    ({"properties": {"a": {"$id": "inner.json"}}}, "inside a schema is not supported"),
    ({"$schema": "http://json-schema.org/draft-07/schema#"}, "only https://json-schema.org"),
])
def test_what_the_compiler_does_not_know_is_refused_when_compiling(
        schema: dict[str, Any], refused: str) -> None:
    with pytest.raises(SchemaCompileError) as caught:
        Compiler().compile({"$id": "https://example.test/s.json", **schema})
    assert refused in str(caught.value)


def test_validate_uses_the_one_anchored() -> None:
    assert validate.anchored is anchored


# ---------------------------------------------------------------------------- imports


def _imported_by_validate(target: Path) -> tuple[int, set[str]]:
    """Exit status and imported modules of `kvmctl validate -f target` in a fresh process."""
    env = {**os.environ, "KVMCTL_NO_CACHE": "1"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvmctl", "validate", "-f", str(target)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:")}
    return result.returncode, modules


def _schema_libraries(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in ("jsonschema", "referencing")}


def test_a_valid_manifest_set_is_checked_without_importing_jsonschema(tmp_path: Path) -> None:
    code, modules = _imported_by_validate(REPO / "examples" / "quickstart")
    assert code == 0
    assert "kvmctl.manifest.schemacheck" in modules
    assert _schema_libraries(modules) == set()
    # The control: an invalid document does load jsonschema, to say what is wrong with it.
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: kvmctl/v1\nkind: Network\nmetadata: {name: n}\n"
                      "spec: {mtu: 12}\n", encoding="utf-8")
    code, modules = _imported_by_validate(broken)
    assert code == 1
    assert "jsonschema" in _schema_libraries(modules)
