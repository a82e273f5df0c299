"""GPT-NeoX (Pythia): partial rotary, fused per-head qkv, optional parallel residual."""

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from engine.attention.context import AttentionContext
from engine.attention.layer import PagedAttention
from engine.models.base import CausalLM
from engine.models.common import RotaryEmbedding, activation, rope_parameters


def _rope(config: Any) -> tuple[dict, float]:
    """RoPE settings and the fraction of each head that is rotated.

    transformers 5 keeps both in `rope_parameters` (partial_rotary_factor);
    older versions call them rotary_emb_base and rotary_pct.
    """
    params = rope_parameters(config)
    if "rope_theta" not in (getattr(config, "rope_parameters", None) or {}):
        params["rope_theta"] = getattr(config, "rotary_emb_base", params["rope_theta"])
    fraction = params.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    return params, float(fraction)


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.dense = nn.Linear(hidden, hidden, bias=bias)
        params, fraction = _rope(config)
        self.rotary = RotaryEmbedding(
            int(self.head_dim * fraction), params, config.max_position_embeddings
        )
        self.attn = PagedAttention(
            self.num_heads, self.num_heads, self.head_dim, scale=self.head_dim**-0.5
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        T = x.shape[0]
        # The fused output is laid out per head: [q, k, v] for head 0, then head 1, ...
        qkv = self.query_key_value(x).view(T, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(2)  # each [T, H, D]
        q, k = self.rotary(positions, q, k)
        return self.dense(self.attn(q, k, v, ctx))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)
        self.parallel_residual = bool(getattr(config, "use_parallel_residual", True))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), positions, ctx)
        if self.parallel_residual:
            # Attention and MLP both read the layer's input: x + attn(ln1 x) + mlp(ln2 x).
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        x = self.embed_in(input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(CausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gpt_neox = GPTNeoXModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.gpt_neox.embed_in.weight
            self.tied_weights = {"lm_head.weight": "gpt_neox.embed_in.weight"}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def remap_weight(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        # Pythia and older checkpoints call the output head embed_out.
        if name == "embed_out.weight":
            name = "lm_head.weight"
        yield name, tensor
