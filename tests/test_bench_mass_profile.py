"""bench.mass_profile: each (layer, head)'s need, whose max is the engine's
kv_target_mass choice, and the summary of where the budget comes from."""

import pytest
import torch

from bench.accuracy.common import Item
from bench.mass_profile import Choice, head_needs, summarize
from kv_manager.policies import KVPolicySettings, keys_for_mass, make_policy


def _state(L: int, H: int, S: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(length, generator=g)[:S] for _ in range(L * H)])
    return torch.rand(L, H, S, generator=g) ** 4 * 3, positions.view(L, H, S)


def test_the_largest_need_is_the_engines_choice():
    L, H, S, length = 3, 2, 40, 64
    for seed, target in [(1, 0.5), (2, 0.9), (3, 0.95)]:
        policy = make_policy(KVPolicySettings(kv_policy="h2o", kv_target_mass=target))
        scores, positions = _state(L, H, S, length, seed)
        needs = head_needs(policy, scores, positions, length, target, steps=S)  # every k
        assert needs.shape == (L, H)
        assert int(needs.max()) == keys_for_mass(policy, scores, positions, length, target)
        # Each head's need is the fewest keys that hold its target: one fewer does not.
        for layer in range(L):
            for head in range(H):
                k = int(needs[layer, head])
                one = policy.select_victims(
                    scores[layer : layer + 1, head : head + 1],
                    positions[layer : layer + 1, head : head + 1],
                    k - 1,
                    length,
                )
                weights = scores[layer, head].double()
                kept = weights.sum() - weights[one.view(-1)].sum()
                assert k == 1 or kept < target * weights.sum()


def test_a_coarse_grid_rounds_each_need_up_to_a_step():
    policy = make_policy(KVPolicySettings(kv_policy="h2o", kv_target_mass=0.9))
    scores, positions = _state(2, 2, 40, 64, 5)
    exact = head_needs(policy, scores, positions, 64, 0.9, steps=40)
    coarse = head_needs(policy, scores, positions, 64, 0.9, steps=4)  # k in 10, 20, 30, 40
    assert bool((coarse >= exact).all()) and bool((coarse - exact < 10).all())
    assert set(coarse.flatten().tolist()) <= {10, 20, 30, 40}


def test_the_summary_says_which_layer_sets_the_budget():
    items = [Item("retrieval", "4k", f"d{i}", "p", 1) for i in range(2)]
    needs = torch.tensor([[80, 60], [30, 20], [40, 10]])  # layer 0 needs the most
    choices = [Choice(100, 80, needs), Choice(200, 160, needs * 2)]
    s = summarize(items, choices, skip=1)["4k"]
    assert s["items"] == 2 and s["mean_slots"] == 150
    assert s["chosen_share"] == 0.8 and s["share_without_skipped"] == 0.4
    assert s["layer_share"] == [0.8, 0.3, 0.4]


def test_a_run_on_the_default_model_reports_every_layer(tmp_path):
    pytest.importorskip("gensim")  # the passkey's text
    from bench.mass_profile import main

    summary = main(
        ["--policy", "snapkv", "--target", "0.9", "--lengths", "512", "--depths", "50"]
        + ["--dtype", "float32", "--steps", "20", "--out", str(tmp_path)]
    )
    s = summary["512"]
    assert s["items"] == 1 and 450 < s["mean_slots"] < 600  # about 512 tokens
    assert len(s["layer_share"]) == 30  # SmolLM2-135M
    # The engine's choice is the largest layer's need (to the grid's step).
    assert abs(s["chosen_share"] - max(s["layer_share"])) <= 1 / 20 + 1e-9
    assert 0 < s["share_without_skipped"] <= s["chosen_share"] <= 1
    report = (tmp_path / "mass_profile.md").read_text()
    assert "| 512 | 1 |" in report and "L29" in report
