"""Incremental detokenization and stop-string handling for one sequence."""

from engine.loading.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the first output token, so that tokenizers
# which drop a leading space at the start of a decode still give it back.
_PROMPT_CONTEXT = 4
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Emits text as tokens arrive, never splitting a multi-byte character.

    It decodes a short window of tokens twice, with and without the newest
    ones, and emits the difference once it no longer ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Append a token; returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = full[len(prefix) :]
        # Keep only the window still needed, so memory stays bounded.
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last `new_len` characters.

    Returns (index where it starts, the stop string), or None.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
