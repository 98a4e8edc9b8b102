"""SwiGLU for megatron's MLP without torch.compile: the same values as megatron's unfused path, bit for bit.

megatron's MLP runs its gated activation one of two ways. Unfused (`bias_activation_fusion=False`), it
splits fc1's output, computes silu(gate) * (up + glu_linear_offset) through autograd: an extra pass for
the +0.0 offset, and a backward that concatenates the two halves' gradients. Fused, it calls
`fusions.fused_bias_swiglu`, whose kernels are `torch.compile`d: on CPU that compiles C++ at the first
call of every process (11-25 s measured here, more on every new shape) and needs a compiler at run time.

`swiglu` takes the fused path's place (megatron's mlp / experts / shared-experts modules look it up by
name at every call): the unfused path's operations in the unfused path's order, so forward and gradients
are bit-identical to `bias_activation_fusion=False` in every dtype, with one fewer forward pass and the
backward writing both halves of the input gradient in place (on the demo's update: 15 -> 10 ms per
layer and microbatch). Providers turn `bias_activation_fusion` on for gated SiLU MLPs so that megatron
takes this path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import mlp as _mlp
from megatron.core.transformer.moe import experts as _experts
from megatron.core.transformer.moe import shared_experts as _shared_experts


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        gate, up = torch.chunk(x, 2, -1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad):
        x, activated = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, -1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = torch.chunk(grad_x, 2, -1)
        # autograd's order for silu(gate) * up: d up = g * silu(gate), d gate = silu'(gate) applied to g * up
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: torch.Tensor, bias: torch.Tensor | None = None, fp8_input_store: bool = False,
           cpu_offload_input: bool = False) -> torch.Tensor:
    """silu(x1) * x2 of the two halves of the last axis of x (+ bias first); megatron's
    `bias_swiglu_impl` arguments (fp8 input storage and CPU offload of the input are TE features)."""
    if fp8_input_store or cpu_offload_input:
        raise NotImplementedError("swiglu: fp8_input_store / cpu_offload_input need transformer-engine")
    if bias is not None:
        x = x + bias
    return _SwiGLU.apply(x)


def weighted_swiglu(x: torch.Tensor, bias: torch.Tensor | None, weights: torch.Tensor,
                    fp8_input_store: bool = False) -> torch.Tensor:
    """swiglu(x, bias) scaled per token (MoE experts' routing probabilities), cast back to x's dtype
    as megatron's unfused path does."""
    return (swiglu(x, bias, fp8_input_store) * weights).to(x.dtype)


for _module in (_mlp, _shared_experts):
    _module.bias_swiglu_impl = swiglu
for _module in (_mlp, _experts):
    _module.weighted_bias_swiglu_impl = weighted_swiglu


def fused_activation_fields(config: dict) -> dict:
    """TransformerConfig fields that send a gated SiLU MLP through `swiglu`."""
    plain = config.get("glu_linear_offset", 0.0) == 0.0 and config.get("activation_func_clamp_value") is None
    if config.get("gated_linear_unit") and config.get("activation_func") is F.silu and plain:
        return {"bias_activation_fusion": True}
    return {}
