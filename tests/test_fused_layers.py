"""megagsm's eager SwiGLU and RMSNorm backward (megagsm.layers.swiglu / norm).

SwiGLU: megatron's MLP with `bias_activation_fusion=True` (which calls megagsm's `swiglu`) gives the
same output and the same input and parameter gradients, bit for bit, as its unfused path
(`bias_activation_fusion=False`), in fp32 and bf16, with and without fc1 bias, and with the per-token
routing scale MoE experts pass (bias-free, as every MoE family here); providers turn the fusion on for gated SiLU MLPs only.
RMSNorm: the closed-form backward equals autograd through the forward (fp32: rounding; bf16: one
bf16 step), for Llama-style and Gemma's zero-centred scale.
"""
import pytest
import torch
import torch.nn.functional as F

from megagsm.testing.multirank import run_ranks


def _mlp_cases():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP

    import megagsm.layers.swiglu  # noqa: F401  (installs swiglu where megatron's MLP looks it up)
    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime import init_runtime

    init_runtime(ParallelConfig(), seed=3)
    submodules = get_gpt_layer_local_spec().submodules.mlp.submodules
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for bias in (False, True):
            for scaled in (False, True):
                if bias and scaled:  # megatron's own MLP fails there at TP1 (an in-place add on a view)
                    continue
                modules = []
                for fused in (False, True):
                    config = TransformerConfig(num_layers=1, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2,
                                               gated_linear_unit=True, activation_func=F.silu, add_bias_linear=bias,
                                               bias_activation_fusion=fused, params_dtype=dtype,
                                               bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
                    modules.append(MLP(config, submodules))
                modules[1].load_state_dict(modules[0].state_dict())
                g = torch.Generator().manual_seed(bias * 2 + scaled)
                x = torch.randn(5, 3, 16, generator=g).to(dtype)
                upstream = torch.randn(5, 3, 16, generator=g).to(dtype)
                scale = torch.rand(5, 3, generator=g) if scaled else None
                results = []
                for module in modules:
                    xi = x.clone().requires_grad_()
                    y, y_bias = module(xi, per_token_scale=scale)
                    y = y if y_bias is None else y + y_bias
                    (y.float() * upstream.float()).sum().backward()
                    results.append([y.detach(), xi.grad, *(p.grad for p in module.parameters())])
                key = f"{str(dtype).split('.')[-1]}-bias{int(bias)}-scaled{int(scaled)}"
                out[key] = all(torch.equal(a, b) for a, b in zip(*results)) and len(results[0]) > 2
    return out


@pytest.fixture(scope="module")
def mlp_cases():
    return run_ranks(_mlp_cases, 1)[0]


def test_fused_swiglu_mlp_equals_megatrons_unfused_path_bit_for_bit(mlp_cases):
    assert len(mlp_cases) == 6
    assert all(mlp_cases.values()), {k: v for k, v in mlp_cases.items() if not v}


def test_megatron_looks_up_megagsms_swiglu():
    from megatron.core.transformer import mlp
    from megatron.core.transformer.moe import experts, shared_experts

    from megagsm.layers.swiglu import swiglu, weighted_swiglu

    assert mlp.bias_swiglu_impl is swiglu and shared_experts.bias_swiglu_impl is swiglu
    assert mlp.weighted_bias_swiglu_impl is weighted_swiglu and experts.weighted_bias_swiglu_impl is weighted_swiglu


def test_fusion_is_turned_on_for_gated_silu_only():
    from megagsm.layers.swiglu import fused_activation_fields
    from megagsm.models.families.dense import gelu_tanh

    assert fused_activation_fields({"gated_linear_unit": True, "activation_func": F.silu}) == {
        "bias_activation_fusion": True}
    for config in ({"gated_linear_unit": True, "activation_func": gelu_tanh},   # Gemma
                   {"gated_linear_unit": False, "activation_func": F.silu},
                   {"gated_linear_unit": True, "activation_func": F.silu, "glu_linear_offset": 1.0},
                   {"gated_linear_unit": True, "activation_func": F.silu, "activation_func_clamp_value": 7.0}):
        assert fused_activation_fields(config) == {}


def test_weighted_swiglu_is_swiglu_scaled_per_token_in_the_input_dtype():
    from megagsm.layers.swiglu import swiglu, weighted_swiglu

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g).to(torch.bfloat16)
    bias, weights = torch.randn(8, generator=g).to(torch.bfloat16), torch.rand(6, 1, generator=g)
    out = weighted_swiglu(x, bias, weights)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (swiglu(x, bias) * weights).to(torch.bfloat16))
    gate, up = (x + bias).float().chunk(2, -1)
    torch.testing.assert_close(out.float(), F.silu(gate) * up * weights, rtol=2e-2, atol=2e-2)


def test_swiglu_refuses_transformer_engine_only_options():
    from megagsm.layers.swiglu import swiglu

    with pytest.raises(NotImplementedError, match="fp8_input_store"):
        swiglu(torch.randn(2, 4), None, fp8_input_store=True)


def _reference_rmsnorm(x, weight, eps, zero_centered):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype) if zero_centered else weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(7, 3, 64), (11, 48)])
def test_rmsnorm_closed_form_backward_equals_autograd(dtype, zero_centered, shape):
    from megatron.core.transformer import TransformerConfig

    from megagsm.layers.norm import Norm

    config = TransformerConfig(num_layers=1, hidden_size=shape[-1], num_attention_heads=1, normalization="RMSNorm",
                               layernorm_zero_centered_gamma=zero_centered, params_dtype=dtype)
    norm = Norm(config, shape[-1], eps=1e-6)
    g = torch.Generator().manual_seed(len(shape) + 2 * zero_centered)
    with torch.no_grad():
        norm.weight.copy_((torch.randn(shape[-1], generator=g) * 0.3 + (0.0 if zero_centered else 1.0)).to(dtype))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).requires_grad_()
    upstream = torch.randn(*shape, generator=g).to(dtype)
    ours = norm(x)
    grads = torch.autograd.grad(ours, (x, norm.weight), upstream)
    ref = _reference_rmsnorm(x, norm.weight, 1e-6, zero_centered)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight), upstream)
    assert torch.equal(ours, ref)  # the forward is the reference's, operation for operation
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # both round to bf16 at different points: within a few bf16 steps of each other
            torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.float().abs().max().item())
