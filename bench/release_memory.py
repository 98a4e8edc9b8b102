"""Bytes of live training state (DDP grad buffers, optimizer state, fp32 master params on the model's
device) before,
while and after `generation.release_training_memory` releases them for the rollouts.

    python bench/release_memory.py            # CPU, 2 processes: TP2 (plain optimizer), DP2 (distributed)

A Qwen2-shaped random model (hidden 512, 4 layers, 8 heads / 2 KV groups, FFN 1536, BPE vocab of the
demo task) takes one GSPO step, then megagsm.train.memory measures and releases. Prints one JSON line
per layout, rank 0's numbers (ranks agree up to the embedding shards).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {"tp2": ["parallel.tp=2", "parallel.use_distributed_optimizer=false"],
           "dp2": ["parallel.use_distributed_optimizer=true"]}


def _measure(inputs, root):
    from megagsm.config import load_config
    from megagsm.rl.gspo import GSPO
    from megagsm.train import Trainer
    from megagsm.train.memory import training_memory_released, training_state_bytes

    out = {}
    for name, overrides in LAYOUTS.items():
        cfg = load_config(None, [
            "algorithm.name=gspo", "model.init=random", f"model.hf_dir={inputs['base']}", "data.source=jsonl",
            f"data.train_path={inputs['train']}", f"data.eval_path={inputs['test']}", "data.prompt_template=bare",
            "data.seq_length=64", "data.max_prompt_len=40", "data.max_response_len=8", "train.micro_batch_size=4",
            "train.train_steps=1", "train.eval_at_start=false", "train.eval_accuracy=false",
            "train.export_hf=false", f"train.output_dir={os.path.join(root, name)}", "generation.max_new_tokens=8",
            "algorithm.gspo.n_rollouts=4", "algorithm.gspo.prompts_per_step=4",
            "algorithm.gspo.filter_zero_std_groups=false", *overrides])
        trainer = Trainer(cfg, GSPO)
        trainer.fit()
        before = training_state_bytes(trainer.chunks, trainer.optimizer)
        with training_memory_released(trainer.chunks, trainer.optimizer, True):
            inside = training_state_bytes(trainer.chunks, trainer.optimizer)
        after = training_state_bytes(trainer.chunks, trainer.optimizer)
        out[name] = {"bench": "release_memory", "layout": name, "device": before.device,
                     "params_on_rank": sum(p.numel() for c in trainer.chunks for p in c.parameters()),
                     "before": before.__dict__, "released": inside.__dict__, "restored": after.__dict__,
                     "freed_bytes": before.total - inside.total}
    return out


def main() -> int:
    from megagsm.demo import DemoSpec, prepare_inputs
    from megagsm.testing.multirank import run_ranks

    with tempfile.TemporaryDirectory() as root:
        spec = DemoSpec(n_train=64, n_test=8, hidden_size=512, num_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=1536, max_position_embeddings=128)
        inputs = prepare_inputs(Path(root) / "inputs", spec)
        results = run_ranks(_measure, 2, inputs, root, timeout=900)
    for name in LAYOUTS:
        row = results[0][name]
        for key in ("before", "released", "restored"):
            row[key].pop("device")
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
