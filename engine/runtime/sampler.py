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
    drawn = [i for i, t in enumerate(token_ids) if t is None]
    if drawn:
        picked = _random_tokens(logits[drawn], [rows[i] for i in drawn])
        for i, token in zip(drawn, picked, strict=True):
            token_ids[i] = token
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


def _random_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One draw per row from its tempered, truncated distribution, the rows in
    one batch: a row at a time (softmax, an Exp(1) noise tensor from torch's
    sequential generator, argmax) cost about 1.2 ms per row, 77 ms a step at
    64 rows, where greedy decoding took 1. logits: [R, vocab], a copy (its
    rows are changed in place)."""
    temperature = torch.tensor([row.params.temperature for row in rows], dtype=logits.dtype)
    logits.div_(temperature.to(logits.device).unsqueeze(1))
    _keep_top_k(logits, [row.params.top_k for row in rows])
    probs = torch.softmax(logits, dim=-1)
    for r, row in enumerate(rows):
        if row.params.top_p < 1.0:
            _keep_top_p(probs[r], row.params.top_p)
        if row.params.min_p > 0.0:
            probs[r].masked_fill_(probs[r] < row.params.min_p * probs[r].max(), 0.0)
    return _inverse_cdf(probs, rows)


def _keep_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Mask each row's logits below its k-th largest (ties with it stay; k of
    0 or past the vocabulary keeps all), every such row in one top-k."""
    rows = [r for r, k in enumerate(top_k) if 0 < k < logits.shape[-1]]
    if not rows:
        return
    k = torch.tensor([top_k[r] for r in rows], device=logits.device)
    part = logits[rows]
    kth = part.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    logits[rows] = part.masked_fill(part < kth, float("-inf"))


def _keep_top_p(probs: torch.Tensor, top_p: float) -> None:
    """Zero all but the smallest set of most likely tokens whose mass reaches
    top_p (always the top token). The candidates come from a top-k of a few
    hundred (0.1 ms), then a few thousand (0.7 ms), and a full sort (3.4 ms
    on 49k tokens) only when those hold less than top_p."""
    values = order = None
    for k in _TOP_P_CANDIDATES:
        if k >= probs.numel():
            break
        values, order = torch.topk(probs, k)
        if float(values.sum()) >= top_p:
            break
        values = None
    if values is None:
        values, order = torch.sort(probs, descending=True)
    drop = values.cumsum(0) - values >= top_p
    keep = order[~drop]
    kept = probs[keep]
    probs.zero_()
    probs[keep] = kept


_TOP_P_CANDIDATES = (256, 4096)


def _inverse_cdf(probs: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """Each row's token from one uniform of its own generator against its
    cumulative distribution, so a request's samples never depend on the batch
    it ran in. probs: [R, vocab], unnormalized (truncation zeroes some)."""
    cdf = probs.cumsum(dim=-1)
    uniform = torch.stack(
        [torch.rand((), generator=row.generator, device=probs.device) for row in rows]
    )
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # target is below the row's total, but rounding may land it on the total:
    # then the answer is the last token with any mass.
    past = tokens >= probs.shape[-1]
    if bool(past.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
        tokens = torch.where(past, last, tokens)
    return tokens.tolist()


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
