"""A request's structured output: OpenAI's response_format, vLLM's guided_*
fields or its structured_outputs field, as the engine's
StructuredOutputsParams, compiled before the request is queued so that a bad
schema, regex or grammar is a 400 naming the field it came in."""

from collections.abc import Callable, Iterator
from typing import Any

from engine import StructuredOutputsParams
from server.async_engine import AsyncEngine
from server.errors import BadRequestError
from server.protocol import ResponseFormat, SamplingFields

_Source = tuple[str, Callable[[], StructuredOutputsParams]]  # (request field, maker)

# vLLM's guided_* fields and the StructuredOutputsParams field each sets.
_GUIDED = (
    ("guided_json", "json"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)


async def structured_outputs_for(
    engine: AsyncEngine, request: SamplingFields
) -> StructuredOutputsParams | None:
    """The request's constraint, compiled (the engine then finds it in its
    cache), or None when it asks for none. BadRequestError for two kinds at
    once, or one that is malformed or does not compile."""
    sources = list(_sources(request))
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise BadRequestError(
            f"only one kind of structured output may be set per request, got {names}",
            sources[1][0],
        )
    param, make = sources[0]
    try:
        spec = make()
        await engine.compile_grammar(spec)
    except ValueError as e:
        raise BadRequestError(f"{param}: {e}", param) from e
    return spec


def _sources(request: SamplingFields) -> Iterator[_Source]:
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        yield "response_format", lambda: _from_response_format(fmt)
    for name, kind in _GUIDED:
        value = getattr(request, name)
        if value is not None:
            yield name, _maker(**{kind: value})
    fields = request.structured_outputs
    if fields is not None:
        yield "structured_outputs", _maker(**fields.model_dump(by_alias=True, exclude_none=True))


def _maker(**kwargs: Any) -> Callable[[], StructuredOutputsParams]:
    return lambda: StructuredOutputsParams(**kwargs)


def _from_response_format(fmt: ResponseFormat) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ValueError("type json_schema needs json_schema.schema, the JSON schema to follow")
    return StructuredOutputsParams(json=fmt.json_schema.json_schema)
