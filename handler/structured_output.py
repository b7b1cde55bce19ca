"""Structured output: the GBNF grammar a request's answer must follow.

A request asks for one with OpenAI's `response_format` (`json_object`, or `json_schema`
with a JSON Schema), or llama.cpp's own fields: `grammar` (GBNF text) or `json_schema`.
JSON Schemas become GBNF through llama-cpp-python's converter; a schema it cannot
handle, or one using a keyword it would silently ignore, is a 400 naming the field.
The engine's grammar sampler (grammar_sampling.py) then keeps every token inside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

from api_errors import ApiError

# Keywords that constrain values but that the converter would skip: the answer could break them.
IGNORED_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                    "uniqueItems", "contains", "minContains", "maxContains", "minProperties", "maxProperties",
                    "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties",
                    "propertyNames", "unevaluatedProperties", "unevaluatedItems")


@dataclass(frozen=True)
class Constraint:
    """A grammar for the answer, and the request field it comes from (named by errors)."""

    gbnf: str
    param: str


def json_object() -> Constraint:
    return Constraint(JSON_GBNF, "response_format")


def json_schema(schema, param: str) -> Constraint:
    return Constraint(schema_rules(schema, param), param)


def gbnf(text: str, param: str = "grammar") -> Constraint:
    if not text.strip():
        raise ApiError(f"{param}: is empty", param=param)
    return Constraint(text, param)


def schema_rules(schema, param: str, root: str = "") -> str:
    """GBNF for a JSON Schema: its top rule is `root`, or the rule named `root` when given
    (to embed the schema in a larger grammar, as tool calls do)."""
    return schema_converter(schema, param, root).format_grammar()


def schema_converter(schema, param: str, root: str = "") -> SchemaConverter:
    """llama-cpp-python's converter with the schema's rules in it (top rule `root`, or the
    rule named `root` when given), or a 400 naming `param` when it cannot take the schema."""
    if not isinstance(schema, dict):
        raise ApiError(f"{param}: a JSON Schema must be an object, not {type(schema).__name__}", param=param)
    _refuse_ignored_keywords(schema, param)
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "request")
        converter.visit(resolved, root)
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ApiError(f"{param}: this JSON Schema cannot be turned into a grammar: {e}", param=param) from None
    return converter


def _refuse_ignored_keywords(schema, param: str, depth: int = 0) -> None:
    if depth > 64:
        raise ApiError(f"{param}: the JSON Schema is nested too deeply", param=param)
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in IGNORED_KEYWORDS:
                raise ApiError(f"{param}: the JSON Schema keyword `{key}` is not supported "
                               "(the answer could not be kept to it)", param=param)
            # a property may be *named* like a keyword: only look inside its schema
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for sub in value.values():
                    _refuse_ignored_keywords(sub, param, depth + 1)
            else:
                _refuse_ignored_keywords(value, param, depth + 1)
    elif isinstance(schema, list):
        for item in schema:
            _refuse_ignored_keywords(item, param, depth + 1)
