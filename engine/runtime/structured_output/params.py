"""What a request asks its output to follow, named as vLLM's
StructuredOutputsParams: a JSON schema, any JSON object, a regular
expression, one of a list of strings, or a grammar (Lark or GBNF)."""

import json
from dataclasses import dataclass, field
from typing import Any

# How JSON is laid out when the schema does not say (llguidance's
# "x-guidance" options in a schema override these; with whitespace_flexible
# true, "," and ":" as separators give llguidance's own free layout). llguidance's own default
# allows any run of whitespace between tokens: a small or badly prompted model
# then emits newlines until max_tokens and the JSON never closes. Fixed
# separators, as json.dumps writes them, keep every token on the document.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the fields. `json` is a schema (a dict, or its JSON
    text); `json_object` True means any JSON object; `regex` must match the
    whole output; `choice` lists the allowed outputs; `grammar` is Lark (or
    GBNF, converted). Immutable and hashable: compiled grammars are cached by
    `key`, and the n sequences of one request share one instance."""

    json: str | dict | bool | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    # (kind, canonical text): the cache key, set from the one field given.
    key: tuple[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "exactly one of json, json_object, regex, choice, grammar must be set "
                f"(got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind == "choice":
            object.__setattr__(self, "choice", tuple(self.choice))
        object.__setattr__(self, "key", (kind, _canonical(kind, getattr(self, kind))))

    @property
    def kind(self) -> str:
        return self.key[0]

    def grammar_text(self) -> str:
        """The llguidance grammar (a JSON string) for this request's constraint."""
        from llguidance import LLMatcher

        kind, text = self.key
        if kind in ("json", "json_object"):
            return LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(text)
        if kind == "choice":
            # Each choice a Lark string literal (JSON's escapes are Lark's).
            alternatives = " | ".join(json.dumps(c) for c in json.loads(text))
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return _grammar_from_lark_or_gbnf(text)


def _canonical(kind: str, value: Any) -> str:
    """The constraint as one string; ValueError (naming what is wrong) for a
    value of the wrong shape. A schema's key order is kept: it is the order
    the properties are generated in."""
    if kind == "json_object":
        if value is not True:
            raise ValueError("structured_outputs.json_object must be true")
        return '{"type": "object"}'
    if kind == "json":
        return _schema_text(value)
    if kind == "choice":
        choices = list(value)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return json.dumps(choices)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    return value


def _schema_text(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(value, dict | bool):
        raise ValueError(
            f"a JSON schema must be an object (or true/false), got {type(value).__name__}"
        )
    return json.dumps(value)


def _grammar_from_lark_or_gbnf(text: str) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(text)  # Lark passes through; GBNF (llama.cpp's) is converted
    except Exception as e:  # the converter raises plain Exceptions for bad GBNF
        raise ValueError(f"the grammar is neither valid Lark nor GBNF: {e}") from e
    return LLMatcher.grammar_from_lark(lark)
