"""The named model shapes, their random-weight folders, and the prompts.

Throughput depends on shapes, not weights: a folder is a Llama of the named
shape with seeded random weights, saved by transformers (nothing is
downloaded), plus SmolLM2's tokenizer files, so the vocabulary (49,152) and
the detokenizing work per token are SmolLM2's.
"""

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# SmolLM2's vocabulary and special tokens (its tokenizer's <|im_start|>, <|im_end|>).
VOCAB_SIZE = 49152
BOS_ID, EOS_ID = 1, 2
# Files of a tokenizer folder worth copying (those present are copied).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
# Prompt token ids are drawn from [PROMPT_LOW, PROMPT_HIGH), as the GPU check draws them.
PROMPT_LOW, PROMPT_HIGH = 100, 49000


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SHAPES: dict[str, Shape] = {
    # Llama-3.2-1B's shape (the GPU check's `big`).
    "llama-1b": Shape(2048, 8192, 16, 32, 8, 500000.0),
    # SmolLM2-135M's shape (the GPU check's `small`).
    "smollm2-135m": Shape(576, 1536, 30, 9, 3, 100000.0),
    # For the CPU smoke run.
    "tiny": Shape(64, 128, 2, 4, 2, 10000.0),
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keyserve" / "bench_gpu"


def tokenizer_source(folder: Path | None) -> Path:
    """Where SmolLM2's tokenizer files come from: `folder`, else the embedded
    default model's folder (engine.loading.default_model)."""
    if folder is not None:
        return folder
    from engine.loading.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; or pass --tokenizer DIR, a folder with SmolLM2's tokenizer.json"
        ) from e


def kv_bytes_per_token(shape: Shape, dtype: str) -> int:
    """K and V of one token over every layer."""
    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * width


def model_folder(
    name: str, dtype: str, device: str, cache_dir: Path, tokenizer: Path | None, seed: int = 0
) -> tuple[Path, bool]:
    """The folder of shape `name` in `dtype` (made now unless cached); and
    whether it was made now."""
    folder = cache_dir / f"{name}-{dtype}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder, False
    source = tokenizer_source(tokenizer)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _save_random_llama(SHAPES[name], dtype, device, seed, partial)
    copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"no tokenizer.json in {source}")
    for f in copied:
        shutil.copy(source / f, partial / f)
    partial.rename(folder)  # config.json appears with everything beside it
    return folder, True


def _save_random_llama(shape: Shape, dtype: str, device: str, seed: int, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        **asdict(shape),
    )
    torch.manual_seed(seed)
    # Made on the run's device: a 1B model's random init is seconds on a GPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def describe_shape(name: str) -> dict[str, Any]:
    shape = SHAPES[name]
    return {"name": name, **asdict(shape), "head_dim": shape.head_dim, "vocab_size": VOCAB_SIZE}


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids; the first k of a larger
    count are the k of a smaller one (one generator, drawn in order)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(PROMPT_LOW, PROMPT_HIGH, (length,), generator=g).tolist()
        for _ in range(count)
    ]
