"""Structured output (JSON schema, any JSON object, regex, choice, grammar)
through llguidance.

The engine asks three things of it: a SequenceGrammar for each new sequence
(its matcher, a copy of the request's compiled grammar), the logits masked
before each sampling step (disallowed tokens at -inf, as vLLM does: before
the sampler, so logprobs are of the masked distribution), and each sampled
token fed to its matcher, which says when the output is complete.
"""

from collections.abc import Iterable
from pathlib import Path

import torch

from engine.runtime.structured_output.compiler import GrammarCompiler
from engine.runtime.structured_output.masking import (
    GrammarMasker,
    SequenceGrammar,
    StructuredOutputStats,
)
from engine.runtime.structured_output.params import StructuredOutputsParams


class StructuredOutput:
    """The engine's structured-output state: the (thread-safe) compiler, the
    masker and their timings. Per-sequence state lives in SequenceGrammar."""

    def __init__(
        self, tokenizer_file: Path | None, vocab_size: int, eos_token_ids: Iterable[int]
    ) -> None:
        self.stats = StructuredOutputStats()
        self.compiler = GrammarCompiler(tokenizer_file, vocab_size, eos_token_ids)
        self._masker = GrammarMasker(vocab_size, self.stats)

    def new_sequence(self, spec: StructuredOutputsParams | None) -> SequenceGrammar | None:
        """The grammar state of a new sequence (None without a constraint).
        ValueError for a constraint that does not compile."""
        if spec is None:
            return None
        return SequenceGrammar(self.compiler.new_matcher(spec), self.stats)

    def mask(self, logits: torch.Tensor, grammars: list[SequenceGrammar | None]) -> None:
        """Mask, in place, the rows of `logits` whose sequence has a grammar."""
        self._masker.apply(logits, grammars)


__all__ = [
    "GrammarCompiler",
    "SequenceGrammar",
    "StructuredOutput",
    "StructuredOutputStats",
    "StructuredOutputsParams",
]
