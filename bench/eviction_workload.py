"""Prompts for the eviction benchmark, from real news text (bench/data.py).

- Summaries (figures 1 and 2): consecutive articles of the gensim Lee corpus,
  asked through the model's chat template to be summarized. Prompt lengths
  are spread evenly over [min_tokens, max_tokens]; the last article is cut at
  a word boundary so a prompt lands within a few tokens of its target. No
  article appears in two prompts.
- Capacity (figure 3): raw passages of exactly N tokens (bench.data).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.data import load_articles, token_passages

INSTRUCTION = "Summarize the following news articles in a few sentences."
ARTICLE_SEPARATOR = "\n\n"


@dataclass
class Prompt:
    token_ids: list[int]
    articles: list[int]  # corpus line numbers (empty lines dropped) of the articles used
    seed: int  # the request seed (keys Keyformer's noise)

    def describe(self) -> dict[str, Any]:
        return {"tokens": len(self.token_ids), "articles": self.articles, "seed": self.seed}


def spread_targets(count: int, min_tokens: int, max_tokens: int) -> list[int]:
    """`count` lengths evenly inside [min_tokens, max_tokens] (bin midpoints)."""
    step = (max_tokens - min_tokens) / count
    return [round(min_tokens + step * (i + 0.5)) for i in range(count)]


def summary_prompts(
    tokenizer: Any, count: int, min_tokens: int, max_tokens: int, base_seed: int
) -> list[Prompt]:
    """`count` chat prompts asking for a summary of consecutive news articles."""
    articles = load_articles()
    encode = _chat_encoder(tokenizer)
    prompts, start = [], 0
    for i, target in enumerate(spread_targets(count, min_tokens, max_tokens)):
        ids, used = _summary_prompt(articles, start, target, encode)
        prompts.append(Prompt(ids, used, base_seed + i))
        start = used[-1] + 1
    return prompts


def capacity_prompts(tokenizer: Any, count: int, tokens: int, base_seed: int) -> list[Prompt]:
    """`count` raw passages of exactly `tokens` tokens (bench.data.token_passages)."""
    passages = token_passages(tokenizer.encode, count, tokens)
    return [Prompt(p, [], base_seed + i) for i, p in enumerate(passages)]


def _chat_encoder(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    def encode(texts: list[str]) -> list[int]:
        body = INSTRUCTION + ARTICLE_SEPARATOR + ARTICLE_SEPARATOR.join(texts)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": body}])
        return tokenizer.encode(chat)

    return encode


def _summary_prompt(
    articles: list[str], start: int, target: int, encode: Callable[[list[str]], list[int]]
) -> tuple[list[int], list[int]]:
    """Articles from `start` until the prompt reaches `target` tokens, the last
    one cut at the longest word prefix that keeps the prompt within target."""
    texts: list[str] = []
    for index in range(start, len(articles)):
        ids = encode([*texts, articles[index]])
        if len(ids) <= target:
            texts.append(articles[index])
            if len(ids) == target:
                return ids, list(range(start, index + 1))
            continue
        cut = _cut_article(texts, articles[index], target, encode)
        return encode([*texts, cut]), list(range(start, index + 1))
    raise ValueError(f"the corpus ran out before a prompt of {target} tokens")


def _cut_article(
    texts: list[str], article: str, target: int, encode: Callable[[list[str]], list[int]]
) -> str:
    """The longest word prefix of `article` that keeps the prompt <= target tokens."""
    words = article.split()
    lo, hi = 0, len(words)  # invariant: words[:lo] fits, words[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode([*texts, " ".join(words[:mid])])) <= target:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])
