"""Every model family against transformers itself, without running a model (a few seconds in all):

* a config.json is read as transformers reads it: with any one field left out, the translation equals
  the translation of transformers' own reading of that file (its config class fills in the default), or
  the field is refused as required. This is what pins every default a family assumes (tied embeddings,
  biases, routing normalisation and scaling, layer patterns, MTP layers...) to transformers' value;
* the weight rules name exactly the tensors transformers' save_pretrained writes for that config;
* the tensors an export leaves in their stored dtype (`cast=False`) are exactly the ones transformers
  keeps in fp32 when it saves the model in bf16 (its _keep_in_fp32_modules);
* `Family.is_moe`, the expert count and the (gated) shared expert match what the checkpoints hold.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megagsm.models.errors import ModelInputError
from megagsm.models.registry import family_for
from megagsm.testing.tiny_hf import make_tiny_hf_model, tiny_config
from megagsm.testing.tiny_moe import MOE_CASES

CASES: dict[str, tuple[str, dict]] = {**{t: (t, {}) for t in ("qwen2", "llama", "gemma", "qwen3", "seed_oss")},
                                      **MOE_CASES}


def _full_config(name: str) -> dict:
    model_type, overrides = CASES[name]
    return tiny_config(model_type, **overrides).to_dict()


def _translate(hf: dict):
    """(settings, weight map) of a config.json, or the ModelInputError's message."""
    family = family_for(hf["model_type"])
    try:
        return family.settings(dict(hf)), family.weights(dict(hf))
    except ModelInputError as e:
        return str(e)


@pytest.mark.parametrize("name", CASES)
def test_omitted_fields_are_read_as_transformers_reads_them(name):
    from transformers import AutoConfig

    full = _full_config(name)
    model_type = full["model_type"]
    checked = 0
    for field in sorted(set(full) - {"model_type"}):
        omitted = {k: v for k, v in full.items() if k != field}
        try:  # transformers' reading of a config.json without `field`
            read = AutoConfig.for_model(model_type, **{k: v for k, v in omitted.items() if k != "model_type"})
        except Exception:  # transformers itself refuses the file: nothing to compare with
            continue
        ours, theirs = _translate(omitted), _translate(read.to_dict())
        if isinstance(ours, str):
            # refusing is fine when it names the missing field, or when transformers' reading is refused too
            assert ("is required" in ours and repr(field) in ours) or isinstance(theirs, str), (field, ours)
        else:
            assert not isinstance(theirs, str), (field, theirs)
            assert ours == theirs, f"{model_type}: config.json without {field!r} is read unlike transformers"
            checked += 1
    assert checked > 20  # the loop really compared most fields


def _tensor_dtypes(directory: Path) -> dict[str, str]:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (config dict, {tensor: dtype} as saved in fp32, {tensor: dtype} as transformers saves bf16)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("family_truths")
    out = {}
    for name, (model_type, overrides) in CASES.items():
        model = make_tiny_hf_model(model_type, root / name, tokenizer=False, **overrides)
        bf16 = AutoModelForCausalLM.from_pretrained(str(root / name), dtype=torch.bfloat16)
        bf16.save_pretrained(str(root / f"{name}-bf16"))
        out[name] = (model.config.to_dict(), _tensor_dtypes(root / name), _tensor_dtypes(root / f"{name}-bf16"))
    return out


def _rule_names(hf: dict):
    """{HF tensor name: its rule} over every layer and expert the config has."""
    family = family_for(hf["model_type"])
    config, weight_map = family.settings(dict(hf)).config, family.weights(dict(hf))
    sizes = {"layer": config["num_layers"], "expert": config.get("num_moe_experts") or 0}
    names = {}
    for rule in weight_map.rules:
        for index in itertools.product(*(range(sizes[a]) for a in rule.axes)):
            names.update((n, rule) for n in rule.hf_names(index))
    return names, weight_map


@pytest.mark.parametrize("name", CASES)
def test_weight_rules_name_exactly_the_tensors_transformers_saves(name, checkpoints):
    hf, saved, _ = checkpoints[name]
    names, weight_map = _rule_names(hf)
    assert sorted(set(names) - set(saved)) == []                       # nothing expected that is not there
    assert sorted(set(saved) - set(names) - set(weight_map.tied_hf)) == []  # nothing there left unmapped


@pytest.mark.parametrize("name", CASES)
def test_uncast_tensors_are_the_ones_transformers_keeps_in_fp32(name, checkpoints):
    hf, _, saved_bf16 = checkpoints[name]
    names, _ = _rule_names(hf)
    kept_fp32 = {n for n, dtype in saved_bf16.items() if dtype != "BF16"}
    assert {n for n, rule in names.items() if not rule.cast} == kept_fp32
    assert set(saved_bf16) == set(names)


@pytest.mark.parametrize("name", CASES)
def test_expert_settings_match_the_checkpoint(name, checkpoints):
    """is_moe, the routed expert count and the shared expert (and its sigmoid gate) exactly when
    transformers' checkpoint has them."""
    hf, saved, _ = checkpoints[name]
    family = family_for(hf["model_type"])
    config = family.settings(dict(hf)).config
    experts = {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in saved if ".mlp.experts." in n}
    assert family.is_moe == bool(experts)
    assert (config.get("num_moe_experts") or 0) == len(experts)
    assert bool(config.get("moe_shared_expert_intermediate_size")) == any(".mlp.shared_expert" in n for n in saved)
    assert bool(config.get("moe_shared_expert_gate")) == any(".mlp.shared_expert_gate." in n for n in saved)


def test_family_records_are_immutable():
    """Families are module-level singletons and weight rules are shared by every provider built from
    them: assigning to one would change every later model of the process."""
    from megagsm.models.mapping import Dims

    family = family_for("qwen2")
    rule = family.weights(_full_config("qwen2")).rules[0]
    for record, attr in ((family, "is_moe"), (rule, "cast"), (family.weights(_full_config("qwen2")), "rules"),
                         (Dims(4, 2, 16), "kv_channels")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, attr, getattr(record, attr))
