"""The attention-mass benchmark (bench/eviction.py, figure 1: the accuracy
issue's fourth task) end to end on the embedded SmolLM2, in its quick
preset: 2 short Lee prompts, budgets 20% and 50%, 8 new tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gensim")

ROOT = Path(__file__).parents[1]
POLICIES = ["window", "streaming", "h2o", "keyformer"]
BUDGETS = [0.2, 0.5]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eviction")
    # A process of its own: the benchmark sets torch's thread count.
    command = [sys.executable, "-m", "bench.eviction", "--quick", "--figures", "1"]
    command += ["--out-dir", str(out), "--name", "mass"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads((out / "mass.json").read_text())


def _mass(cells: list[dict], policy: str, ratio: float) -> float:
    (cell,) = [c for c in cells if c["policy"] == policy and c["ratio"] == ratio]
    return cell["mean"]


def test_every_policy_and_budget_has_a_mass_per_layer(report):
    out, data = report
    mass = data["attention_mass"]
    cells = mass["cells"] + mass["oracle"]
    assert {(c["policy"], c["ratio"]) for c in cells} == {
        (p, b) for p in [*POLICIES, "oracle"] for b in BUDGETS
    }
    for cell in cells:
        assert len(cell["per_layer"]) == 30  # SmolLM2-135M's layers
        assert all(0.0 < m <= 1.0 for m in cell["per_layer"])
        assert len(cell["per_prompt"]) == 2
    assert data["complete"] is True
    assert (out / "mass.png").stat().st_size > 0
    assert "| policy | budget 20% | budget 50% |" in (out / "mass.md").read_text()


def test_the_masses_order_as_the_policies_keep_tokens(report):
    """Measured: window 0.20 / 0.32, streaming 0.58 / 0.71, h2o and keyformer
    0.83 / 0.93 (20% / 50%). Without the sink tokens a window misses most of
    the mass; the heavy-hitter policies keep most of it."""
    cells = report[1]["attention_mass"]["cells"]
    for ratio in BUDGETS:
        window, streaming = _mass(cells, "window", ratio), _mass(cells, "streaming", ratio)
        assert window < streaming < _mass(cells, "h2o", ratio)
        assert streaming < _mass(cells, "keyformer", ratio)
    for policy in POLICIES:
        assert _mass(cells, policy, 0.2) < _mass(cells, policy, 0.5)
