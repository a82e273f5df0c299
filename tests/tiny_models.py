"""Tiny random transformers models of each family, saved as safetensors folders.

transformers is only the oracle here: it builds and saves the checkpoint, and
its `generate` gives the tokens our engine must reproduce.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VOCAB = 256
MAX_POSITIONS = 256
# Large random weights spread the logits, so greedy argmax is never a near-tie
# that float rounding could flip.
INIT_STD = 0.15


def _llama(**extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        tie_word_embeddings=True,
        **extra,
    )


def _llama_head_64() -> Any:
    # SmolLM2's head size: the C++ prompt attention (head size 64 or 128 only)
    # runs in the parity tests too, not only on the real model.
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )


def _llama3_rope() -> Any:
    # A short original context, so the scaled band covers the wavelengths the
    # test's positions (under 64) actually reach.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return _llama(rope_parameters=rope)


def _linear_rope() -> Any:
    return _llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def _mistral() -> Any:
    from transformers import MistralConfig

    # A window shorter than the prompts, so it masks keys during prefill and decode.
    return MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    # GPT-2's own special token id (50256) is outside the tiny vocabulary.
    return GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, bos_token_id=1, eos_token_id=2
    )


def _bloom() -> Any:
    from transformers import BloomConfig

    # Six heads: a count that is not a power of two takes ALiBi's interleaved slopes.
    return BloomConfig(hidden_size=96, n_layer=2, n_head=6)


def _gpt_neox(parallel_residual: bool) -> Callable[[], Any]:
    def config() -> Any:
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.25,  # rotates 4 of each head's 16 dims
            use_parallel_residual=parallel_residual,
        )

    return config


FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "llama-head-64": _llama_head_64,
    "llama-llama3-rope": _llama3_rope,
    "llama-linear-rope": _linear_rope,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gpt2": _gpt2,
    "bloom": _bloom,
    "gpt-neox": _gpt_neox(True),
    "gpt-neox-serial": _gpt_neox(False),
}


def build_tiny_model(family: str, folder: Path, seed: int = 0, config: Any = None) -> Path:
    """Save a tiny random float32 model of `family` (or of `config`, whose
    context length is then kept) to `folder`; returns `folder`."""
    from transformers import AutoModelForCausalLM

    if config is None:
        config = FAMILIES[family]()
        if hasattr(config, "max_position_embeddings"):
            config.max_position_embeddings = MAX_POSITIONS
    config.vocab_size = VOCAB
    config.initializer_range = INIT_STD
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        # Biases start at zero and norm weights at one; jitter every parameter
        # so biases, norm scales and the rest all matter to the output.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_reference(folder: Path) -> Any:
    """The transformers model saved in `folder`, eager attention, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    # Generation must run its full length: no EOS stop, no EOS suppression.
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.no_grad()
def reference_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (batch of one, no padding)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()
