"""Per-rank GPU memory planner: `python -m megagsm.plan --config R [overrides] [--world-size N]`.

Static bytes (parameters, gradients, optimizer state) are counted exactly as megatron-core allocates
them; activation, logit, KV-cache and generation working-set bytes are closed-form estimates (see
megagsm/plan/activations.py for the formulas and their source)."""
from megagsm.plan.core import GIB, Plan, StagePlan, plan_memory, resolve_hf_config, resolve_world_size

__all__ = ["GIB", "Plan", "StagePlan", "plan_memory", "resolve_hf_config", "resolve_world_size"]
