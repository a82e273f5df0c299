"""engine.runtime.sampler.sample on hand-made logits: no model."""

import math
from collections import Counter

import pytest
import torch

from engine.runtime import sampler
from engine.runtime.sampler import SamplingRow, _apply_penalties, sample
from engine.runtime.sampling_params import SamplingParams


def make_row(
    seed: int = 0,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    stop: set[int] | None = None,
    **params,
) -> SamplingRow:
    return SamplingRow(
        params=SamplingParams(**params),
        generator=torch.Generator().manual_seed(seed),
        prompt_token_ids=list(prompt or [0]),
        output_token_ids=list(output or []),
        stop_token_ids=frozenset(stop or ()),
    )


def logits_of(probs: list[float]) -> torch.Tensor:
    """One row of logits whose softmax is `probs`."""
    return torch.tensor([probs], dtype=torch.float32).log()


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def draw(logits: torch.Tensor, row: SamplingRow, times: int) -> Counter:
    """Sample `times` tokens from one row of logits with the row's own generator."""
    return Counter(sample(logits, [row])[0].token_id for _ in range(times))


# -- greedy and its equivalents ----------------------------------------------


def test_greedy_is_argmax_per_row():
    logits = random_logits(6, 50)
    rows = [make_row(temperature=0.0) for _ in range(6)]
    tokens = [t.token_id for t in sample(logits, rows)]
    assert tokens == logits.argmax(dim=-1).tolist()


def test_temperature_below_epsilon_is_greedy():
    logits = random_logits(1, 50, seed=3)
    for seed in range(5):
        (t,) = sample(logits, [make_row(seed=seed, temperature=1e-6)])
        assert t.token_id == int(logits.argmax())


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_keep_only_the_top_token_equal_greedy(settings):
    logits = random_logits(8, 100, seed=1)
    expected = logits.argmax(dim=-1).tolist()
    for seed in range(5):
        rows = [make_row(seed=seed * 10 + i, temperature=1.5, **settings) for i in range(8)]
        assert [t.token_id for t in sample(logits, rows)] == expected


def test_sample_does_not_modify_the_callers_logits():
    logits = random_logits(2, 20)
    before = logits.clone()
    rows = [
        make_row(output=[1, 2, 2], stop={3}, min_tokens=5, repetition_penalty=1.3),
        make_row(output=[4], presence_penalty=1.0, frequency_penalty=0.5, temperature=0.7),
    ]
    sample(logits, rows)
    assert torch.equal(logits, before)


# -- seeded sampling ---------------------------------------------------------


def sample_sequence(logits: torch.Tensor, rows: list[SamplingRow], index: int, steps: int):
    """Tokens drawn for rows[index] over `steps` calls with the same batch."""
    return [sample(logits, rows)[index].token_id for _ in range(steps)]


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(1, 1000)  # uniform: any change of stream changes the draws
    first = sample_sequence(logits, [make_row(seed=7)], 0, 20)
    again = sample_sequence(logits, [make_row(seed=7)], 0, 20)
    other = sample_sequence(logits, [make_row(seed=8)], 0, 20)
    assert first == again
    assert first != other


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch():
    vocab = 1000
    alone = sample_sequence(torch.zeros(1, vocab), [make_row(seed=7, top_p=0.9)], 0, 20)
    # The same request third in a batch, next to rows with other settings and seeds.
    logits = torch.cat([random_logits(2, vocab), torch.zeros(1, vocab), random_logits(1, vocab)])
    batch = [
        make_row(seed=1, temperature=0.5, top_k=10),
        make_row(seed=2, temperature=0.0),
        make_row(seed=7, top_p=0.9),
        make_row(seed=3, repetition_penalty=1.5, output=[5, 6]),
    ]
    assert sample_sequence(logits, batch, 2, 20) == alone


def test_temperature_one_matches_the_distribution():
    probs = [0.2, 0.3, 0.5]
    counts = draw(logits_of(probs), make_row(seed=123), 4000)
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_temperature_sharpens_the_distribution():
    # At temperature 0.5, p_i is proportional to p_i ** 2.
    probs = [0.2, 0.3, 0.5]
    squared = [p * p for p in probs]
    target = [q / sum(squared) for q in squared]
    counts = draw(logits_of(probs), make_row(seed=5, temperature=0.5), 4000)
    for token, p in enumerate(target):
        assert abs(counts[token] / 4000 - p) < 0.03


# -- top-k, top-p, min-p -----------------------------------------------------

PROBS = [0.05, 0.5, 0.15, 0.3]  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


@pytest.mark.parametrize(
    "settings, kept",
    [
        ({"top_k": 2}, {1, 3}),
        ({"top_k": 3}, {1, 2, 3}),
        ({"top_k": 4}, {0, 1, 2, 3}),
        ({"top_p": 0.4}, {1}),  # 0.5 alone reaches 0.4
        ({"top_p": 0.7}, {1, 3}),
        ({"top_p": 0.9}, {1, 2, 3}),
        ({"min_p": 0.2}, {1, 2, 3}),  # threshold 0.1 drops 0.05
        ({"min_p": 0.5}, {1, 3}),  # threshold 0.25
        ({"min_p": 0.7}, {1}),  # threshold 0.35
        ({"top_k": 3, "min_p": 0.5}, {1, 3}),
    ],
)
def test_filters_keep_exactly_the_expected_tokens(settings, kept):
    counts = draw(logits_of(PROBS), make_row(seed=11, **settings), 600)
    assert set(counts) == kept


def test_kept_tokens_keep_their_relative_weights():
    # top_k=2 leaves 0.5 : 0.3, that is 0.625 : 0.375.
    counts = draw(logits_of(PROBS), make_row(seed=4, top_k=2), 4000)
    assert abs(counts[1] / 4000 - 0.625) < 0.03


# -- penalties ---------------------------------------------------------------


def penalized(logits: list[float], **kwargs) -> list[float]:
    row = make_row(**kwargs)
    t = torch.tensor(logits)
    _apply_penalties(t, row)
    return t.tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = penalized([3.0, -1.0, 2.0, 0.5, -4.0], prompt=[0], output=[1, 1], repetition_penalty=2.0)
    # Tokens 0 (prompt) and 1 (output) are penalised; the others are untouched.
    assert out == [1.5, -2.0, 2.0, 0.5, -4.0]


def test_repetition_penalty_below_one_rewards_seen_tokens():
    out = penalized([3.0, -1.0, 2.0], prompt=[0, 1], repetition_penalty=0.5)
    assert out == [6.0, -0.5, 2.0]


def test_presence_and_frequency_penalties_use_output_counts_only():
    out = penalized(
        [1.0, 1.0, 1.0, 1.0],
        prompt=[3],
        output=[0, 0, 0, 1],
        presence_penalty=1.5,
        frequency_penalty=0.5,
    )
    # token 0: 1 - 1.5 - 3 * 0.5; token 1: 1 - 1.5 - 0.5; token 3 is only in the prompt.
    assert out == [-2.0, -1.0, 1.0, 1.0]


def test_negative_presence_penalty_encourages_seen_tokens():
    assert penalized([0.0, 0.0], output=[1], presence_penalty=-1.0) == [0.0, 1.0]


def test_neutral_penalties_leave_logits_unchanged():
    logits = [0.3, -2.0, 1.7]
    assert penalized(logits, prompt=[0, 1, 2], output=[0, 2, 2]) == torch.tensor(logits).tolist()


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0], [3.0, 2.5, 0.0], [3.0, 2.5, 0.0]])
    rows = [
        make_row(temperature=0.0, prompt=[0], repetition_penalty=2.0),
        make_row(temperature=0.0, output=[0], frequency_penalty=1.0),
        make_row(temperature=0.0, output=[0]),  # no penalty: stays on token 0
    ]
    assert [t.token_id for t in sample(logits, rows)] == [1, 1, 0]


# -- logit_bias --------------------------------------------------------------


def test_logit_bias_is_added_to_the_logits_before_sampling():
    logits = torch.tensor([[3.0, 2.5, 0.0], [3.0, 2.5, 0.0], [3.0, 2.5, 0.0]])
    rows = [
        make_row(temperature=0.0, logit_bias={0: -1.0}),  # 2.0 < 2.5: token 1
        make_row(temperature=0.0, logit_bias={0: -0.4}),  # 2.6 > 2.5: still token 0
        make_row(temperature=0.0, logit_bias={2: 3.1, 1: -100}),  # 3.1 > 3.0: token 2
    ]
    assert [t.token_id for t in sample(logits, rows)] == [1, 0, 2]


def test_logit_bias_shifts_the_sampled_distribution():
    # Equal logits; +ln(3) on token 1 makes it three times as likely as token 0.
    logits = torch.zeros(1, 2)
    counts = draw(logits, make_row(seed=4, logit_bias={1: math.log(3.0)}), 4000)
    assert counts[1] / 4000 == pytest.approx(0.75, abs=0.03)
    # -100 bans: tokens 0 and 1 hold most of the mass, and never come.
    logits = torch.tensor([[5.0, 5.0, 0.0, 0.0, 0.0]])
    banned = draw(logits, make_row(seed=5, logit_bias={0: -100, 1: -100}), 300)
    assert set(banned) == {2, 3, 4}


def test_logit_bias_comes_before_the_penalties_and_not_into_the_logprobs():
    # vLLM's order: bias first, so a repetition penalty divides the biased logit.
    logits = torch.tensor([[2.0, 3.0, 0.0]])
    row = make_row(temperature=0.0, prompt=[0], logit_bias={0: 2.5}, repetition_penalty=2.0,
                   logprobs=1)  # fmt: skip
    (t,) = sample(logits, [row])
    assert t.token_id == 1  # (2 + 2.5) / 2 = 2.25 < 3; penalty first: 2 / 2 + 2.5 = 3.5 > 3
    raw = torch.log_softmax(logits[0], dim=-1)
    assert t.logprob == pytest.approx(float(raw[1]))  # the model's own distribution


def test_logit_bias_does_not_reach_other_rows():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    rows = [make_row(temperature=0.0, logit_bias={1: 5.0}), make_row(temperature=0.0)]
    assert [t.token_id for t in sample(logits, rows)] == [1, 0]


# -- min_tokens --------------------------------------------------------------


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])  # stop tokens 2 and 3 are the likeliest

    def greedy(n_out: int) -> int:
        row = make_row(temperature=0.0, output=[0] * n_out, stop={2, 3}, min_tokens=3)
        return sample(logits, [row])[0].token_id

    assert [greedy(n) for n in range(5)] == [1, 1, 1, 2, 2]


def test_min_tokens_masks_stop_ids_when_sampling():
    logits = torch.tensor([[0.0, 0.0, 8.0]])  # token 2 holds ~99.9 % of the mass
    row = make_row(seed=0, output=[1], stop={2}, min_tokens=2)
    counts = draw(logits, row, 300)
    assert 2 not in counts
    assert set(counts) == {0, 1}


def test_min_tokens_without_stop_ids_masks_nothing():
    logits = torch.tensor([[0.0, 1.0, 5.0]])
    row = make_row(temperature=0.0, min_tokens=3)
    assert sample(logits, [row])[0].token_id == 2


def test_stop_ids_past_the_vocabulary_do_not_break_the_batch():
    logits = torch.tensor([[0.0, 1.0, 5.0], [3.0, 0.0, 0.0]])
    rows = [
        make_row(temperature=0.0, stop={2, 100_000}, min_tokens=1),
        make_row(temperature=0.0, stop={100_000}, min_tokens=1),
    ]
    assert [t.token_id for t in sample(logits, rows)] == [1, 0]


# -- logprobs ----------------------------------------------------------------


def test_no_logprobs_unless_asked():
    logits = random_logits(2, 10)
    out = sample(logits, [make_row(temperature=0.0), make_row(temperature=0.0, logprobs=2)])
    assert out[0].logprob is None and out[0].top_logprobs is None
    assert out[1].logprob is not None


def test_top_logprobs_are_log_softmax_of_the_raw_logits():
    logits = random_logits(3, 40, seed=9)
    raw = torch.log_softmax(logits, dim=-1)
    rows = [
        make_row(seed=1, logprobs=5, temperature=0.7, repetition_penalty=1.8, prompt=[0, 1]),
        make_row(seed=2, logprobs=3, top_k=5, presence_penalty=2.0, output=[3, 4]),
        make_row(seed=3, logprobs=1, temperature=0.0),
    ]
    for i, (row, t) in enumerate(zip(rows, sample(logits, rows), strict=True)):
        n = row.params.logprobs
        values, ids = torch.topk(raw[i], n)
        for rank, (tid, value) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), 1):
            assert t.top_logprobs[tid].logprob == pytest.approx(value, abs=1e-6)
            assert t.top_logprobs[tid].rank == rank
        assert t.logprob == pytest.approx(float(raw[i, t.token_id]), abs=1e-6)
        assert t.top_logprobs[t.token_id].logprob == t.logprob
        assert set(t.top_logprobs) == set(ids.tolist()) | {t.token_id}


def test_sampled_token_outside_the_top_n_gets_its_own_rank():
    # Raw ranks: 0, 1, 2, 3. The penalty makes greedy pick token 2, raw rank 3.
    logits = torch.tensor([[4.0, 3.0, 2.5, 1.0]])  # penalised: 2.0, 1.0, 2.5, 1.0
    row = make_row(temperature=0.0, output=[0, 1], presence_penalty=2.0, logprobs=1)
    (t,) = sample(logits, [row])
    assert t.token_id == 2
    raw = torch.log_softmax(logits[0], dim=-1)
    assert set(t.top_logprobs) == {0, 2}
    assert t.top_logprobs[0].rank == 1
    assert t.top_logprobs[2].rank == 3
    assert t.logprob == pytest.approx(float(raw[2]))
    assert math.exp(t.logprob) == pytest.approx(
        math.exp(2.5) / sum(math.exp(x) for x in (4.0, 3.0, 2.5, 1.0))
    )


def test_logprobs_zero_returns_only_the_sampled_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    (t,) = sample(logits, [make_row(temperature=0.0, logprobs=0)])
    assert t.token_id == 1
    assert list(t.top_logprobs) == [1]
    assert t.top_logprobs[1].rank == 1


# -- the batched draw --------------------------------------------------------


def _top_p_reference(probs: torch.Tensor, top_p: float) -> set[int]:
    values, order = probs.sort(descending=True)
    return set(order[~(values.cumsum(0) - values >= top_p)].tolist())


@pytest.mark.parametrize(
    "spread, top_p, tier", [(8.0, 0.9, 0), (0.1, 0.3, 1), (0.1, 0.9, 2), (3.0, 0.999, 2)]
)
def test_top_p_keeps_the_set_a_full_sort_keeps(spread, top_p, tier, monkeypatch):
    """A peaked row (the first candidates hold top_p), a flatter one (the
    second tier does) and flat ones (neither: the full sort), on a
    vocabulary past every candidate count."""
    vocab = 2 * sampler._TOP_P_CANDIDATES[-1]
    calls = []
    for name in ("topk", "sort"):
        real = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda *a, r=real, n=name, **k: calls.append(n) or r(*a, **k)
        )
    g = torch.Generator().manual_seed(int(spread * 10))
    probs = torch.softmax(torch.randn(vocab, generator=g) * spread, dim=-1)
    kept = probs.clone()
    sampler._keep_top_p(kept, top_p)
    assert calls == ["topk", "topk", "sort"][: tier + 1]
    monkeypatch.undo()
    expected = _top_p_reference(probs, top_p)
    assert set(kept.nonzero().flatten().tolist()) == expected
    index = sorted(expected)
    assert torch.equal(kept[index], probs[index])  # the kept keep their mass


def test_a_uniform_at_the_top_of_its_range_draws_the_last_token_with_mass(monkeypatch):
    """Rounding can put the target on a row's total; the draw is then the
    last token with any mass, never one past the vocabulary or a zeroed one."""
    probs = torch.tensor([[0.25, 0.5, 0.25, 0.0, 0.0]])
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **k: torch.tensor(1.0))
    assert sampler._inverse_cdf(probs, [make_row()]) == [2]


def test_rows_of_a_batch_each_follow_their_own_settings():
    """Many rows at once, each with its own temperature and filter: every
    draw lands in its own row's kept set."""
    logits = random_logits(6, 300, seed=9)
    settings = [{"top_k": 3}, {"top_p": 0.2}, {"min_p": 0.5}, {"temperature": 0.3, "top_k": 5},
                {"top_k": 2, "top_p": 0.99}, {"temperature": 2.0, "top_k": 4}]  # fmt: skip
    rows = [make_row(seed=i, **s) for i, s in enumerate(settings)]
    allowed = []
    for r, s in enumerate(settings):
        x = logits[r] / s.get("temperature", 1.0)
        p = torch.softmax(x, -1)
        order = p.argsort(descending=True).tolist()
        k = s.get("top_k", len(order))
        keep = set(order[:k])
        if "top_p" in s:
            keep &= _top_p_reference(torch.softmax(x.masked_fill(
                ~torch.isin(torch.arange(300), torch.tensor(order[:k])), float("-inf")), -1),
                s["top_p"])  # fmt: skip
        if "min_p" in s:
            keep = {t for t in keep if p[t] >= s["min_p"] * p.max()}
        allowed.append(keep)
    for _ in range(50):
        for r, t in enumerate(sample(logits, rows)):
            assert t.token_id in allowed[r]
