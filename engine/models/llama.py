"""Llama family: RoPE, grouped-query attention, SwiGLU MLP, RMSNorm.

Covers Llama, SmolLM2, Mistral (sliding window) and Qwen2 (q/k/v bias).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.context import AttentionContext
from engine.attention.layer import PagedAttention
from engine.models.base import CausalLM
from engine.models.common import (
    RMSNorm,
    RotaryEmbedding,
    activation,
    merge_linears,
    rope_parameters,
    silu_and_mul,
)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        out_bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=out_bias)
        self.rotary = RotaryEmbedding(
            self.head_dim, rope_parameters(config), config.max_position_embeddings
        )
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=self.head_dim**-0.5,
            sliding_window=_sliding_window(config),
        )
        self.qkv_proj: nn.Linear | None = None

    def merge_projections(self) -> None:
        """One q/k/v matmul instead of three (after the weights are loaded)."""
        self.qkv_proj = merge_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        if self.qkv_proj is not None:
            widths = [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D]
            q, k, v = self.qkv_proj(x).split(widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(T, self.num_heads, D)
        k = k.view(T, self.num_kv_heads, D)
        v = v.view(T, self.num_kv_heads, D)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, ctx))


def _sliding_window(config: Any) -> int | None:
    # Qwen2 configs carry a window they only apply when use_sliding_window is set.
    if not getattr(config, "use_sliding_window", True):
        return None
    return getattr(config, "sliding_window", None)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)
        self.gate_up_proj: nn.Linear | None = None

    def merge_projections(self) -> None:
        """One gate/up matmul instead of two (after the weights are loaded)."""
        self.gate_up_proj = merge_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        if self.act is F.silu:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        ctx: AttentionContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the last block's output, not yet added to the residual stream
        (the first layer: the embeddings, with residual None). Returns this
        layer's MLP output and the stream: each norm adds the pending output
        in the same pass."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, ctx)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    # Qwen2 puts a bias on q/k/v and nowhere else in attention.
    qkv_bias_default = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        qkv_bias = bool(getattr(config, "attention_bias", self.qkv_bias_default))
        if self.qkv_bias_default:
            qkv_bias = True
        self.model = LlamaModel(config, qkv_bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def merge_projections(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.merge_projections()
            layer.mlp.merge_projections()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True
