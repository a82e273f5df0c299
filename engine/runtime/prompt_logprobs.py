"""Logprobs of a prompt's own tokens (vLLM's prompt_logprobs), for the
requests that ask: the row of prompt position p scores prompt token p + 1."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.runtime.outputs import Logprob

# Rows turned into logits at once: a 49k-token vocabulary makes a 2,048-row
# chunk's logits 400 MB, a slice of 128 rows 25 MB.
ROWS_PER_SLICE = 128


@dataclass(frozen=True)
class PromptRows:
    """The rows of one prompt chunk whose logits are wanted: logical positions
    [start, end), each scoring the prompt token after it, with `top_n`
    alternatives."""

    start: int
    end: int
    top_n: int


def rows_to_score(
    chunk_start: int, chunk_end: int, num_prompt_tokens: int, num_scored: int, top_n: int
) -> PromptRows | None:
    """The rows of a chunk still to score, given that prompt tokens
    [0, num_scored) already have their entry (the first one's is None).

    A chunk recomputed after a preemption covers rows scored before it: they
    are skipped, so each prompt token gets its logprob exactly once. The last
    prompt position scores the first generated token, not a prompt token.
    """
    start = max(chunk_start, num_scored - 1)
    end = min(chunk_end, num_prompt_tokens - 1)
    return PromptRows(start, end, top_n) if start < end else None


def score_rows(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: list[int],
    top_n: int,
) -> list[dict[int, Logprob]]:
    """One entry per row of `hidden`: its target token's logprob and rank,
    then the `top_n` most likely tokens. The model's own log-softmax, as the
    sampled tokens' logprobs are."""
    entries: list[dict[int, Logprob]] = []
    for lo in range(0, len(targets), ROWS_PER_SLICE):
        logprobs = torch.log_softmax(compute_logits(hidden[lo : lo + ROWS_PER_SLICE]), dim=-1)
        target = torch.tensor(
            targets[lo : lo + ROWS_PER_SLICE], dtype=torch.long, device=logprobs.device
        )
        chosen = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
        top_values, top_ids = logprobs.topk(top_n, dim=-1)  # top_n may be 0
        rows = zip(
            target.tolist(),
            chosen.tolist(),
            ranks.tolist(),
            top_ids.tolist(),
            top_values.tolist(),
            strict=True,
        )
        for token, value, rank, ids, values in rows:
            # The prompt token first, then its alternatives (it may be one).
            entry = {token: Logprob(value, rank)}
            for r, (tid, v) in enumerate(zip(ids, values, strict=True)):
                entry.setdefault(tid, Logprob(v, r + 1))
            entries.append(entry)
    return entries
