"""Summarization: Lee news articles (and cut SOTU speeches), scored by ROUGE
against the same model's full-cache summary (no reference summaries ship)."""

from collections.abc import Sequence

from bench.accuracy.common import Item, Score, Tokenizer, chat_prompt, cut_to_tokens, sentences
from bench.data import load_articles

TASK = "summarization"
METRICS = ("rouge1", "rouge2", "rougeL")
INSTRUCTION = "Summarize the following {kind} in 3 sentences.\n\n{text}"


def _item(
    tok: Tokenizer, subtask: str, item_id: str, kind: str, text: str, max_tokens: int
) -> Item:
    prompt = chat_prompt(tok, INSTRUCTION.format(kind=kind, text=text), "\n\nSummary:")
    return Item(TASK, subtask, item_id, prompt, max_tokens, meta={"words": len(text.split())})


def lee_items(tok: Tokenizer, limit: int, max_tokens: int = 128) -> list[Item]:
    """The first `limit` Lee corpus articles, one prompt each."""
    articles = load_articles()[:limit]
    return [_item(tok, "lee", str(i), "article", a, max_tokens) for i, a in enumerate(articles)]


def sotu_items(
    tok: Tokenizer, speeches: Sequence[dict], limit: int, num_tokens: int, max_tokens: int = 128
) -> list[Item]:
    """The newest speeches long enough, each cut at a sentence end to about
    `num_tokens` tokens."""
    items: list[Item] = []
    for speech in sorted(speeches, key=lambda s: -int(s["year"])):
        parts = sentences(speech["text"])
        kept = cut_to_tokens(tok, parts, num_tokens)
        if len(kept) == len(parts):
            continue  # shorter than asked: not a long-context item
        item_id = f"{speech['year']}-{speech['name'].replace(' ', '_')}"
        items.append(_item(tok, "sotu", item_id, "speech", " ".join(kept), max_tokens))
        if len(items) >= limit:
            break
    return items


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise SystemExit("summarization needs rouge-score: pip install -e '.[bench]'") from e
    return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)


def score(
    items: Sequence[Item],
    outputs: dict[str, str],
    reference: dict[str, str],
    policy: str,
    budget: float,
) -> list[Score]:
    """ROUGE F1 of each summary against the full-cache one (both empty: 1.0)."""
    scorer = _scorer()
    rows = []
    for item in items:
        out, ref = outputs[item.key], reference[item.key]
        result = scorer.score(ref, out) if ref.strip() or out.strip() else None
        for m in METRICS:
            value = 1.0 if result is None else result[m].fmeasure
            rows.append(Score(policy, budget, item.task, item.subtask, item.item_id, m, value))
    return rows
