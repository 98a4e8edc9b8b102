"""The LoRA adapters alone, in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(<the HF base model>, out_dir)` loads onto the transformers model.

megatron fuses projections that HF (and so PEFT) keeps apart: linear_qkv = q, k, v and linear_fc1 =
[gate; up]. One adapter on a fused linear computes `scale * B @ A x` with one A for the whole fused
output, so it maps exactly onto one PEFT adapter per HF projection: each gets the same A, and B is cut
by rows the way the family's weight mapping cuts the fused base weight (`megagsm.models.mapping.split`:
megatron's per-KV-group [q heads; k; v] order for qkv, [gate; up] for fc1). A row-parallel linear
(linear_proj = o_proj, linear_fc2 = down_proj) maps one to one. PEFT's scale is lora_alpha / r, the
same as megagsm's, so `r` and `lora_alpha` are written unchanged. Key names are those PEFT writes:
`base_model.model.<HF module path>.lora_A.weight` / `.lora_B.weight`.
"""
from __future__ import annotations

import itertools
import json
import os

import torch

from megagsm.checkpoint.dcp_io import DcpReader
from megagsm.config.train import LoraConfig
from megagsm.models.hf_config import load_hf_config
from megagsm.models.lora import ADAPTER_SUFFIX
from megagsm.models.mapping import split
from megagsm.models.provider import provider_for
from megagsm.runtime.collectives import all_ranks_true
from megagsm.runtime.sharded import gather_full_state_dict
from megagsm.utils.atomic import atomic_dir
from megagsm.utils.rank import is_rank0

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_tensors(adapters: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Layout-free megatron adapter tensors (`<prefix>.<linear>_lora.weight_a|weight_b`, index axes
    first, as `gather_full_state_dict` gives them) -> PEFT's {name: tensor}."""
    provider = provider_for(hf_config)
    rules, dims = provider.weight_map.by_mcore(), provider.dims()
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in adapters if k.endswith(ADAPTER_SUFFIX + ".weight_a")):
        linear = key[: -len(ADAPTER_SUFFIX + ".weight_a")]
        rule = rules.get(linear + ".weight")
        if rule is None:
            raise ValueError(f"{key}: the family's weight mapping has no rule for {linear}.weight")
        a, b = adapters[key], adapters[linear + ADAPTER_SUFFIX + ".weight_b"]
        for index in itertools.product(*(range(n) for n in a.shape[:len(rule.axes)])):
            hf_names = rule.hf_names(index)
            b_parts = split(rule, b[index], dims)
            for hf_name, b_part in zip(hf_names, b_parts):
                module = PEFT_PREFIX + hf_name[: -len(".weight")]
                out[module + ".lora_A.weight"] = a[index].clone()  # one A per HF projection, as PEFT holds it
                out[module + ".lora_B.weight"] = b_part.clone()
    return out


def adapter_config(lora: LoraConfig, hf_config: dict, modules: list[str], base_model: str | None) -> dict:
    """PEFT's LoraConfig fields. Dense models name the HF leaf modules (q_proj, ...); MoE models name
    every adapted module's full path, since expert MLPs reuse the leaf names and carry no adapters."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    targets = sorted(modules) if provider_for(hf_config).family.is_moe else leaves
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def export_peft_adapter(source, out_dir: str, lora: LoraConfig, hf_config: dict | None = None,
                        base_model: str | None = None) -> str:
    """The adapters of `source` -> a PEFT adapter dir (written atomically). Returns out_dir.

    `source` is either this rank's model chunks (before merge_lora; collective: only adapter shards
    travel, their main replicas, in the model's dtype; rank 0 writes; `hf_config` required) or a
    megagsm checkpoint directory (one process reads the adapter tensors alone; `hf_config` defaults
    to the checkpoint's). `lora` gives rank and alpha (a checkpoint does not record alpha)."""
    if isinstance(source, (str, os.PathLike)):
        config = hf_config if hf_config is not None else load_hf_config(source)
        _write(_checkpoint_adapters(source), config, lora, out_dir, base_model)
        return out_dir
    if hf_config is None:
        raise ValueError("export_peft_adapter(model_chunks, ...) needs the model's hf_config")
    adapters = gather_full_state_dict(source, dst=0, keys=lambda k: ADAPTER_SUFFIX + "." in k, keep_dtype=True)
    error = None
    if is_rank0():
        try:
            _write(adapters, hf_config, lora, out_dir, base_model)
        except Exception as e:  # the other ranks must not wait for a writer that has stopped
            error = e
    if not all_ranks_true(error is None):
        raise error if error is not None else RuntimeError(f"rank 0 failed to write the PEFT adapter {out_dir}")
    return out_dir


def _checkpoint_adapters(ckpt_dir) -> dict[str, torch.Tensor]:
    reader = DcpReader(ckpt_dir)
    return {key: reader.read(key, [0] * len(md.size), list(md.size))
            for key, md in reader.tensors().items() if ADAPTER_SUFFIX + ".weight_" in key}


def _write(adapters: dict, hf_config: dict, lora: LoraConfig, out_dir: str, base_model: str | None) -> None:
    from safetensors.torch import save_file

    if not adapters:
        raise ValueError("export_peft_adapter: no LoRA adapters found (apply_lora first, or a LoRA run's checkpoint)")
    tensors = peft_tensors(adapters, hf_config)
    modules = sorted({name[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for name in tensors})
    with atomic_dir(out_dir, overwrite=True, collective=False) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(adapter_config(lora, hf_config, modules, base_model), f, indent=2)
