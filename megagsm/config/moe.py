"""Training-time settings of mixture-of-experts models: load balancing, dispatch, expert kernels.

What a token is routed to (score function, top-k, normalisation, groups, scaling, expert bias) is part
of the model and comes from its HF config.json; these are the knobs a recipe may turn without changing
the function the checkpoint computes. Defaults suit RL fine-tuning: no auxiliary loss, no token
dropping, DeepSeek-V3's routing bias frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class MoEConfig:
    # all-to-all moves only the routed tokens between EP ranks; allgather is megatron's other choice
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # megatron's moe_router_load_balancing_type: aux_loss (GShard/Switch, per micro-batch),
    # seq_aux_loss (DeepSeek, per sequence), global_aux_loss (per global batch) or none
    load_balancing: Literal["none", "aux_loss", "seq_aux_loss", "global_aux_loss"] = "none"
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float | None = None
    # DeepSeek-V3's aux-loss-free balancing nudges the routing bias after every step; 0 keeps the
    # converted bias as it is (it only exists for models with e_score_correction_bias)
    expert_bias_update_rate: float = 0.0
    # None: no token dropping (every routed token reaches its expert, as in the HF model)
    capacity_factor: float | None = None
    # grouped GEMM over the local experts: auto uses it where transformer-engine is installed;
    # otherwise experts run one after another (megatron's SequentialMLP). Checkpoints are the same.
    grouped_gemm: Literal["auto", "on", "off"] = "auto"
    # routing math in fp32 (or fp64) even when the model runs in bf16; auto follows the HF model
    router_dtype: Literal["auto", "fp32", "fp64"] = "auto"

    def validate(self) -> None:
        if self.load_balancing == "none" and self.aux_loss_coeff:
            raise ValueError("model.moe.aux_loss_coeff is set but model.moe.load_balancing is 'none'")
        if self.load_balancing != "none" and not self.aux_loss_coeff:
            raise ValueError(f"model.moe.load_balancing={self.load_balancing!r} needs aux_loss_coeff > 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"model.moe.capacity_factor={self.capacity_factor}: must be > 0 or null")
        if self.expert_bias_update_rate < 0:
            raise ValueError("model.moe.expert_bias_update_rate must be >= 0")

    def overrides(self) -> dict:
        """TransformerConfig fields, to pass as provider.build(..., **overrides). Fields left at
        'auto' are omitted: the model family's defaults stand."""
        self.validate()
        out = dict(
            moe_token_dispatcher_type=self.token_dispatcher,
            moe_router_load_balancing_type=self.load_balancing,
            moe_aux_loss_coeff=self.aux_loss_coeff,
            moe_z_loss_coeff=self.z_loss_coeff,
            moe_router_bias_update_rate=self.expert_bias_update_rate,
            moe_expert_capacity_factor=self.capacity_factor,
        )
        if self.grouped_gemm != "auto":
            out["moe_grouped_gemm"] = self.grouped_gemm == "on"
        if self.router_dtype != "auto":
            out["moe_router_dtype"] = self.router_dtype
        return out
