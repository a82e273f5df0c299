"""What the task modules share: an item to generate for, a score row, the chat prompt."""

import re
from dataclasses import dataclass, field
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> str: ...


@dataclass
class Item:
    """One prompt of one task; `gold` is the expected answer ("" when scored
    against the full-cache output instead)."""

    task: str
    subtask: str
    item_id: str
    prompt: str
    max_tokens: int
    gold: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.subtask}/{self.item_id}"


@dataclass
class Score:
    """One metric of one item under one (policy, budget)."""

    policy: str
    budget: float
    task: str
    subtask: str
    item_id: str
    metric: str
    value: float


def chat_prompt(tok: Tokenizer, user: str, fallback_suffix: str) -> str:
    """The model's chat template around `user`; models without one get the
    plain text followed by `fallback_suffix` (e.g. "\\n\\nSummary:")."""
    try:
        return tok.apply_chat_template([{"role": "user", "content": user}])
    except (ValueError, AttributeError):
        return user + fallback_suffix


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def cut_to_tokens(tok: Tokenizer, parts: list[str], num_tokens: int) -> list[str]:
    """The longest prefix of `parts` (sentences, joined by spaces) whose token
    count stays within `num_tokens` (counted per part, so approximate by a few)."""
    kept, total = [], 0
    for part in parts:
        n = len(tok.encode(" " + part))
        if total + n > num_tokens:
            break
        kept.append(part)
        total += n
    return kept
