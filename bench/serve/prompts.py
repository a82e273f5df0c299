"""Prompts as token ids: windows of exactly N tokens cut from the Lee news corpus.

The prompt goes to the server as a list of token ids, so every server (ours,
vLLM) prefills the same number of tokens whatever its own tokenizer does with
text. The tokenizer must be the served model's, or the ids mean other words.
"""

import functools
import random
from collections.abc import Callable
from pathlib import Path

from bench.data import ARTICLE_SEPARATOR, load_articles

Encode = Callable[[str], list[int]]


def default_tokenizer_dir() -> Path:
    """The embedded SmolLM2's converted folder (engine.loading.default_model)."""
    # NOTE: imported here: `engine` pulls torch, which a client pointed at a
    # remote server with --tokenizer never needs.
    from engine.loading.default_model import default_model_path

    return default_model_path()


def load_encoder(tokenizer_dir: str | Path | None = None) -> Encode:
    """text -> token ids without special tokens (a BOS would shift every window)."""
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(tokenizer_json))
        return lambda text: fast.encode(text, add_special_tokens=False).ids
    # Folders with only a slow tokenizer (sentencepiece, tiktoken files).
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(str(folder))
    return lambda text: slow.encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=4)
def corpus_token_ids(tokenizer_dir: str | None) -> tuple[int, ...]:
    """The whole corpus as one token stream (about 76k SmolLM2 tokens); cached
    because tests and A/B scripts call run_load many times in one process."""
    encode = load_encoder(tokenizer_dir)
    return tuple(encode(ARTICLE_SEPARATOR.join(load_articles())))


def prompt_windows(
    num: int, num_tokens: int, seed: int = 0, tokenizer_dir: str | Path | None = None
) -> list[list[int]]:
    """`num` windows of exactly `num_tokens` ids, each at a different start offset.

    The offsets are a seeded sample without replacement, so two runs with the
    same seed (against two servers) send the same prompts in the same order.
    """
    if num_tokens < 1:
        raise ValueError(f"prompt tokens must be positive, got {num_tokens}")
    ids = corpus_token_ids(None if tokenizer_dir is None else str(tokenizer_dir))
    starts = len(ids) - num_tokens + 1
    if starts < num:
        raise ValueError(
            f"the corpus ({len(ids)} tokens) has only {max(starts, 0)} windows "
            f"of {num_tokens} tokens, {num} were asked for"
        )
    offsets = random.Random(f"windows:{seed}").sample(range(starts), num)
    return [list(ids[o : o + num_tokens]) for o in offsets]
