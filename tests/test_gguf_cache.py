"""The GGUF conversion cache is keyed by the file's content, not its path.

A tiny Llama GGUF (random float32 weights, a byte-level BPE tokenizer, a chat
template) is written here with the `gguf` package and converted for real;
only the number of conversions is counted.
"""

import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from engine.loading import gguf_convert

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 1, 4, 2
SPECIAL = ["<s>", "</s>"]


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["Ġa"] + SPECIAL


def write_gguf(path: Path, seed: int) -> np.ndarray:
    """A one-layer Llama GGUF whose weights depend on `seed`; returns its embedding."""
    rng = np.random.default_rng(seed)
    tokens = _tokens()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL))
    w.add_token_merges(["Ġ a"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    embedding = rand(len(tokens), HIDDEN)
    kv = HIDDEN * KV_HEADS // HEADS
    w.add_tensor("token_embd.weight", embedding)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for kind, shape in {
        "attn_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (kv, HIDDEN),
        "attn_v": (kv, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }.items():
        w.add_tensor(f"blk.0.{kind}.weight", rand(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embedding


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """The GGUF paths each real conversion read, with the cache under tmp_path."""
    monkeypatch.setenv("KEYSERVE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = gguf_convert.convert

    def counted(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path)
        real(gguf_path, out)

    monkeypatch.setattr(gguf_convert, "convert", counted)
    return calls


def _embedding(folder: Path) -> np.ndarray:
    return load_file(folder / "model.safetensors")["model.embed_tokens.weight"].numpy()


def test_one_conversion_serves_every_path_to_the_same_content(tmp_path, conversions):
    # As two virtualenvs hold the same wheel's file: another folder, another
    # mtime (pip writes the install time), here also another name and a link.
    first = tmp_path / "venv1" / "model.gguf"
    first.parent.mkdir()
    embedding = write_gguf(first, seed=0)
    copy = tmp_path / "venv2" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    link = tmp_path / "link.gguf"
    os.link(first, link)

    folders = {gguf_convert.convert_cached(p) for p in (first, copy, link, first)}

    assert conversions == [first]
    (folder,) = folders
    assert folder.parent == tmp_path / "cache" / "gguf"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    np.testing.assert_array_equal(_embedding(folder), embedding)


def test_changed_content_converts_again(tmp_path, conversions):
    path = tmp_path / "model.gguf"
    write_gguf(path, seed=0)
    before = gguf_convert.convert_cached(path)
    stat = path.stat()

    # Same size and the old mtime put back: only the bytes tell it apart.
    embedding = write_gguf(path, seed=1)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    after = gguf_convert.convert_cached(path)

    assert conversions == [path, path]
    assert after != before
    np.testing.assert_array_equal(_embedding(after), embedding)
    # The first conversion is left in place: the cache removes nothing.
    assert (before / "config.json").is_file()
    assert gguf_convert.convert_cached(path) == after
    assert len(conversions) == 2
