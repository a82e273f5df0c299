"""Each step's token masks: llguidance fills one bit per token for the rows
that follow a grammar, and the disallowed tokens' logits become -inf."""

import time
from dataclasses import dataclass
from typing import Any

import torch

_BITS = 32  # llguidance's masks are int32 words, one bit per token


@dataclass
class StructuredOutputStats:
    """Time spent in this module since the engine started (seconds), read by
    bench/structured_output.py around each step."""

    mask_seconds: float = 0.0  # filling the masks and applying them to the logits
    advance_seconds: float = 0.0  # moving each matcher past its sampled token
    masked_rows: int = 0
    masked_steps: int = 0

    @property
    def seconds(self) -> float:
        return self.mask_seconds + self.advance_seconds


class SequenceGrammar:
    """Where one sequence stands in its grammar (one per sequence, so per
    choice when n > 1). Dropped with the request's engine state."""

    def __init__(self, matcher: Any, stats: StructuredOutputStats) -> None:
        self.matcher = matcher
        self._stats = stats

    def advance(self, token_id: int) -> None:
        """Move past the sampled token. The mask allowed only tokens the
        grammar takes, so a refusal is a bug: it fails this request alone."""
        start = time.perf_counter()
        ok = self.matcher.consume_token(token_id)
        self._stats.advance_seconds += time.perf_counter() - start
        if not ok:
            raise RuntimeError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar takes no token but end-of-text."""
        return self.matcher.is_stopped()


class GrammarMasker:
    """Masks the logits of the rows that follow a grammar; other rows are
    untouched, and a batch without any grammar costs nothing."""

    def __init__(self, vocab_size: int, stats: StructuredOutputStats) -> None:
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // _BITS)
        self.stats = stats
        self._bits = torch.zeros(0, self.words, dtype=torch.int32)
        self._executor: Any = None
        self._byte_masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # The runner's logits are inference tensors: only written in inference mode.
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, grammars: list[SequenceGrammar | None]) -> None:
        """logits: float [N, vocab], in place; grammars: one entry per row."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        start = time.perf_counter()
        bits = self._fill([grammars[i] for i in rows])
        penalty = self._penalty(bits.to(logits.device, non_blocking=True), logits.dtype)
        penalty = penalty[:, : logits.shape[-1]]
        if len(rows) == logits.shape[0]:
            logits += penalty
        else:
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            logits.index_add_(0, index, penalty)
        self.stats.mask_seconds += time.perf_counter() - start
        self.stats.masked_rows += len(rows)
        self.stats.masked_steps += 1

    def _fill(self, grammars: list[SequenceGrammar]) -> torch.Tensor:
        """The rows' bitmasks, int32 [R, words], computed by llguidance's
        thread pool (it releases the GIL)."""
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        n = len(grammars)
        if self._bits.shape[0] < n:
            self._bits = torch.zeros(n, self.words, dtype=torch.int32)
        bits = self._bits[:n]
        self._executor.unsafe_compute_mask_ptr(
            [(g.matcher, k) for k, g in enumerate(grammars)],
            bits.data_ptr(),
            self.words * 4,
            n,
        )
        return bits

    def _penalty(self, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """0 for each allowed token, -inf for the others: [R, words * 32].

        Each mask byte looks up its eight values in a 256-row table (an
        embedding lookup: measured 3x faster on CPU than indexing the table,
        and far faster than shifting every word 32 times and testing the bits).
        Bytes of a little-endian int32 hold its bits 0-7, 8-15, ...: token order."""
        key = (bits.device, dtype)
        table = self._byte_masks.get(key)
        if table is None:
            allowed = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # [256, 8]
            table = torch.zeros(256, 8).masked_fill_(allowed == 0, float("-inf"))
            table = self._byte_masks[key] = table.to(bits.device, dtype)
        byte_rows = bits.view(torch.uint8).long()
        return torch.nn.functional.embedding(byte_rows, table).view(bits.shape[0], -1)
