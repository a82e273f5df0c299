"""Position-only policies: full (never evicts), window, streaming."""

import torch

from kv_manager.policies.base import EvictionPolicy


class FullPolicy(EvictionPolicy):
    """Keeps everything; `budget` is never applied (settings.budget is None)."""

    def keep_priority(self, scores, positions, budget, logical_len) -> torch.Tensor:
        return torch.ones_like(positions, dtype=torch.float32)


class WindowPolicy(EvictionPolicy):
    """The newest k tokens."""

    def keep_priority(self, scores, positions, budget, logical_len) -> torch.Tensor:
        return positions.float()


class StreamingPolicy(EvictionPolicy):
    """StreamingLLM: the first `sink_tokens` tokens plus the newest ones."""

    def keep_priority(self, scores, positions, budget, logical_len) -> torch.Tensor:
        sinks = positions < self.settings.sink_tokens
        return positions.float().masked_fill(sinks, float("inf"))
