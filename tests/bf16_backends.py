"""A bfloat16 LLM through one attention backend with its C++ op calls
counted, and the greedy agreement of two generations, shared by the decode
and prompt kernel tests (test_cpu_kernel_bf16.py, test_cpu_prompt_bf16.py)."""

from pathlib import Path

from engine import LLM
from engine.attention.backends import BACKEND_ENV

# Logits of magnitude 2-8 in bfloat16 are 0.016-0.06 apart.
NEAR_TIE, LOGPROB_ATOL = 0.1, 0.1


class CountingOps:
    """The CPU backend's op namespace, counting the calls of each op by name."""

    def __init__(self, ops, counts: dict[str, int]) -> None:
        self._ops, self._counts = ops, counts

    def __getattr__(self, name: str):
        op = getattr(self._ops, name)

        def call(*args, **kwargs):
            self._counts[name] = self._counts.get(name, 0) + 1
            return op(*args, **kwargs)

        return call


def counted_llm(folder: Path, backend: str, monkeypatch, **kwargs) -> tuple[LLM, dict[str, int]]:
    """A bfloat16 LLM of the tiny model in `folder` through `backend` (block
    size 4; `kwargs` add to or replace the engine settings), and the counts
    of its C++ op calls (empty for the torch backend)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    settings = {"skip_tokenizer_init": True, "dtype": "bfloat16", "block_size": 4, **kwargs}
    llm = LLM(model=str(folder), **settings)
    counts: dict[str, int] = {}
    for layer in llm.engine.model.attention_layers():
        assert layer.backend.name == backend
        if backend == "cpu":
            layer.backend.ops = CountingOps(layer.backend.ops, counts)
    return llm, counts


def agreeing_steps(got, want) -> int:
    """Greedy tokens equal, with close log-probabilities, up to the first
    step whose top two tokens the reference has within bfloat16's rounding
    of each other (from there a flip is rounding, not a bug, and the
    continuations differ); returns how many steps were compared."""
    for step, (token, ref_token) in enumerate(zip(got.token_ids, want.token_ids, strict=True)):
        lp, ref_lp = got.logprobs[step], want.logprobs[step]
        top2 = sorted((v.logprob for v in ref_lp.values()), reverse=True)[:2]
        if top2[0] - top2[1] < NEAR_TIE:
            return step
        assert token == ref_token, f"step {step}: {token} != {ref_token}, gap {top2}"
        assert abs(lp[token].logprob - ref_lp[token].logprob) < LOGPROB_ATOL, f"step {step}"
    return len(got.token_ids)
