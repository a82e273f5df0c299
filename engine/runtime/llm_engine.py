"""The step loop: schedule, run the model, sample, process outputs."""

import logging
import random
from collections.abc import Callable
from typing import Any

import torch

from engine.attention.scoring import ScoreSpec
from engine.config import EngineConfig, parse_bytes
from engine.loading.loader import load_config, load_model, resolve_model_path
from engine.loading.tokenizer import load_tokenizer
from engine.runtime.budget_choice import choose_budgets
from engine.runtime.eviction import Evictor
from engine.runtime.kv_cache import PagedKVCache
from engine.runtime.model_runner import ModelRunner
from engine.runtime.output_processor import (
    RequestState,
    make_output,
    make_tokenizer_state,
    process_token,
)
from engine.runtime.outputs import RequestOutput
from engine.runtime.prompt_logprobs import PromptRows, rows_to_score
from engine.runtime.sampler import SampledToken, sample
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.structured_output import StructuredOutput
from kv_manager import KVCacheManager
from kv_manager.policies import SequencePolicy
from scheduler import Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput

# Text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = str | list[int] | dict
# Bad token ids named in an error message; the rest are counted.
MAX_NAMED_IDS = 10
logger = logging.getLogger(__name__)


class LLMEngine:
    """Owns the model, the KV pool and the scheduler; `step()` advances all requests."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        torch.manual_seed(config.seed)
        self._seed_source = random.Random(config.seed)
        folder = resolve_model_path(config.model)
        self.model_path = folder
        self.hf_config = load_config(folder)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(folder)
        self.model = load_model(folder, self.hf_config, self.dtype, self.device)
        self.eos_token_ids = self._eos_token_ids()
        num_blocks = self._num_kv_blocks()
        self.max_model_len = self._max_model_len()
        self.pool_tokens = num_blocks * config.block_size
        self._log_pool_size()
        self.kv = KVCacheManager(num_blocks, config.block_size)
        self.runner = ModelRunner(
            self.model, num_blocks, config.block_size, self.dtype, self.device
        )
        self.evictor = Evictor(self.runner.cache, self.kv, config.max_num_batched_tokens)
        # The evictor also squeezes sequences for the scheduler when the pool is full.
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
            self.kv,
            squeezer=self.evictor,
        )
        backends = sorted({a.backend.name for a in self.model.attention_layers()})
        logger.info("attention backend: %s (%s, %s)", "/".join(backends), self.device, self.dtype)
        # Decode graphs need every kernel of a step capturable and free of host
        # syncs: the Triton backend's are (the torch backend's masks are not).
        if backends == ["triton"] and not config.enforce_eager:
            # No sequence holds more slots than the pool has.
            graph_len = min(self.max_model_len, self.pool_tokens)
            self.runner.use_decode_graphs(config.max_num_seqs, graph_len)
        # The engine's side of each request (sampling, detokenizer, text so
        # far), beside the scheduler's Request; dropped when it finishes.
        self._states: dict[str, RequestState] = {}
        self.default_kv_settings = config.kv_policy_settings()
        self.vocab_size = self.model.compute_logits(
            torch.zeros(1, self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        ).shape[-1]
        # Structured output: grammars compiled on first use (from the
        # tokenizer's file), each step's masks, and their timings.
        self.structured = StructuredOutput(
            folder / "tokenizer.json" if self.tokenizer else None,
            self.vocab_size,
            self.eos_token_ids,
        )
        # Test hook (tests/test_faults.py): called for each request that got a
        # token, before its stop checks; whatever it raises fails that request
        # alone, as a bug in the detokenizer or the stop checks would.
        self.fault_hook: Callable[[Request], None] | None = None
        # High-water marks since start, taken after each step's allocation
        # (before its eviction): what capacity figures and soaks report.
        self.peak_running = 0
        self.peak_kv_blocks_used = 0

    # -- setup ---------------------------------------------------------------

    def _log_pool_size(self) -> None:
        if self.pool_tokens < self.max_model_len:
            logger.info(
                "KV pool holds %d tokens, less than the context of %d: a full request "
                "must fit in it whole; an evicting one needs its budget + one chunk (%d)",
                self.pool_tokens, self.max_model_len, self.config.max_num_batched_tokens,
            )  # fmt: skip

    def _max_model_len(self) -> int:
        """The model's context, not capped by the pool: an evicting sequence
        holds only its budget plus a prefill chunk, so its prompt may be larger
        than the whole pool; the scheduler refuses, per request, one whose peak
        could never fit (a `full` one holds all its tokens)."""
        c = self.hf_config
        native = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        if native is None:  # ALiBi models have no position limit of their own
            native = self.config.max_model_len or 2048
        return min(self.config.max_model_len or native, native)

    def _eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (
            getattr(self.hf_config, "eos_token_id", None),
            self.tokenizer.eos_token_id if self.tokenizer else None,
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(source)
        return frozenset(ids)

    def _num_kv_blocks(self) -> int:
        if self.config.kv_cache_blocks is not None:
            return self.config.kv_cache_blocks
        per_block = PagedKVCache.bytes_per_block(self.model, self.config.block_size, self.dtype)
        blocks = parse_bytes(self.config.kv_cache_bytes) // per_block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={self.config.kv_cache_bytes} holds no block "
                f"({per_block} bytes each)"
            )
        return blocks

    # -- requests ------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None
    ) -> None:
        """Validate, tokenize and queue a request. Raises ValueError on bad input;
        the engine and its other requests are unaffected."""
        params = params or SamplingParams()
        prompt_text, prompt_ids = self._tokenize(prompt)
        kv_settings = self.default_kv_settings.with_overrides(**params.kv_overrides())
        max_tokens = self._check_lengths(prompt_ids, params, kv_settings.evicts)
        self._check_vocab("stop_token_ids", params.stop_token_ids)
        self._check_vocab("logit_bias", list(params.logit_bias or ()))
        grammar = self.structured.new_sequence(params.structured_outputs)
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(62)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        state = RequestState(
            prompt_text,
            params,
            generator,
            stop_ids,
            make_tokenizer_state(self.tokenizer, prompt_ids, params),
            grammar=grammar,
        )
        kv = SequencePolicy.resolve(kv_settings, len(prompt_ids), seed)
        self.scheduler.add_request(Request(request_id, prompt_ids, max_tokens, kv=kv))
        self._states[request_id] = state

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt forms
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give the prompt as token ids")
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt token ids must be integers")
            self._check_vocab("prompt", ids)
        if not ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        return text, ids

    def _check_vocab(self, field: str, token_ids: list[int]) -> None:
        """A ValueError naming `field` and its ids outside the vocabulary, in
        vLLM's words ("out of vocabulary"), which clients match on."""
        bad = list(dict.fromkeys(t for t in token_ids if not 0 <= t < self.vocab_size))
        if not bad:
            return
        shown = ", ".join(str(t) for t in bad[:MAX_NAMED_IDS])
        more = f" (and {len(bad) - MAX_NAMED_IDS} more)" if len(bad) > MAX_NAMED_IDS else ""
        noun = "token id" if len(bad) == 1 else "token ids"
        verb = "is" if len(bad) == 1 else "are"
        raise ValueError(
            f"{field}: {noun} {shown}{more} {verb} out of vocabulary "
            f"(the model has {self.vocab_size} tokens, ids 0 to {self.vocab_size - 1})"
        )

    def _check_lengths(self, prompt_ids: list[int], params: SamplingParams, evicts: bool) -> int:
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens, but the model's context is "
                f"{self.max_model_len} tokens (room is needed for output)"
            )
        if params.max_tokens is None:
            # Without eviction every token is held: by default, up to what
            # the pool holds (a prompt over it is refused by the scheduler).
            room = self.max_model_len if evicts else min(self.max_model_len, self.pool_tokens)
            return max(room - n, 1)
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens"
            )
        return params.max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output."""
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        return make_output(request, self._states.pop(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for each request that produced a token."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.peak_running = max(self.peak_running, self.scheduler.num_running)
        self.peak_kv_blocks_used = max(self.peak_kv_blocks_used, self.kv.num_used_blocks)
        ran = self.runner.execute(
            sched.chunks, self.kv.block_table, self._score_specs(sched), self._prompt_rows(sched)
        )
        for request_id, entries in ran.prompt_logprobs.items():
            self._states[request_id].prompt_logprobs.extend(entries)
        sampling = [c.request for c in sched.chunks if c.samples]
        states = [self._states[r.request_id] for r in sampling]
        # Grammar masks first, as vLLM: the sampler's logprobs, bias and
        # penalties all see the masked logits.
        self.structured.mask(ran.logits, [s.grammar for s in states])
        rows = [s.sampling_row(r) for s, r in zip(states, sampling, strict=True)]
        tokens = sample(ran.logits, rows)
        by_id = {r.request_id: t for r, t in zip(sampling, tokens, strict=True)}
        updated = self.scheduler.update_from_output(
            sched, {rid: t.token_id for rid, t in by_id.items()}
        )
        # Budgets from kv_target_mass, chosen where a prompt just ended.
        choose_budgets(self.runner.cache, self.kv, [c.request for c in sched.chunks])
        outputs = [self._process(request, by_id[request.request_id]) for request in updated]
        # Evict after the stop checks: a finished request frees everything anyway.
        cuts = self.evictor.evict([c.request for c in sched.chunks])
        self.scheduler.apply_evictions(cuts)
        return outputs

    def _score_specs(self, sched: SchedulerOutput) -> dict[str, ScoreSpec]:
        """How attention scores the slots of each scheduled request that evicts by score."""
        specs = {}
        for chunk in sched.chunks:
            r = chunk.request
            settings = r.kv.settings
            if chunk.start >= r.num_prompt_tokens and settings.decode_scoring == "frozen":
                continue  # generated tokens add nothing: the prompt's ranking stays
            score_from = settings.window_start(
                r.num_prompt_tokens, r.slot_budget, chunk.start, self.evictor.prefill_chunk
            )
            spec = ScoreSpec.for_policy(
                settings, r.kv.policy, r.kv.seed, r.num_prompt_tokens, r.max_tokens, score_from
            )
            if spec is not None:
                specs[chunk.request_id] = spec
        return specs

    def _prompt_rows(self, sched: SchedulerOutput) -> dict[str, PromptRows]:
        """The prompt rows to score this step, for requests that asked for
        prompt logprobs; rows scored before a preemption are not again."""
        wanted = {}
        for chunk in sched.chunks:
            state = self._states[chunk.request_id]
            if state.prompt_logprobs is None:
                continue
            rows = rows_to_score(
                chunk.start,
                chunk.end,
                chunk.request.num_prompt_tokens,
                len(state.prompt_logprobs),
                state.params.prompt_logprobs,
            )
            if rows is not None:
                wanted[chunk.request_id] = rows
        return wanted

    def _process(self, request: Request, sampled: SampledToken) -> RequestOutput:
        """Stop checks and detokenizing for a request's new token; its output."""
        state = self._states[request.request_id]
        try:
            if self.fault_hook is not None:
                self.fault_hook(request)
            status = process_token(request, state, sampled)
        except Exception:
            # NOTE: one request's failure in post-processing must not take
            # the batch (or the engine loop) down: it finishes with an
            # error (its blocks freed) and the others carry on.
            logger.exception("request %s failed; finishing it", request.request_id)
            status = RequestStatus.FINISHED_ERROR
        if status.is_finished:
            self.scheduler.finish_request(request.request_id, status)
            del self._states[request.request_id]
        return make_output(request, state)

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "kv_blocks_used": self.kv.num_used_blocks,
            "kv_blocks_total": self.kv.num_total_blocks,
            "peak_running": self.peak_running,
            "peak_kv_blocks_used": self.peak_kv_blocks_used,
            "preemptions": self.scheduler.num_preemptions,
            "tokens_evicted": self.scheduler.num_tokens_evicted,
            "blocks_freed_by_eviction": self.scheduler.num_blocks_freed_by_eviction,
            "squeezes": self.scheduler.num_squeezes,
            "tokens_evicted_by_squeeze": self.scheduler.num_tokens_evicted_by_squeeze,
        }


__all__ = ["LLMEngine", "PromptType", "RequestStatus"]
