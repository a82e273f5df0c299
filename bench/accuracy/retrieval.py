"""Long-context retrieval: a pass key hidden at a depth of real text (Lee
articles concatenated), asked for at the end; exact match of the key."""

import random
import re
from collections.abc import Sequence

from bench.accuracy.common import Item, Score, Tokenizer, chat_prompt, cut_to_tokens, sentences
from bench.data import load_articles

TASK = "retrieval"
METRICS = ("accuracy",)
NEEDLE = "The pass key is {key}. Remember it."
QUESTION = (
    "A pass key is hidden in the following text. Find it and remember it.\n\n"
    "{text}\n\nWhat is the pass key? Answer with the number only."
)
MAX_TOKENS = 16


def _haystack_sentences(start: int) -> list[str]:
    """Every corpus sentence, starting at article `start` and wrapping round."""
    articles = load_articles()
    order = articles[start % len(articles) :] + articles[: start % len(articles)]
    return [s for a in order for s in sentences(a)]


def _prompt(tok: Tokenizer, text: str) -> str:
    return chat_prompt(tok, QUESTION.format(text=text), "\n\nThe pass key is")


def make_item(tok: Tokenizer, length: int, depth: int, index: int) -> Item:
    """A prompt of about `length` tokens with the key at `depth` percent."""
    key = str(random.Random(f"{length}-{depth}-{index}").randint(10000, 99999))
    needle = NEEDLE.format(key=key)
    overhead = len(tok.encode(_prompt(tok, needle)))
    kept = cut_to_tokens(tok, _haystack_sentences(index * 37), length - overhead)
    at = round(len(kept) * depth / 100)
    text = " ".join(kept[:at] + [needle] + kept[at:])
    subtask = f"{length // 1024}k" if length % 1024 == 0 else str(length)
    item_id = f"d{depth}-{index}"
    return Item(TASK, subtask, item_id, _prompt(tok, text), MAX_TOKENS, key, {"depth": depth})


def items(tok: Tokenizer, lengths: Sequence[int], depths: Sequence[int], limit: int) -> list[Item]:
    return [make_item(tok, n, d, i) for n in lengths for d in depths for i in range(limit)]


def found(key: str, text: str) -> bool:
    return re.search(rf"(?<!\d){key}(?!\d)", text) is not None


def prediction(item: Item, text: str) -> str:
    """The answer read from a generation: the key when it appears (so that
    prediction == gold exactly when `score` counts the item right), else the
    first number written ("" when there is none). Two generations agree when
    their predictions are equal; two that name no number agree on "none"."""
    if found(item.gold, text):
        return item.gold
    first = re.search(r"\d+", text)
    return first.group(0) if first else ""


def score(
    items_: Sequence[Item],
    outputs: dict[str, str],
    reference: dict[str, str],
    policy: str,
    budget: float,
) -> list[Score]:
    """Exact match of the key, overall and per depth (metric `accuracy@d<depth>`)."""
    rows = []
    for item in items_:
        v = float(found(item.gold, outputs[item.key]))
        for m in ("accuracy", f"accuracy@d{item.meta['depth']}"):
            rows.append(Score(policy, budget, item.task, item.subtask, item.item_id, m, v))
    return rows
