"""Incremental detokenization with the real SmolLM2 tokenizer, and stop strings."""

import pytest

from engine.loading.default_model import default_model_path
from engine.loading.tokenizer import load_tokenizer
from engine.runtime.detokenizer import IncrementalDetokenizer, find_stop

REPLACEMENT = "\ufffd"

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 3:45 pm, isn't it?\n  Yes!"
MULTI_BYTE = [
    "café naïve — Ünïcödé, façade, smörgåsbord",
    "日本語のテキストと中文文本",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 ✓",
    "한국어 ελληνικά русский",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def stream(tok, prompt: str, ids: list[int], skip_special_tokens: bool = True):
    """Feed `ids` one at a time; returns the detokenizer and the deltas."""
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), skip_special_tokens)
    return detok, [detok.add_token(i) for i in ids]


def test_english_text_streams_back_exactly(tok):
    ids = tok.encode(ENGLISH)
    detok, deltas = stream(tok, "Say:", ids)
    assert "".join(deltas) == tok.decode(ids) == ENGLISH
    assert detok.text == ENGLISH
    assert all(deltas)  # every English token completes text of its own


def test_first_output_token_keeps_its_leading_space(tok):
    ids = tok.encode(" world")
    _, deltas = stream(tok, "Hello", ids)
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == " world"


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_multi_byte_text_streams_back_exactly_without_replacement_chars(tok, text):
    ids = tok.encode(text)
    # The case worth testing: some single tokens hold part of a character only.
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    detok, deltas = stream(tok, "Translate:", ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.text == text
    for delta in deltas:
        assert REPLACEMENT not in delta
    # A token that ends inside a character emits nothing until the character is whole.
    assert "" in deltas


def test_emoji_is_emitted_whole_once_its_last_byte_arrives(tok):
    ids = tok.encode(" 👍")
    assert len(ids) > 1
    _, deltas = stream(tok, "Thumbs:", ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == " 👍"


def test_prompt_ending_in_multi_byte_text_does_not_leak_into_the_output(tok):
    prompt = "日本語"
    ids = tok.encode("のテキスト")
    _, deltas = stream(tok, prompt, ids)
    assert "".join(deltas) == "のテキスト"


def test_character_split_between_prompt_and_output_leaks_no_replacement_char(tok):
    # Token-id prompts may end inside a character; the output's first tokens
    # finish it. Decoding them after the prompt's tail keeps the bytes together.
    ids = tok.encode("Thumbs: 👍 ok then")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT))
    assert tok.decode(ids[cut:]).startswith(REPLACEMENT)  # decoded alone, it would leak
    detok = IncrementalDetokenizer(tok, ids[:cut], True)
    deltas = [detok.add_token(i) for i in ids[cut:]]
    assert all(REPLACEMENT not in d for d in deltas)
    assert detok.text.endswith(" ok then")


def test_long_stream_matches_a_full_decode(tok):
    text = " ".join([ENGLISH, *MULTI_BYTE] * 5)
    ids = tok.encode(text)
    detok, deltas = stream(tok, "", ids)
    assert "".join(deltas) == tok.decode(ids)
    assert all(REPLACEMENT not in d for d in deltas)
    # The decode window stays short however long the stream.
    assert len(detok._ids) < 16


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept(tok, skip):
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Hello there") + [im_end] + tok.encode(" again")
    detok, deltas = stream(tok, "Hi", ids, skip_special_tokens=skip)
    assert detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detok.text) is not skip
    assert detok.text.startswith("Hello there")


# -- find_stop ---------------------------------------------------------------


def test_find_stop_in_new_text():
    assert find_stop("Hello world", 5, ["wor"]) == (6, "wor")
    assert find_stop("Hello world", 5, ["xyz"]) is None
    assert find_stop("Hello world", 5, []) is None


def test_find_stop_ignores_a_stop_that_ended_before_the_new_text():
    # "STOP" ended in earlier text, which was checked when it arrived.
    assert find_stop("abcSTOPdef", 3, ["STOP"]) is None
    # Its last character in the new text is enough.
    assert find_stop("abcSTOPdef", 4, ["STOP"]) == (3, "STOP")
    assert find_stop("abcSTOP", 1, ["STOP"]) == (3, "STOP")


def test_find_stop_spanning_two_deltas():
    text = "foo ST"
    assert find_stop(text, len(text), ["STOP"]) is None
    text += "OP bar"
    assert find_stop(text, len("OP bar"), ["STOP"]) == (4, "STOP")


def test_find_stop_picks_the_earliest_of_several():
    text = "one END two STOP three"
    assert find_stop(text, len(text), ["STOP", "END"]) == (4, "END")
    assert find_stop(text, len(text), ["END", "STOP"]) == (4, "END")
    # Overlapping stops: the one that starts first wins.
    assert find_stop("xabc", 3, ["bc", "abc"]) == (1, "abc")


def test_find_stop_takes_the_first_occurrence_in_new_text():
    text = "a. b. c."
    assert find_stop(text, 5, ["."]) == (4, ".")


def test_find_stop_on_a_token_stream(tok):
    text = "The answer is 42.\n\nQuestion: what next?"
    stop = "\n\nQuestion"
    detok = IncrementalDetokenizer(tok, tok.encode("Q:"), True)
    hits = []
    deltas = []
    for token in tok.encode(text):
        delta = detok.add_token(token)
        deltas.append(delta)
        if delta:
            found = find_stop(detok.text, len(delta), [stop, "nope"])
            if found:
                hits.append((len(deltas) - 1, found))
    # Found once, where it completes, at its start in the full text.
    assert len(hits) == 1
    at, found = hits[0]
    assert found == (text.index(stop), stop)
    assert stop not in deltas[at]  # it spans more than one delta
    assert stop not in "".join(deltas[:at])
    assert stop in "".join(deltas[: at + 1])
