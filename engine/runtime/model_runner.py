"""Batch to tensors, one forward pass, logits out; owns the KV cache tensors."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.attention.context import AttentionContext, DecodeBatch, DecodeScoring, PrefillSpan
from engine.attention.scoring import ScoreSpec, tau_schedule
from engine.models import CausalLM
from engine.runtime.decode_graphs import DecodeGraphRunner
from engine.runtime.kv_cache import PagedKVCache, slot_index, slot_of
from engine.runtime.outputs import Logprob
from engine.runtime.prompt_logprobs import PromptRows, score_rows
from kv_manager.manager import blocks_for
from scheduler import ScheduledChunk

BlockTableFn = Callable[[str], list[int]]


@dataclass
class RunnerOutput:
    """One step's results: logits of the rows that sample, and the prompt
    logprobs of the rows that were asked for."""

    # float32 [N, vocab]: the chunks that sample, in their order in the batch.
    logits: torch.Tensor
    # Request id -> one entry per row of its PromptRows, in order.
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)


@dataclass
class _PromptSelection:
    """Where a request's wanted prompt rows sit in the flat batch, and the
    prompt tokens they score."""

    rows: list[int]
    targets: list[int]
    top_n: int


class ModelRunner:
    """Runs the model over a scheduled batch, reading and writing the paged cache."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        # One block past the pool's: padded rows of a graphed decode step
        # write and read there, in no sequence's memory.
        self.scratch_block = num_blocks
        self.cache = PagedKVCache(model, num_blocks + 1, block_size, dtype, device)
        self.graphs: DecodeGraphRunner | None = None

    def use_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Run decode-only steps from static buffers (CUDA graphs on CUDA)."""
        max_blocks = blocks_for(max_model_len, self.block_size)
        self.graphs = DecodeGraphRunner(
            self.model, self.block_size, max_batch, max_blocks, self.scratch_block, self.device
        )

    @torch.inference_mode()
    def execute(
        self,
        chunks: list[ScheduledChunk],
        block_table: BlockTableFn,
        score_specs: dict[str, ScoreSpec] | None = None,
        prompt_rows: dict[str, PromptRows] | None = None,
    ) -> RunnerOutput:
        """Run the chunks; returns float32 logits [N, vocab] for the chunks that
        sample, in their order in `chunks`. Requests in `score_specs` also add
        this step's eviction scores to their slots; requests in `prompt_rows`
        get those prompt rows' logprobs (only they: other rows never become logits)."""
        input_ids, ctx, sample_rows = self._prepare(chunks, block_table, score_specs or {})
        if self.graphs is not None and self.graphs.applies(ctx):
            hidden = self.graphs.run(input_ids, ctx)
        else:
            hidden = self.model(input_ids, ctx.positions, ctx)
        # The sampled rows alone, as ever: asking for prompt rows leaves the
        # sampled logits (and so greedy tokens) exactly as they were.
        out = RunnerOutput(self.model.compute_logits(hidden[sample_rows]))
        for request_id, sel in self._select_prompt_rows(chunks, prompt_rows or {}).items():
            rows = torch.tensor(sel.rows, dtype=torch.long, device=self.device)
            out.prompt_logprobs[request_id] = score_rows(
                self.model.compute_logits, hidden[rows], sel.targets, sel.top_n
            )
        return out

    @staticmethod
    def _select_prompt_rows(
        chunks: list[ScheduledChunk], wanted: dict[str, PromptRows]
    ) -> dict[str, _PromptSelection]:
        """The flat-batch rows of each wanted prompt span. Rows follow
        `_prepare`'s order: decodes first, then the prefill chunks in order."""
        selected: dict[str, _PromptSelection] = {}
        row = 0
        for chunk in (chunks[i] for i in _batch_order(chunks)):
            span = wanted.get(chunk.request_id)
            if span is not None:
                assert chunk.start <= span.start and span.end <= chunk.end, (chunk, span)
                first = row + span.start - chunk.start
                prompt = chunk.request.prompt_token_ids
                selected[chunk.request_id] = _PromptSelection(
                    list(range(first, first + span.end - span.start)),
                    prompt[span.start + 1 : span.end + 1],
                    span.top_n,
                )
            row += chunk.num_tokens
        return selected

    def _prepare(
        self,
        chunks: list[ScheduledChunk],
        block_table: BlockTableFn,
        score_specs: dict[str, ScoreSpec],
    ) -> tuple[torch.Tensor, AttentionContext, torch.Tensor]:
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        prefills: list[PrefillSpan] = []
        decodes: list[tuple[ScheduledChunk, list[int]]] = []
        last_row: dict[int, int] = {}  # chunk index -> its last token's row
        for i in _batch_order(chunks):
            chunk = chunks[i]
            row = len(input_ids)
            blocks = block_table(chunk.request_id)
            input_ids += chunk.request.token_ids(chunk.start, chunk.end)
            positions += range(chunk.start, chunk.end)
            end_slot = chunk.slot_start + chunk.num_tokens
            slot_mapping += self._slots(blocks, chunk.slot_start, end_slot)
            if _is_decode(chunk):
                decodes.append((chunk, blocks))
            else:
                spec = score_specs.get(chunk.request_id)
                prefills.append(self._prefill_span(chunk, row, blocks, spec))
            last_row[i] = row + chunk.num_tokens - 1
        sample_rows = [last_row[i] for i, chunk in enumerate(chunks) if chunk.samples]
        ctx = AttentionContext(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            prefills=prefills,
            decode=self._decode_batch(decodes, score_specs) if decodes else None,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return ids, ctx, torch.tensor(sample_rows, dtype=torch.long, device=dev)

    def _slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        """Physical slot index of logical slots [start, end)."""
        return [slot_of(blocks, s, self.block_size) for s in range(start, end)]

    def _prefill_span(
        self, chunk: ScheduledChunk, row: int, blocks: list[int], spec: ScoreSpec | None
    ) -> PrefillSpan:
        dev = self.device
        num_keys = chunk.slot_start + chunk.num_tokens
        used = blocks[: blocks_for(num_keys, self.block_size)]
        table = None
        if chunk.slot_start > 0:
            table = torch.tensor(used, dtype=torch.long, device=dev)
        return PrefillSpan(
            token_start=row,
            num_tokens=chunk.num_tokens,
            slot_start=chunk.slot_start,
            block_table=table,
            query_positions=torch.arange(chunk.start, chunk.end, device=dev),
            key_slots=self.cache.physical_slots(used, num_keys) if spec else None,
            score=spec,
            blocks=used,
        )

    def _decode_batch(
        self,
        decodes: list[tuple[ScheduledChunk, list[int]]],
        score_specs: dict[str, ScoreSpec],
    ) -> DecodeBatch:
        dev = self.device
        width = max(len(blocks) for _, blocks in decodes)
        tables = [blocks + [0] * (width - len(blocks)) for _, blocks in decodes]
        num_keys = torch.tensor([c.slot_start + 1 for c, _ in decodes], device=dev)
        key_index = torch.arange(width * self.block_size, device=dev)
        batch = DecodeBatch(
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            key_valid=key_index.unsqueeze(0) < num_keys.unsqueeze(1),
            num_keys=num_keys,
            query_positions=torch.tensor([c.start for c, _ in decodes], device=dev),
        )
        specs = [(i, score_specs.get(c.request_id)) for i, (c, _) in enumerate(decodes)]
        specs = [(i, s) for i, s in specs if s is not None]
        if specs:
            batch.scoring = self._decode_scoring(batch, specs)
        return batch

    def _decode_scoring(
        self, batch: DecodeBatch, specs: list[tuple[int, ScoreSpec]]
    ) -> DecodeScoring:
        dev = self.device

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        all_rows = len(specs) == batch.num_rows
        rows = column([i for i, _ in specs], torch.long)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if all_rows else t[rows]

        positions = pick(batch.query_positions)
        tau = tau_schedule(
            positions,
            column([s.prompt_len for _, s in specs], torch.long),
            column([s.tau_init for _, s in specs], torch.float32),
            column([s.tau_slope for _, s in specs], torch.float32),
        )
        tables = pick(batch.block_tables)
        return DecodeScoring(
            rows=rows,
            all_rows=all_rows,
            seed=column([s.seed for _, s in specs], torch.int64),
            gumbel=column([s.gumbel for _, s in specs], torch.bool),
            tau=tau,
            query_positions=positions,
            num_keys=pick(batch.num_keys),
            key_valid=pick(batch.key_valid),
            block_tables=tables,
            key_slots=slot_index(tables, self.block_size).flatten(),
        )


def _batch_order(chunks: list[ScheduledChunk]) -> list[int]:
    """The chunks' order in the flat batch: decodes first (their rows are
    then one leading slice, which attention reads and writes without a gather
    or a scatter), then the prefill chunks, each group in scheduled order."""
    return sorted(range(len(chunks)), key=lambda i: not _is_decode(chunks[i]))


def _is_decode(chunk: ScheduledChunk) -> bool:
    """One new token after cached ones (a one-token prompt is a prefill)."""
    return chunk.num_tokens == 1 and chunk.slot_start > 0
