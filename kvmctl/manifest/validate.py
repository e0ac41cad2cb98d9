"""Stage 2: documents -> validated model.

First the JSON schemas (one per kind, strict: compiled predicates say whether a document is
valid, jsonschema says what is wrong with one that is not), then the semantic checks that a
schema cannot express (checks.py). Every problem in every document is collected; nothing is
built from a document set that has any error.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from functools import cache, lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urldefrag, urljoin

if TYPE_CHECKING:  # jsonschema is imported only to explain why a document is invalid
    import jsonschema
    from jsonschema import Draft202012Validator

from ..errors import ManifestError, Problem
from ..kinds import MANIFEST_KINDS, PROJECT_KIND, Kind
from ..memo import Memo
from ..memo import key as digest_of
from ..units import SizeError, parse_size
from ..xmltext import describe_char, first_non_xml_char
from . import checks
from .documents import Document, json_path
from .model import ManifestSet, build
from .schemacheck import Compiler, Predicate, anchored

API_VERSION = "kvmctl/v1"
SCHEMA_FILES = {str(kind): f"{kind.lower()}.schema.json" for kind in MANIFEST_KINDS}
SCHEMA_FILES[PROJECT_KIND] = "project.schema.json"
KINDS = tuple(SCHEMA_FILES)


def _schema_texts() -> dict[str, dict[str, Any]]:
    folder = resources.files("kvmctl.schemas")
    return {entry.name: json.loads(entry.read_text(encoding="utf-8"))
            for entry in folder.iterdir() if entry.name.endswith(".schema.json")}


@lru_cache(maxsize=1)
def predicates() -> dict[str, Predicate]:
    """Per kind, whether a document is valid: the verdict of validators(), without jsonschema
    (schemacheck.py)."""
    texts = _schema_texts()
    compiler = Compiler(schema for schema in texts.values() if "$id" in schema)
    return {kind: compiler.compile(texts[file]) for kind, file in SCHEMA_FILES.items()}


@lru_cache(maxsize=1)
def validators() -> dict[str, Draft202012Validator]:
    """One compiled validator per kind; shared definitions resolve through their $id. It
    explains the documents predicates() refuses; it must give the same verdicts.

    Each kind schema is validated in its inlined form (see _inline_refs): resolving a $ref
    through the registry on every use was two thirds of the validation time.
    """
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012
    texts = _schema_texts()
    validator_class = _validator_class()
    registry: Registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012))
        for schema in texts.values() if "$id" in schema)
    result = {}
    for kind, file in SCHEMA_FILES.items():
        schema = texts[file]
        base = schema.get("$id", "")
        inlined = _inline_refs(schema, registry.resolver(base_uri=base), base, ())
        result[kind] = validator_class(inlined, registry=registry,
                                       format_checker=Draft202012Validator.FORMAT_CHECKER)
    return result


# ---- the validator: draft 2020-12 as JSON Schema means it, not as Python's `re` reads it ---------

@lru_cache(maxsize=1)
def _validator_class() -> Any:
    """Draft 2020-12 with two keywords made strict, for every schema and every value:

    - `pattern`, `patternProperties` (and the additionalProperties that depends on it): `$`
      is the end of the string. jsonschema calls `re.search`, whose `$` also matches before a
      final newline, so "10.0.0.0/24\\n" matched the cidr pattern (ECMA-262, which JSON Schema
      refers to, has no such exception);
    - `integer` is an int, never a float: 2020-12 counts 1500.0 as an integer, and it would
      reach the XML as `1500.0`.
    Error messages are jsonschema's, with the pattern as written in the schema.
    """
    from jsonschema import Draft202012Validator
    from jsonschema import validators as jsonschema_validators
    from jsonschema.exceptions import ValidationError

    original = Draft202012Validator.VALIDATORS

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any
                ) -> Iterator[ValidationError]:
        if validator.is_type(instance, "string") and not anchored(patrn).search(instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    def pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                           schema: Any) -> Iterator[ValidationError]:
        if not validator.is_type(instance, "object"):
            return
        for patrn, subschema in patterns.items():
            for key, value in instance.items():
                if anchored(patrn).search(key):
                    yield from validator.descend(value, subschema, path=key, schema_path=patrn)

    def additional_properties(validator: Any, allowed: Any, instance: Any, schema: Any
                              ) -> Iterator[ValidationError]:
        if "patternProperties" not in schema or not validator.is_type(instance, "object"):
            yield from original["additionalProperties"](validator, allowed, instance, schema)
            return
        properties = schema.get("properties", {})
        extras = [key for key in instance if key not in properties and not any(
            anchored(p).search(key) for p in schema["patternProperties"])]
        if validator.is_type(allowed, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], allowed, path=extra)
        elif not allowed and extras:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {patterns}")

    type_checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    extend: Any = jsonschema_validators.extend  # untyped in the stubs
    return extend(
        Draft202012Validator,
        {"pattern": pattern, "patternProperties": pattern_properties,
         "additionalProperties": additional_properties},
        type_checker=type_checker)


@cache
def schema_for(kind: str) -> dict[str, Any]:
    """The schema of `kind` as written (with its $refs)."""
    return _schema_texts()[SCHEMA_FILES[kind]]


# Keywords whose values are schemas, maps of schemas, or lists of schemas (JSON Schema 2020-12).
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "contains", "not", "if", "then",
               "else", "unevaluatedProperties", "unevaluatedItems", "contentSchema")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")


def _inline_refs(schema: Any, resolver: Any, base: str, seen: tuple[str, ...]) -> Any:
    """`schema` with every `$ref` replaced by its target: merged in when only annotations sit
    beside the `$ref`, else as `allOf: [target]`.

    `{"$ref": X, ...siblings}` and `{"allOf": [X], ...siblings}` validate identically in
    2020-12 and report the same errors (both pass the target's errors up unchanged). A
    recursive reference is left in place, made absolute, for the registry to resolve.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_ONE:
            out[key] = _inline_refs(value, resolver, base, seen)
        elif key in _SCHEMA_MAP and isinstance(value, dict):
            out[key] = {name: _inline_refs(sub, resolver, base, seen)
                        for name, sub in value.items()}
        elif key in _SCHEMA_LIST and isinstance(value, list):
            out[key] = [_inline_refs(sub, resolver, base, seen) for sub in value]
        else:
            out[key] = value
    ref = out.get("$ref")
    if isinstance(ref, str):
        resolved = resolver.lookup(ref)
        uri = urljoin(base, ref)
        if uri in seen:
            out["$ref"] = uri
        else:
            del out["$ref"]
            target_base = urldefrag(uri).url
            own_id = resolved.contents.get("$id") if isinstance(resolved.contents, dict) else None
            if isinstance(own_id, str):
                target_base = urljoin(target_base, own_id)
            target = _inline_refs(resolved.contents, resolved.resolver, target_base,
                                  seen + (uri,))
            if isinstance(target, dict) and set(out) <= _ANNOTATIONS and "$id" not in target:
                # Only annotations beside the $ref: use the target itself (one level less to
                # descend into); the target's own annotations win, as they would in its errors.
                return {**out, **target}
            out["allOf"] = [target] + list(out.get("allOf", []))
    return out


_ANNOTATIONS = {"title", "description", "examples", "default", "$comment", "deprecated",
                "readOnly", "writeOnly"}


def _envelope_problems(doc: Document) -> list[Problem]:
    body = doc.body
    if body.get("apiVersion") != API_VERSION:
        got = body.get("apiVersion")
        message = "missing apiVersion" if got is None else f"unsupported apiVersion {got!r}"
        return [Problem(message, doc.locate(("apiVersion",)), "apiVersion",
                        hint=f"use apiVersion: {API_VERSION}")]
    kind = body.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        message = "missing kind" if kind is None else f"unknown kind {kind!r}"
        hint = f"did you mean {close[0]}?" if close else "one of: " + ", ".join(KINDS)
        return [Problem(message, doc.locate(("kind",)), "kind", hint=hint)]
    return []


def _property_names(error: jsonschema.ValidationError) -> list[str]:
    """The keys named in the `properties` of the (object) schema that failed."""
    schema = error.schema
    return list(schema.get("properties", {}) if isinstance(schema, Mapping) else {})


def _listed(error: jsonschema.ValidationError) -> Iterable[Any]:
    """The values an `enum` lists. jsonschema sets validator_value on every error it raises;
    the stubs also allow Unset, the value of an error built by hand."""
    return cast("Iterable[Any]", error.validator_value)


def _unexpected_keys(error: jsonschema.ValidationError) -> list[str]:
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return []
    allowed = set(_property_names(error))
    return [key for key in error.instance if key not in allowed]


def _problems_from(error: jsonschema.ValidationError, doc: Document) -> Iterable[Problem]:
    path = tuple(error.absolute_path)
    if "propertyNames" in error.schema_path and isinstance(error.instance, str):
        # A key refused by propertyNames: point at the key, say which keys are allowed.
        key, where = error.instance, path + (error.instance,)
        if error.validator == "enum":
            yield Problem(f"field {key!r} is not allowed here", doc.locate(where),
                          json_path(where),
                          hint="allowed here: " + ", ".join(map(str, _listed(error))))
        else:
            yield Problem(f"{key!r} is not a valid key here", doc.locate(where), json_path(where),
                          hint=_hint(error))
        return
    unexpected = _unexpected_keys(error)
    if unexpected:
        known = _property_names(error)
        for key in unexpected:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(known)
            yield Problem(f"unknown field {key!r}", doc.locate(path + (key,)),
                          json_path(path + (key,)), hint=hint)
        return
    yield Problem(_message(error), doc.locate(path + ("<value>",)) if path else doc.source,
                  json_path(path), hint=_hint(error))


def _best_leaf(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For oneOf/anyOf, the sub-error that went deepest is the one a user can act on."""
    if error.context:
        from jsonschema.exceptions import best_match
        return _best_leaf(best_match(error.context))
    return error


def _message(error: jsonschema.ValidationError) -> str:
    custom = error.schema.get("errorMessage") if isinstance(error.schema, dict) else None
    if custom:
        return str(custom)
    leaf = _best_leaf(error)
    if leaf.validator == "required":
        return leaf.message.replace("is a required property", "is required")
    if leaf.validator == "enum":
        return f"{leaf.instance!r} is not one of " + ", ".join(map(repr, _listed(leaf)))
    if leaf.validator == "pattern":
        if isinstance(leaf.instance, str) and _is_size_path(error):
            try:
                parse_size(leaf.instance)
            except SizeError as exc:  # unknown unit, no number...: say exactly what is wrong
                return str(exc)
        return f"{leaf.instance!r} is not valid here"
    return leaf.message


_SIZE_KEYS = ("size", "memory", "max")
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _is_size_path(error: jsonschema.ValidationError) -> bool:
    path = [p for p in error.absolute_path if isinstance(p, str)]
    return bool(path) and path[-1] in _SIZE_KEYS


def _hint(error: jsonschema.ValidationError) -> str:
    leaf = _best_leaf(error)
    if isinstance(leaf.instance, (int, float)) and not isinstance(leaf.instance, bool):
        if _is_size_path(error):
            return f"sizes need a unit: write {leaf.instance}MiB or {leaf.instance}GiB"
    if (leaf.validator == "type" and isinstance(leaf.instance, float)
            and "integer" in _listed_types(leaf) and math.isfinite(leaf.instance)
            and leaf.instance.is_integer()):
        return f"write {int(leaf.instance)}, without a decimal point: this is a whole number"
    if (leaf.validator == "type" and leaf.validator_value == "boolean"
            and isinstance(leaf.instance, str) and leaf.instance.lower() in _YAML11_BOOLS):
        return "write true or false (yes/no/on/off are strings in kvmctl manifests)"
    examples = leaf.schema.get("examples") if isinstance(leaf.schema, dict) else None
    if leaf.validator in ("pattern", "format", "type") and examples:
        return "for example: " + ", ".join(json.dumps(e) for e in examples[:2])
    return ""


def _listed_types(error: jsonschema.ValidationError) -> list[Any]:
    value: Any = error.validator_value
    return list(value) if isinstance(value, list) else [value]


def text_problems(doc: Document) -> list[Problem]:
    """Every key and string of the document, whatever field it is in, is text XML 1.0 can carry
    (kvmctl.xmltext): a NUL or U+FFFE written as a YAML escape would make a definition libvirt
    cannot parse, and checking every string means no new field can forget it."""
    problems = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), doc.body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                where = path + (key,)
                if isinstance(key, str) and (at := first_non_xml_char(key)) >= 0:
                    problems.append(Problem(
                        f"key holds {describe_char(key[at])} at character {at + 1}, which XML "
                        "cannot carry", doc.locate(where), json_path(where), hint=_XML_HINT))
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((path + (i,), item) for i, item in enumerate(value))
        elif isinstance(value, str) and (at := first_non_xml_char(value)) >= 0:
            problems.append(Problem(
                f"text holds {describe_char(value[at])} at character {at + 1}, which XML "
                "cannot carry", doc.locate(path + ("<value>",)) if path else doc.source,
                json_path(path), hint=_XML_HINT))
    return problems


_XML_HINT = ("XML 1.0 allows tab, newline and carriage return, but no other control character, "
             "no U+FFFE or U+FFFF and no lone surrogate; remove the YAML escape")


def _size_problems(doc: Document) -> list[Problem]:
    """Sizes matched the schema's pattern; their units and exactness are checked here."""
    spec = doc.body.get("spec") or {}
    candidates: list[tuple[tuple[str, ...], Any]] = []
    if doc.kind == Kind.DISK:
        candidates.append((("spec", "size"), spec.get("size")))
    if doc.kind == Kind.VM:
        memory = spec.get("memory")
        if isinstance(memory, dict):
            candidates += [(("spec", "memory", k), memory[k]) for k in ("size", "max")
                           if k in memory]
        elif memory is not None:
            candidates.append((("spec", "memory"), memory))
    problems = []
    for path, value in candidates:
        try:
            size = parse_size(value)
        except SizeError as exc:
            problems.append(Problem(str(exc), doc.locate(path + ("<value>",)), json_path(path)))
            continue
        message = ""
        if size == 0:
            message = f"{value!r} is zero: a size must be more than 0"
        elif doc.kind == Kind.VM and size % 1024:
            message = f"{value!r} is not a whole number of KiB (libvirt counts memory in KiB)"
        if message:
            problems.append(Problem(message, doc.locate(path + ("<value>",)), json_path(path)))
    return problems


def schema_problems(doc: Document, memo: Memo | None = None) -> list[Problem]:
    problems = _envelope_problems(doc)
    if problems:
        return problems
    known = memo_key(doc) if memo is not None else ""
    if known and known in memo:  # type: ignore[operator]
        return []
    if not predicates()[doc.kind](doc.body):  # only then jsonschema, to say what is wrong
        validator = validators()[doc.kind]
        for error in sorted(validator.iter_errors(doc.body),
                            key=lambda e: list(map(str, e.path))):
            problems.extend(_problems_from(error, doc))
    texts = text_problems(doc)
    if texts:  # one problem per value: the character, not also the pattern it breaks
        located = {p.path for p in texts}
        problems = texts + [p for p in problems if p.path not in located]
    problems = problems or _size_problems(doc) + _cidr_problems(doc)
    if known and not problems:
        memo.add(known)  # type: ignore[union-attr]
    return problems


def memo_key(doc: Document) -> str:
    return digest_of("schema", json.dumps(doc.body, sort_keys=True, separators=(",", ":"),
                                          default=repr))


def _cidr_problems(doc: Document) -> list[Problem]:
    """A /31 or /32 has no room for the host's address and a guest (and the model needs one)."""
    ipv4 = (doc.body.get("spec") or {}).get("ipv4") if doc.kind == Kind.NETWORK else None
    cidr = ipv4.get("cidr") if isinstance(ipv4, dict) else None
    if isinstance(cidr, str) and int(cidr.rpartition("/")[2]) > 30:
        return [Problem(f"cidr {cidr} is too small for a libvirt network",
                        doc.locate(("spec", "ipv4", "cidr", "<value>")), "spec.ipv4.cidr",
                        hint="use a /30 or larger: the host needs an address, and so do guests")]
    return []


def check_schemas(documents: list[Document], memo: Memo | None = None) -> None:
    """ManifestError listing every schema problem, else every duplicate name, of `documents`.

    `memo` remembers documents that already passed their schema (see memo.py)."""
    problems: list[Problem] = []
    for doc in documents:
        problems.extend(schema_problems(doc, memo))
    if problems:
        raise ManifestError(_sorted(problems))
    problems.extend(checks.duplicates(documents))
    if problems:
        raise ManifestError(problems)


def validate(documents: list[Document], host: checks.HostFacts | None = None,
             memo: Memo | None = None, schemas_checked: bool = False) -> ManifestSet:
    """The model of `documents`, or ManifestError listing every problem in them.

    `schemas_checked`: check_schemas already passed them (a project's documents, checked once
    before they are placed on hosts)."""
    problems: list[Problem] = []
    if not schemas_checked:
        check_schemas(documents, memo)
    # A project file among the documents configures the run (manifest/project.py); it is no
    # object of the model.
    documents = [d for d in documents if d.kind != PROJECT_KIND]
    manifest = build(documents, host.domain_macs if host is not None else None)
    problems.extend(checks.semantic(manifest, {(d.kind, d.name): d for d in documents}, host))
    if problems:
        raise ManifestError(_sorted(problems))
    return manifest


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.location.file, p.location.line, p.location.column))
