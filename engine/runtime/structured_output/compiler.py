"""A request's constraint compiled into an llguidance matcher, once per
distinct constraint.

Thread-safe, unlike the rest of the engine: the server compiles a request's
grammar in a worker thread before it submits the request (a large schema
takes tens of milliseconds, which would stall every running sequence if the
engine's step loop did it); the engine thread then finds it in the cache and
only copies it.
"""

import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.runtime.structured_output.params import StructuredOutputsParams

# Compiled grammars kept (least recently used dropped first). A compiled JSON
# schema holds kilobytes to a few megabytes of lexer and parser state.
MAX_CACHED_GRAMMARS = 256


class GrammarCompiler:
    """Compiles StructuredOutputsParams against the model's vocabulary."""

    def __init__(
        self, tokenizer_file: Path | None, vocab_size: int, eos_token_ids: Iterable[int]
    ) -> None:
        self._tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.num_compiled = 0  # grammars built, not found in the cache

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled (never advanced) llguidance matcher of `spec`; copy it
        per sequence. ValueError with llguidance's reason for a bad schema,
        regex or grammar."""
        with self._lock:
            template = self._cache.get(spec.key)
            if template is not None:
                self._cache.move_to_end(spec.key)
                return template
        # Outside the lock: two different grammars compile side by side (the
        # same one twice at worst, when two requests race for it).
        template = self._build(spec)
        with self._lock:
            self._cache[spec.key] = template
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            self.num_compiled += 1
        return template

    def new_matcher(self, spec: StructuredOutputsParams) -> Any:
        """A matcher at the start of `spec`'s grammar, for one sequence."""
        return self.compile(spec).deep_copy()

    def _build(self, spec: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        grammar = spec.grammar_text()
        # log_level 0: a bad grammar is the client's error, reported to it
        # (a 400), not a warning in the server's log.
        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(_reason(spec, matcher.get_error()))
        # The lexer builds its states lazily, at the first mask: for some
        # grammars that takes a second ("(a{1000}){1000}"). Build them here,
        # off the engine's step; the copies share them. Computing a mask
        # moves nothing: the template stays at the start.
        matcher.compute_bitmask()
        if matcher.is_error():  # a limit hit while building the lexer
            raise ValueError(_reason(spec, matcher.get_error()))
        return matcher

    def tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (each token's bytes), built on
        first use: it takes about a second for a 50k vocabulary."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            return self._tokenizer

    def _load_tokenizer(self) -> Any:
        from llguidance import LLTokenizer

        path = self._tokenizer_file
        if path is None or not path.is_file():
            raise ValueError(
                "structured output needs the model's tokenizer.json, and this model has none"
            )
        try:
            # The file, not the engine's Hugging Face tokenizer: that one
            # belongs to the engine thread, and this may run in another.
            return LLTokenizer(
                path.read_text(), n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        except Exception as e:  # a tokenizer llguidance cannot read (pyo3 raises plain errors)
            raise ValueError(f"structured output cannot use this model's tokenizer: {e}") from e


def _reason(spec: StructuredOutputsParams, error: str) -> str:
    """llguidance's message, said of the kind of constraint it came from."""
    what = {
        "json": "invalid JSON schema",
        "json_object": "invalid JSON object grammar",
        "regex": "invalid regex",
        "choice": "invalid choice list",
        "grammar": "invalid grammar",
    }[spec.kind]
    return f"{what}: {error.strip()}"
