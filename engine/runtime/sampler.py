"""Turn a batch of logits into tokens, honouring each request's own settings."""

from dataclasses import dataclass

import torch

from engine.kernels.cpu import greedy_tokens
from engine.runtime.outputs import Logprob
from engine.runtime.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence's sampling inputs for this step."""

    params: SamplingParams
    generator: torch.Generator
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: frozenset[int]  # masked until min_tokens are out


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    # The sampled token and the top-N alternatives (token id -> Logprob).
    top_logprobs: dict[int, Logprob] | None = None


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
    """logits: float32 [N, vocab], one row per entry of `rows`."""
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in rows):
        # Log-probabilities of the model's own distribution, before penalties
        # and temperature (vLLM's default, "raw" logprobs).
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    adjusted = [i for i, row in enumerate(rows) if _adjusts(row)]
    if adjusted:
        logits = logits.clone()  # the caller's logits stay the model's own
    for i in adjusted:
        _adjust_row(logits[i], rows[i])
    token_ids = _greedy_tokens(logits, rows)
    for i, row in enumerate(rows):
        if token_ids[i] is None:
            token_ids[i] = _sample_row(logits[i], row)
    return [
        _with_logprobs(t, row, raw_logprobs, i)
        for i, (t, row) in enumerate(zip(token_ids, rows, strict=True))
    ]


def _adjusts(row: SamplingRow) -> bool:
    """Whether the row's logits change before sampling (bias, penalties, or
    stop tokens masked until min_tokens are out)."""
    p = row.params
    return bool(
        p.logit_bias
        or p.repetition_penalty != 1.0
        or ((p.presence_penalty or p.frequency_penalty) and row.output_token_ids)
        or _masks_stop_ids(row)
    )


def _masks_stop_ids(row: SamplingRow) -> bool:
    """Stop tokens are masked until min_tokens are out."""
    return bool(len(row.output_token_ids) < row.params.min_tokens and row.stop_token_ids)


def _adjust_row(logits: torch.Tensor, row: SamplingRow) -> None:
    # The bias before the penalties, in vLLM's order; the logprobs are the
    # model's own, before either.
    _apply_logit_bias(logits, row.params.logit_bias)
    _apply_penalties(logits, row)
    if _masks_stop_ids(row):
        # NOTE: stop_token_ids are not checked against the vocabulary; an id
        # past it can never be sampled, and indexing with it would raise and
        # fail the whole batch, so mask only the ids that exist.
        stop_ids = [t for t in row.stop_token_ids if t < logits.shape[-1]]
        if stop_ids:
            logits[stop_ids] = float("-inf")


def _greedy_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int | None]:
    """The greedy rows' tokens from one argmax over them (a call per row
    cost more than the argmax itself at 64 rows); None for the others."""
    tokens: list[int | None] = [None] * len(rows)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if not greedy:
        return tokens
    picked = logits if len(greedy) == len(rows) else logits[greedy]
    for i, token in zip(greedy, _argmax_rows(picked).tolist(), strict=True):
        tokens[i] = token
    return tokens


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), by the CPU kernel where it applies: torch's
    argmax took about 2% of a 64-row bfloat16 decode step, the kernel a tenth
    of that, with the same answer (sampling_cpu.cpp)."""
    cpu_float = logits.device.type == "cpu" and logits.dtype == torch.float32
    kernel = greedy_tokens() if cpu_float and logits.stride(-1) == 1 else None
    return kernel(logits) if kernel is not None else logits.argmax(dim=-1)


def _apply_logit_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> None:
    if not bias:
        return
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    logits.index_add_(0, ids, values)


def _apply_penalties(logits: torch.Tensor, row: SamplingRow) -> None:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
            dtype=torch.long,
            device=logits.device,
        )
        vals = logits[seen]
        logits[seen] = torch.where(
            vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
        out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.zeros_like(logits).index_add_(
            0, out, torch.ones_like(out, dtype=logits.dtype)
        )
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _sample_row(logits: torch.Tensor, row: SamplingRow) -> int:
    p = row.params
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, using only
    # this request's generator so its samples never depend on the batch.
    noise = torch.empty_like(probs).exponential_(generator=row.generator)
    return int((probs / noise).argmax())


def _with_logprobs(
    token_id: int, row: SamplingRow, raw: torch.Tensor | None, i: int
) -> SampledToken:
    n = row.params.logprobs
    if n is None or raw is None:
        return SampledToken(token_id)
    lp = raw[i]
    chosen = float(lp[token_id])
    rank = int((lp > lp[token_id]).sum()) + 1
    top: dict[int, Logprob] = {}
    if n > 0:
        values, ids = torch.topk(lp, n)
        for r, (tid, val) in enumerate(zip(ids.tolist(), values.tolist(), strict=True)):
            top[tid] = Logprob(val, r + 1)
    top[token_id] = Logprob(chosen, rank)
    return SampledToken(token_id, chosen, top)
