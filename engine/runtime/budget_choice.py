"""Budgets chosen from a quality target (kv_target_mass) at the end of each
prompt: the fewest keys that keep the target share of the accumulated score
in every (layer, KV head) (kv_manager/policies/target_mass.py).

Until the choice, a sequence goes by the most it could be given (its whole
prompt, or kv_max_tokens when that is less): admission counts that, and a
prompt over kv_max_tokens is compressed to it while it prefills. The choice
runs after the step that computed the prompt's last token, before its first
output is made (so even a one-token request reports it) and before the
step's eviction cuts the sequence to it, on the scores of the keys it holds.
The budget then stays for the rest of the generation, a recompute after a
preemption included, as a kv_ratio budget does.
"""

from engine.runtime.kv_cache import PagedKVCache
from kv_manager import KVCacheManager
from kv_manager.policies import keys_for_mass
from scheduler import Request, RequestStatus


def choose_budgets(cache: PagedKVCache, kv: KVCacheManager, requests: list[Request]) -> None:
    """Set the chosen budget of every request in `requests` whose prompt has
    just been computed and whose budget waits on its kv_target_mass."""
    for request in requests:
        seq = request.kv
        if (
            seq is None
            or not seq.budget_pending
            or request.status != RequestStatus.RUNNING  # aborted while the step ran
            or request.num_computed_tokens < request.num_prompt_tokens
        ):
            continue
        rid = request.request_id
        scores, positions = cache.read_slot_state(kv.block_table(rid), kv.num_slots(rid))
        keys = keys_for_mass(
            seq.policy, scores, positions, request.num_computed_tokens, seq.settings.kv_target_mass
        )
        request.kv = seq.with_budget(seq.settings.clamp_budget(keys))
