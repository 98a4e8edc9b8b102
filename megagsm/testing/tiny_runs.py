"""The config of a tiny SFT or GSPO run, shared by the trainer tests (inputs from
megagsm.demo.prepare_inputs with DemoSpec(model=TINY_MODEL)). Each test adds only what it is about."""
from __future__ import annotations

def tiny_run_config(inputs: dict, out_dir: str, overrides=(), algorithm: str = "gspo", world_size: int = 2):
    """The validated RunConfig: random init on inputs['base'], the jsonl train/test files, 64-token rows,
    8 new tokens, 4 prompts x 4 rollouts, no evaluation, no export; `overrides` applied last."""
    from megagsm.config import load_config, validate

    cfg = load_config(None, [
        f"algorithm.name={algorithm}", "model.init=random", f"model.hf_dir={inputs['base']}",
        "data.source=jsonl", f"data.train_path={inputs['train']}", f"data.eval_path={inputs['test']}",
        "data.prompt_template=bare", "data.seq_length=64", "data.max_prompt_len=40", "data.max_response_len=8",
        "train.eval_at_start=false", "train.eval_accuracy=false", "train.export_hf=false",
        f"train.output_dir={out_dir}", "train.seed=3", "generation.max_new_tokens=8", "generation.max_batch_size=32",
        "algorithm.gspo.n_rollouts=4", "algorithm.gspo.prompts_per_step=4", *overrides])
    validate(cfg, world_size)
    return cfg


def copy_tokenizer(base: str, out_dir) -> None:
    """The tokenizer files of `base` (an inputs['base'] dir: they and its config.json) into `out_dir`."""
    import os
    import shutil

    for name in os.listdir(base):
        if name != "config.json":
            shutil.copy(os.path.join(base, name), out_dir)


def hf_model_dir(base: str, out_dir, seed: int = 0) -> str:
    """An HF model dir as a user brings it: random weights for `base`'s config.json, its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(str(out_dir))
    copy_tokenizer(base, out_dir)
    return str(out_dir)
