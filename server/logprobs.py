"""Logprobs in the response shapes: the legacy completions object, and vLLM's
prompt_logprobs (completions and chat)."""

from collections.abc import Callable

from engine import RequestOutput
from engine.runtime.outputs import Logprob
from server.protocol import CompletionLogprobs, PromptLogprob, PromptLogprobsOut

# JSON has no -inf: a token the model rules out is written as -9999, as vLLM does.
MIN_LOGPROB = -9999.0


def prompt_logprobs_out(output: RequestOutput, top_n: int | None) -> PromptLogprobsOut | None:
    """vLLM's prompt_logprobs: per prompt token null (the first) or token id ->
    {logprob, rank, decoded_token}, the prompt token and the top `top_n`."""
    if output.prompt_logprobs is None or top_n is None:
        return None
    result: PromptLogprobsOut = []
    for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs, strict=True):
        if entry is None:
            result.append(None)
            continue
        result.append(
            {
                tid: PromptLogprob(
                    logprob=max(lp.logprob, MIN_LOGPROB),
                    rank=lp.rank,
                    decoded_token=lp.decoded_token,
                )
                for tid, lp in entry.items()
                if lp.rank <= top_n or tid == token_id
            }
        )
    return result


def completion_logprobs(
    token_ids: list[int],
    entries: list[dict[int, Logprob] | None],
    top_n: int,
    offset: int,
    decode: Callable[[int], str],
) -> CompletionLogprobs:
    """The legacy completions logprobs object for these tokens; text offsets start at `offset`.

    `entries` holds, per token, the token and the top-N alternatives, or None
    for an echoed prompt's first token (nothing precedes it, so it has no
    logprob): its token is `decode`d and its logprob and top_logprobs are null.
    """
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            token, logprob, top = decode(token_id), None, None
        else:
            chosen = entry[token_id]
            token, logprob = chosen.decoded_token or "", max(chosen.logprob, MIN_LOGPROB)
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
            # Like vLLM: the top N plus the chosen token when it ranks lower.
            top = {
                lp.decoded_token or "": max(lp.logprob, MIN_LOGPROB)
                for tid, lp in ranked
                if lp.rank <= top_n or tid == token_id
            }
        result.tokens.append(token)
        result.token_logprobs.append(logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(token)
    return result
