"""JSON schemas compiled into predicates: is a document valid, without jsonschema.

jsonschema builds a validator object and an error generator for every subschema it descends
into: most of the time of a cold `kvmctl plan`, though almost every document is valid. Here a
schema becomes nested closures that answer only valid or not, with exactly the verdict of
validate.py's jsonschema validator (draft 2020-12, `$` anchored at the end of the string,
`integer` never a bool or a float); jsonschema is imported only to explain a refusal.

Only the keywords below are compiled. Any other keyword, a `format`, an `$anchor` or an `$id`
inside a schema file is refused when the schema is compiled: a keyword this module does not
know would otherwise be silently ignored, and documents it should refuse would pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from numbers import Number
from typing import Any
from urllib.parse import unquote, urldefrag, urljoin

Predicate = Callable[[Any], bool]

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Keywords with no effect on the verdict (the $defs are compiled when a $ref reaches them).
_INERT = frozenset({"title", "description", "examples", "default", "errorMessage", "$comment",
                    "$id", "$schema", "$defs"})
# Keywords that apply to one type of instance only: others pass them.
_OBJECT_KEYWORDS = frozenset({"properties", "additionalProperties", "patternProperties",
                              "propertyNames", "required", "dependentRequired"})
_ARRAY_KEYWORDS = frozenset({"items", "minItems", "maxItems", "uniqueItems"})
_STRING_KEYWORDS = frozenset({"pattern", "minLength", "maxLength"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum"})
# `then` and `else` count only beside an `if` (as in jsonschema).
_OTHER_KEYWORDS = frozenset({"type", "enum", "const", "allOf", "oneOf", "not", "if", "then",
                             "else", "$ref"})
KEYWORDS = (_INERT | _OBJECT_KEYWORDS | _ARRAY_KEYWORDS | _STRING_KEYWORDS
            | _NUMBER_KEYWORDS | _OTHER_KEYWORDS)


class SchemaCompileError(ValueError):
    """A schema this module cannot compile into a predicate with jsonschema's verdicts."""


@cache
def anchored(pattern: str) -> re.Pattern[str]:
    """`pattern` compiled with every `$` anchor (outside a character class, not escaped) made
    `\\Z`, the end of the string: what `$` means in ECMA-262 regular expressions."""
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        i += 1
        if in_class:
            in_class = char != "]"
            out.append(char)
        elif char == "[":
            in_class = True
            out.append(char)
            if pattern.startswith("^", i):  # a negated class
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # ']' first in a class is a literal
                out.append("]")
                i += 1
        else:
            out.append("\\Z" if char == "$" else char)
    return re.compile("".join(out))


# ---- JSON Schema's equality, as jsonschema._utils has it (True is not 1; 1 is 1.0) -------------

_TRUE, _FALSE = object(), object()


def _unbool(value: Any) -> Any:
    return _TRUE if value is True else _FALSE if value is False else value


def equal(one: Any, two: Any) -> bool:
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, Sequence) and isinstance(two, Sequence):
        return len(one) == len(two) and all(map(equal, one, two))
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        return len(one) == len(two) and all(key in two and equal(value, two[key])
                                            for key, value in one.items())
    return bool(_unbool(one) == _unbool(two))


def unique(items: Sequence[Any]) -> bool:
    """jsonschema's `uniq`, step for step: sorted neighbours when the items sort, every pair
    when they do not. (The two differ for a NaN, which sorts nowhere.)"""
    try:
        ordered = sorted(map(_unbool, items))
        return not any(map(equal, ordered, ordered[1:]))
    except (NotImplementedError, TypeError):
        seen: list[Any] = []
        for each in map(_unbool, items):
            if any(equal(other, each) for other in seen):
                return False
            seen.append(each)
        return True


# ---- types ---------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, Number)


def _is_integer(value: Any) -> bool:  # never a float, even 2.0 (see validate._validator_class)
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES: dict[str, Predicate] = {
    "null": lambda value: value is None,
    "boolean": lambda value: isinstance(value, bool),
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "number": _is_number,
    "integer": _is_integer,
}


def _valid(_instance: Any) -> bool:
    return True


def _invalid(_instance: Any) -> bool:
    return False


def _every(checks: Sequence[Predicate]) -> Predicate:
    if not checks:
        return _valid
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda instance: first(instance) and second(instance)

    def every(instance: Any) -> bool:
        for check in checks:
            if not check(instance):
                return False
        return True
    return every


# ---- the compiler --------------------------------------------------------------------------------

class Compiler:
    """Compiles schemas whose `$ref`s reach each other through their `$id`s (`resources`) and
    JSON pointers. A subschema referenced again is compiled once, and a recursive reference
    is followed when it is used.

    A schema becomes one closure per keyword group: the object keywords are checked in one
    pass over the instance's keys, and the string, array or object group also tests the
    type when `type` names only that type (every call saved counts: a VirtualMachine document
    goes through dozens of subschemas)."""

    def __init__(self, resources: Iterable[Mapping[str, Any]] = ()) -> None:
        self._resources: dict[str, Any] = {}
        for resource in resources:
            self._add(resource)
        self._compiled: dict[str, Predicate] = {}
        self._compiling: dict[str, list[Predicate]] = {}

    def compile(self, schema: Mapping[str, Any]) -> Predicate:
        """The predicate of `schema` (a schema file: its `$id`, if any, resolves its `$ref`s)."""
        if "$id" in schema:
            self._add(schema)
        return self._schema(schema, urldefrag(str(schema.get("$id", ""))).url)

    def _add(self, resource: Mapping[str, Any]) -> None:
        if not isinstance(resource.get("$id"), str):
            raise SchemaCompileError("a schema a $ref can reach needs an $id")
        self._resources[urldefrag(resource["$id"]).url] = resource

    def _schema(self, schema: Any, base: str) -> Predicate:
        if schema is True:
            return _valid
        if schema is False:
            return _invalid
        if not isinstance(schema, dict):
            raise SchemaCompileError(f"a schema is an object or a boolean, not {schema!r}")
        _check_keywords(schema, base)
        types = _type_names(schema)
        keys = schema.keys()
        # The group that tests the type itself: `type` names only the type it applies to.
        owner = next(iter(types)) if types is not None and len(types) == 1 else None
        owner = owner if owner in _GROUPS and _GROUPS[owner] & keys else None
        checks = [_type(types)] if types is not None and owner is None else []
        if _OBJECT_KEYWORDS & keys:
            checks.append(self._object(schema, base, exact=owner == "object"))
        if _ARRAY_KEYWORDS & keys:
            checks.append(self._array(schema, base, exact=owner == "array"))
        if _STRING_KEYWORDS & keys:
            checks.append(_string(schema, exact=owner == "string"))
        if _NUMBER_KEYWORDS & keys:
            numeric = _number(schema)
            implied = types is not None and types <= {"number", "integer"}
            checks.append(numeric if implied else
                          lambda instance: not _is_number(instance) or numeric(instance))
        checks.extend(self._applicators(schema, base))
        return _every(checks)

    def _applicators(self, schema: dict[str, Any], base: str) -> list[Predicate]:
        checks: list[Predicate] = []
        if "enum" in schema:
            checks.append(_enum(schema["enum"]))
        if "const" in schema:
            expected = schema["const"]
            checks.append(lambda instance: equal(instance, expected))
        if "$ref" in schema:
            checks.append(self._ref(schema["$ref"], base))
        checks.extend(self._schema(each, base) for each in schema.get("allOf", ()))
        if "oneOf" in schema:
            options = [self._schema(each, base) for each in schema["oneOf"]]
            checks.append(lambda instance: sum(1 for option in options if option(instance)) == 1)
        if "not" in schema:
            refused = self._schema(schema["not"], base)
            checks.append(lambda instance: not refused(instance))
        if "if" in schema:
            condition = self._schema(schema["if"], base)
            then = self._schema(schema.get("then", True), base)
            otherwise = self._schema(schema.get("else", True), base)
            checks.append(lambda instance: then(instance) if condition(instance)
                          else otherwise(instance))
        return checks

    def _object(self, schema: dict[str, Any], base: str, exact: bool) -> Predicate:
        """`exact`: an instance that is not an object fails (else the keywords pass it)."""
        other = not exact
        required = frozenset(schema.get("required", ()))
        dependent = tuple((key, frozenset(needed))
                          for key, needed in schema.get("dependentRequired", {}).items())
        properties = {name: self._schema(sub, base)
                      for name, sub in schema.get("properties", {}).items()}
        declared = tuple(properties.items())
        additional = self._schema(schema.get("additionalProperties", True), base)
        closed = additional is not _valid  # every key is checked, not only the declared ones
        patterns = tuple((anchored(pattern).search, self._schema(sub, base))
                         for pattern, sub in schema.get("patternProperties", {}).items())
        names = self._schema(schema.get("propertyNames", True), base)
        members = _members(properties, patterns, additional, names) \
            if patterns or names is not _valid else None

        def check(instance: Any) -> bool:
            if not isinstance(instance, dict):
                return other
            if not instance.keys() >= required:
                return False
            for key, needed in dependent:
                if key in instance and not instance.keys() >= needed:
                    return False
            if members is not None:
                return members(instance)
            if closed:
                for key, value in instance.items():
                    if not properties.get(key, additional)(value):
                        return False
            else:
                for key, sub in declared:
                    if key in instance and not sub(instance[key]):
                        return False
            return True
        return check

    def _array(self, schema: dict[str, Any], base: str, exact: bool) -> Predicate:
        other = not exact
        item = self._schema(schema.get("items", True), base)
        least, most = schema.get("minItems", 0), schema.get("maxItems")
        distinct = bool(schema.get("uniqueItems"))

        def check(instance: Any) -> bool:
            if not isinstance(instance, list):
                return other
            if len(instance) < least or most is not None and len(instance) > most:
                return False
            if distinct and not unique(instance):
                return False
            return item is _valid or all(map(item, instance))
        return check

    def _ref(self, ref: str, base: str) -> Predicate:
        url, fragment = _resolve(base, ref)
        uri = f"{url}#{fragment}"
        if uri in self._compiled:
            return self._compiled[uri]
        if uri in self._compiling:  # recursive: reached again while compiling it
            cell = self._compiling[uri]
            return lambda instance: cell[0](instance)
        cell = self._compiling[uri] = []
        predicate = self._schema(self._target(uri, url, fragment), url)
        cell.append(predicate)
        del self._compiling[uri]
        self._compiled[uri] = predicate
        return predicate

    def _target(self, uri: str, url: str, fragment: str) -> Any:
        if url not in self._resources:
            raise SchemaCompileError(f"$ref {uri!r}: no schema has the $id {url!r}")
        if fragment and not fragment.startswith("/"):
            raise SchemaCompileError(f"$ref {uri!r}: only JSON pointers are supported, "
                                     "not $anchor names")
        target = self._resources[url]
        for token in unquote(fragment).split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            try:
                target = target[int(token)] if isinstance(target, list) else target[token]
            except (KeyError, IndexError, ValueError, TypeError):
                raise SchemaCompileError(f"$ref {uri!r} points at nothing") from None
        return target


_GROUPS = {"object": _OBJECT_KEYWORDS, "array": _ARRAY_KEYWORDS, "string": _STRING_KEYWORDS}


@cache
def _resolve(base: str, ref: str) -> tuple[str, str]:
    """The schema URL and the fragment a `$ref` names (cached: urljoin was a third of the time
    to compile the schemas, and the same few $refs recur)."""
    return urldefrag(urljoin(base, ref))


def _check_keywords(schema: dict[str, Any], base: str) -> None:
    unknown = schema.keys() - KEYWORDS
    if "format" in unknown:  # no schema uses one: which checker it needs is not guessed
        raise SchemaCompileError("'format' is not supported: no format checker is compiled")
    if unknown:
        raise SchemaCompileError(
            "unknown schema keyword(s) " + ", ".join(map(repr, sorted(unknown)))
            + ": compile them in kvmctl/manifest/schemacheck.py before a schema uses them")
    if schema.get("$schema", DIALECT) != DIALECT:
        raise SchemaCompileError(f"$schema {schema['$schema']!r}: only {DIALECT} is known")
    if "$id" in schema and urldefrag(urljoin(base, schema["$id"])).url != base:
        raise SchemaCompileError(f"$id {schema['$id']!r} inside a schema is not supported: "
                                 "give the subschema a file of its own")


def _type_names(schema: dict[str, Any]) -> frozenset[str] | None:
    if "type" not in schema:
        return None
    value = schema["type"]
    names = frozenset([value] if isinstance(value, str) else value)
    unknown = names - _TYPES.keys()
    if unknown:
        raise SchemaCompileError(f"unknown type(s) {', '.join(map(repr, sorted(unknown)))}")
    return names


def _type(names: frozenset[str]) -> Predicate:
    if len(names) == 1:
        return _TYPES[next(iter(names))]
    tests = tuple(_TYPES[name] for name in sorted(names))
    return lambda instance: any(test(instance) for test in tests)


def _enum(values: list[Any]) -> Predicate:
    if all(isinstance(value, str) for value in values):  # the usual case: a set lookup
        strings = frozenset(values)
        return lambda instance: isinstance(instance, str) and instance in strings
    return lambda instance: any(equal(value, instance) for value in values)


def _members(properties: dict[str, Predicate],
             patterns: tuple[tuple[Callable[[str], object], Predicate], ...],
             additional: Predicate, names: Predicate) -> Predicate:
    """properties, patternProperties, additionalProperties and propertyNames, in one pass."""
    def members(instance: dict[str, Any]) -> bool:
        for key, value in instance.items():
            if not names(key):
                return False
            declared = key in properties
            if declared and not properties[key](value):
                return False
            for search, sub in patterns:
                if search(key) is not None:
                    declared = True
                    if not sub(value):
                        return False
            if not declared and not additional(value):
                return False
        return True
    return members


def _string(schema: dict[str, Any], exact: bool) -> Predicate:
    other = not exact
    search = anchored(schema["pattern"]).search if "pattern" in schema else None
    shortest, longest = schema.get("minLength", 0), schema.get("maxLength")

    def check(instance: Any) -> bool:
        if not isinstance(instance, str):
            return other
        if search is not None and search(instance) is None:
            return False
        # len() counts code points, as JSON Schema does.
        return not len(instance) < shortest and (longest is None or not len(instance) > longest)
    return check


def _number(schema: dict[str, Any]) -> Predicate:
    least, most = schema.get("minimum"), schema.get("maximum")
    # `not x < minimum` rather than `x >= minimum`: jsonschema's comparison, NaN included.
    return lambda instance: ((least is None or not instance < least)
                             and (most is None or not instance > most))
