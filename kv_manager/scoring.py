"""A step's per-slot score contribution, as H2O and Keyformer define it.

For one layer and query head, with x_j the pre-softmax logit of the query to
cached slot j (masked slots at -inf):

    H2O:        f_j = softmax(x)_j
    Keyformer:  f_j = softmax((x + g) / tau)_j,  g_j ~ Gumbel(0, 1)

The Gumbel noise is a pure function of (request seed, layer, query head,
query position, key position): counter-based rather than drawn from a
stateful generator, so a seeded request gets the same noise however the
scheduler batches or chunks it, on any device, and a plain reference can
reproduce it exactly.
"""

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


# Odd 64-bit constants (from splitmix64 and the golden ratio), as signed int64.
_K_SEED = _signed(0x9E3779B97F4A7C15)
_K_LAYER = _signed(0xBF58476D1CE4E5B9)
_K_HEAD = _signed(0x94D049BB133111EB)
_K_QPOS = _signed(0xD6E8FEB86659FD93)
_K_KPOS = _signed(0xA0761D6478BD642F)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _const(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def gumbel_noise(
    seed: torch.Tensor,
    layer: int,
    head: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32, broadcast over the int64 arguments' shapes."""
    dev = seed.device
    x = seed.to(torch.int64) * _const(_K_SEED, dev) + _const(_signed(layer * _K_LAYER), dev)
    x = x + head.to(torch.int64) * _const(_K_HEAD, dev)
    x = x + query_pos.to(torch.int64) * _const(_K_QPOS, dev)
    x = x + key_pos.to(torch.int64) * _const(_K_KPOS, dev)
    # splitmix64 finalizer: every input bit reaches every output bit.
    x = (x ^ _shift_right(x, 30)) * _const(_MIX1, dev)
    x = (x ^ _shift_right(x, 27)) * _const(_MIX2, dev)
    x = x ^ _shift_right(x, 31)
    return gumbel_table(dev)[_shift_right(x, 64 - GUMBEL_TABLE_BITS)]


# The noise is read from a table indexed by the hash's top bits: Gumbel(0, 1)
# at 2**16 equally likely levels (its quantiles at (i + 0.5) / 2**16). Two logs
# per (layer, head, query, key) are most of the cost of a Keyformer prompt on
# a CPU; a lookup is cheap, and the C++ kernels read the same table, so both
# paths draw bit-identical noise. The quantization is invisible to a ranking
# of summed probabilities; the tails end at about -2.4 and 11.8.
GUMBEL_TABLE_BITS = 16
_tables: dict[torch.device, torch.Tensor] = {}


def gumbel_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 2**GUMBEL_TABLE_BITS Gumbel(0, 1) levels, float32, on `device`."""
    device = torch.device(device)
    table = _tables.get(device)
    if table is None:
        size = 1 << GUMBEL_TABLE_BITS
        # float64 until the end: in float32 the top level's u would round to 1.
        u = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        table = (-torch.log(-torch.log(u))).to(torch.float32).to(device)
        _tables[device] = table
    return table


_exp_tables: dict[torch.device, torch.Tensor] = {}


def gumbel_exp_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """e^g for each level of `gumbel_table`: at tau = 1, softmax(x + g) is
    softmax(x) * e^g renormalized, which saves a kernel a second exp."""
    device = torch.device(device)
    table = _exp_tables.get(device)
    if table is None:
        table = gumbel_table(device).double().exp().float()
        _exp_tables[device] = table
    return table


def step_scores(
    logits: torch.Tensor, tau: torch.Tensor | None, noise: torch.Tensor | None
) -> torch.Tensor:
    """Per-slot score contributions: softmax((logits + noise) / tau) over the last dim.

    logits: float32 [..., S] with masked slots at -inf; tau broadcastable to
    logits (None: 1); noise like logits (None: no noise, i.e. H2O).
    """
    x = logits if noise is None else logits + noise
    if tau is not None:
        x = x / tau
    return torch.softmax(x, dim=-1)
