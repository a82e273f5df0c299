"""BLOOM: ALiBi positions, an embedding LayerNorm, fused per-head qkv, tanh-gelu."""

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from engine.attention.context import AttentionContext
from engine.attention.layer import PagedAttention
from engine.models.base import CausalLM
from engine.models.common import activation


class BloomAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        # No positions in q/k: ALiBi biases the scores by key position instead.
        self.attn = PagedAttention(
            self.num_heads, self.num_heads, self.head_dim, scale=self.head_dim**-0.5, alibi=True
        )

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        # The fused output is laid out per head: [q, k, v] for head 0, then head 1, ...
        qkv = self.query_key_value(x).view(T, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(2)  # each [T, H, D]
        return self.dense(self.attn(q, k, v, ctx))


class BloomMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.dense_4h_to_h = nn.Linear(4 * hidden, hidden)
        self.act = activation("gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = BloomMLP(config)
        # Some BLOOM variants take the residual after the norm, not before it.
        self.residual_after_norm = bool(
            getattr(config, "apply_residual_connection_post_layernorm", False)
        )

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.residual_after_norm else x) + self.self_attention(h, ctx)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_after_norm else x) + self.mlp(h)


class BloomModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # [T, hidden]
        for block in self.h:
            x = block(x, ctx)
        return self.ln_f(x)


class BloomForCausalLM(CausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.transformer = BloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.transformer.word_embeddings.weight
            self.tied_weights = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        # Positions enter only through the ALiBi bias, which reads the context.
        return self.transformer(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def remap_weight(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        # BigScience's own checkpoints name the base model's weights without
        # the "transformer." prefix that transformers writes.
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        yield name, tensor
