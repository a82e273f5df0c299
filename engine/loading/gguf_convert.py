"""Convert a GGUF file (Llama architecture) to a cached Hugging Face folder.

The `gguf` package reads and dequantizes the tensors; we rename them to the
Hugging Face layout, undo llama.cpp's reordering of the q/k rows, and write
config.json, model.safetensors and the tokenizer (with its chat template).
The conversion runs once per file content: the cache is keyed by the file's
SHA-256, so the same GGUF installed in several virtualenvs (or copied,
linked, renamed) shares one converted folder.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def cache_root() -> Path:
    root = os.environ.get("KEYSERVE_CACHE_DIR") or Path.home() / ".cache" / "keyserve"
    return Path(root)


def convert_cached(gguf_path: Path) -> Path:
    """The converted folder for `gguf_path`'s content, converting on first use."""
    gguf_path = gguf_path.resolve()
    key = content_key(gguf_path)
    root = cache_root() / "gguf"
    found = _converted(root, key)
    if found is not None:
        return found
    # The file's name is only there for whoever lists the cache; lookups go
    # by the key alone, so a copy under another name finds this folder too.
    out = root / f"{gguf_path.stem}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves half a folder
    # that later loads would trust.
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        convert(gguf_path, tmp)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def content_key(gguf_path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256.

    Not its path, size or mtime: pip writes a package's files with the
    install time as mtime, so each virtualenv holds the same model under a
    new path and a new mtime. A header hash alone would let two fine-tunes
    with equal metadata share a folder. Hashing reads the whole file once
    per load (about 0.1 s for the embedded model's 98 MB, far less than
    loading its converted weights).
    """
    digest = hashlib.sha256()
    with gguf_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _converted(root: Path, key: str) -> Path | None:
    # Sorted, so that if two differently named copies were converted at the
    # same time every later load picks the same one of the two.
    for folder in sorted(root.glob(f"*-{key}")):
        if (folder / "config.json").is_file():
            return folder
    return None


def convert(gguf_path: Path, out: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    config = _llama_config(meta, reader)
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        tensors[name] = w.float().contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(gguf_path, out)


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(
            ("tokens", "scores", "merges", "token_type")
        ):
            continue  # large arrays; the tokenizer is rebuilt by transformers
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 (fields of unknown types are not needed)
            continue
    return meta


def _llama_config(meta: dict, reader) -> dict:
    a = "llama."
    heads = int(meta[a + "attention.head_count"])
    names = {t.name for t in reader.tensors}
    vocab = meta.get(a + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": int(meta[a + "embedding_length"]),
        "intermediate_size": int(meta[a + "feed_forward_length"]),
        "num_hidden_layers": int(meta[a + "block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(a + "attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta.get(a + "context_length", 4096)),
        "rms_norm_eps": float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, layer, kind, suffix = name.split(".")  # blk.N.kind.weight
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores each head's rotary rows interleaved (pairs), where the
    # Hugging Face layout keeps the two halves apart; swap back.
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
