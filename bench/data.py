"""Real English text for benchmark prompts, from a PyPI package (never a model hub).

The source is gensim's Lee corpus, `gensim/test/test_data/lee_background.cor`:
300 Australian news articles, one per line, shipped inside the gensim wheel
(`pip install -e '.[bench]'`). It is read from disk, so it works offline.
"""

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

CORPUS_PACKAGE = "gensim"
CORPUS_FILE = Path("test") / "test_data" / "lee_background.cor"
ARTICLE_SEPARATOR = "\n\n"

Encode = Callable[[str], list[int]]


def corpus_path() -> Path:
    """The Lee corpus file, found without importing gensim (which pulls scipy)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the benchmark text needs gensim: pip install -e '.[bench]' (or pip install gensim)"
        )
    path = Path(spec.submodule_search_locations[0]) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{CORPUS_FILE} not found in the gensim package at {path.parent}")
    return path


def load_articles() -> list[str]:
    """The corpus's articles in file order, stripped, empty lines dropped."""
    lines = corpus_path().read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _passage_from(
    articles: Sequence[str], start: int, encode: Encode, num_tokens: int
) -> tuple[list[int], int] | None:
    """Token ids of articles[start:] joined, cut to num_tokens, and the index of
    the first article not used; None when the corpus runs out first."""
    for end in range(start + 1, len(articles) + 1):
        ids = encode(ARTICLE_SEPARATOR.join(articles[start:end]))
        if len(ids) >= num_tokens:
            return ids[:num_tokens], end
    return None


def token_passages(encode: Encode, count: int, num_tokens: int) -> list[list[int]]:
    """`count` distinct passages of exactly `num_tokens` token ids.

    Each passage starts at an article boundary and joins consecutive articles
    until it is long enough, then is cut; no article appears in two passages.
    """
    articles = load_articles()
    passages: list[list[int]] = []
    start = 0
    while len(passages) < count:
        found = _passage_from(articles, start, encode, num_tokens)
        if found is None:
            raise ValueError(
                f"the corpus holds only {len(passages)} passages of {num_tokens} tokens, "
                f"{count} were asked for"
            )
        ids, start = found
        passages.append(ids)
    return passages
