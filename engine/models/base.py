"""What every model family offers the model runner."""

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.attention.context import AttentionContext
from engine.attention.layer import PagedAttention


class CausalLM(nn.Module):
    """A decoder-only LM that takes flat token ids and positions.

    Subclasses build their layers with parameter names matching the Hugging
    Face checkpoints, so weights load by name; `remap_weight` fixes up the
    checkpoints whose layout differs from ours.
    """

    # Parameter names that are not in checkpoints because they share storage
    # with another (tied embeddings).
    tied_weights: dict[str, str] = {}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        raise NotImplementedError

    def merge_projections(self) -> None:
        """After loading: merge linears that read the same input (q/k/v,
        gate/up) into one, where the family supports it. Default: none."""

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def remap_weight(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensor -> our parameter(s). Default: same name, same layout."""
        yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into parameters; fail on anything missing."""
        params = dict(self.named_parameters())
        loaded = set()
        for ckpt_name, tensor in weights:
            for name, t in self.remap_weight(ckpt_name, tensor):
                if name not in params:
                    continue  # buffers the checkpoint carries (e.g. rotary tables)
                param = params[name]
                if param.shape != t.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(t.shape)}, "
                        f"model expects {tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(t)
                loaded.add(name)
        for name, source in self.tied_weights.items():
            if name not in loaded and source in loaded:
                loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"checkpoint is missing weights: {missing[:5]}"
                + (" ..." if len(missing) > 5 else "")
            )
