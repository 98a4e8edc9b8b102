"""The SFT trainer end to end on a tiny model, 2 ranks over gloo, two process launches in all.

Launch 1 runs `run_sft` under TP2+SP (with greedy-generation accuracy), PP2 (1F1B) and DP2
(distributed optimizer), then the resume scenario's first half: one uninterrupted DP2 run, and the
same run killed after step 4 with its last checkpoint at step 3 (plus a half-written `.tmp` save,
which is what a kill during a save leaves). Launch 2, fresh processes, resumes that run with
resume=auto: its losses must equal the uninterrupted run's.

Exactness of the resume: both runs execute identical fp32 CPU ops in the same order on the same
data (model, Adam moments and step, LR schedule, sampler position and RNG all restored), so equal is
expected; 1e-12 relative allows only printing-level noise. The loss curves are also checked against
tests/baselines/sft_tiny_losses.json (regenerate with MEGAGSM_UPDATE_BASELINES=1 after an intended
change). Tolerance rtol 2e-4: the runs are bitwise repeatable on one machine; another CPU's kernels
may sum in another order (~1e-7 relative per op, growing over 4-6 Adam steps to ~1e-5), while a real
regression (a wrong lr schedule step, loss normalisation, masking or data order) moves step-2+ losses
by 1e-3 or more.
"""
import json
import math
import os

import pytest

from megagsm.demo import TINY_MODEL, DemoSpec, build_base
from megagsm.testing.multirank import run_ranks

pytestmark = pytest.mark.multirank

BASELINE = os.path.join(os.path.dirname(__file__), "baselines", "sft_tiny_losses.json")
BASELINE_RTOL = 2e-4
RESUME_RTOL = 1e-12
TINY = DemoSpec(model=TINY_MODEL, vocab_multiple=256)  # = megatron's padding at tp<=2
LAYOUTS = {
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.use_distributed_optimizer=false",
               "train.eval_at_start=true", "train.eval_accuracy=true"],
    "pp2": ["parallel.pp=2", "parallel.use_distributed_optimizer=false"],
    "dp2": ["parallel.use_distributed_optimizer=true"],
}
# LoRA (with the chunked loss in small chunks) under TP2+SP and under PP2
LORA_LAYOUTS = {
    "tp2_sp_lora_chunked": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.lora.enabled=true",
                            "train.lora.rank=4", "train.loss=chunked", "train.loss_chunk_size=16"],
    "pp2_lora": ["parallel.pp=2", "parallel.use_distributed_optimizer=false", "train.lora.enabled=true",
                 "train.lora.rank=4"],
}
LORA_BASE = {"tp2_sp_lora_chunked": "tp2_sp", "pp2_lora": "pp2"}
# packed rows (2-3 samples each) fed as THD documents, under PP2: the schedule then exchanges one
# [micro_batch_size * seq_length] sequence per microbatch (loss and gradients = the dense-mask path's:
# tests/test_fused_ce.py)
PACKED_PP2 = ["parallel.pp=2", "parallel.use_distributed_optimizer=false", "data.pack_sequences=true",
              "data.seq_length=128", "model.max_position_embeddings=128", "train.train_steps=2"]
RESUME = ["parallel.use_distributed_optimizer=true", "train.train_steps=6", "train.save_interval=3",
          "train.keep_last_n=2", "optim.warmup_steps=2", "optim.lr_decay_style=cosine", "optim.min_lr=1e-4"]
KILL_AFTER_STEP = 4


def _config(inputs, out_dir, overrides):
    from megagsm.config import load_config

    return load_config(None, [
        "model.init=random", f"model.hf_dir={inputs['base']}",
        "data.source=jsonl", f"data.train_path={inputs['train']}", f"data.eval_path={inputs['test']}",
        "data.prompt_template=bare", "data.seq_length=64", "data.max_prompt_len=40", "data.max_response_len=24",
        "optim.lr=3e-3", "optim.weight_decay=0.01", "optim.clip_grad=1.0",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.train_steps=4",
        "train.eval_at_start=false", "train.eval_accuracy=false", "train.export_hf=false",
        f"train.output_dir={out_dir}", "train.seed=7",
        "generation.max_new_tokens=6", "generation.max_batch_size=4",
        *overrides,
    ])


class _Killed(Exception):
    pass


def _first_launch(inputs, root):
    from megagsm.checkpoint import manager as ck
    from megagsm.sft import run_sft
    from megagsm.sft.step import SFT
    from megagsm.train import Trainer
    from megagsm.utils.metrics import read_metrics

    out = {}
    for name, overrides in {**LAYOUTS, **LORA_LAYOUTS}.items():
        cfg = _config(inputs, os.path.join(root, name), overrides)
        result = run_sft(cfg)
        rows = read_metrics(os.path.join(root, name, "metrics.jsonl")) if os.path.exists(
            os.path.join(root, name, "metrics.jsonl")) else []
        losses = result.metric("loss")
        out[name] = {"losses": [losses[s] for s in sorted(losses)], "accuracy": result.metric("accuracy"),
                     "checkpoint": result.checkpoint, "rows": rows}

    # verl's parquet layout read with the seed scripts' keys: the same examples, so the dp2 run's losses
    verl = run_sft(_config(inputs, os.path.join(root, "verl"), LAYOUTS["dp2"] + [
        "data.source=parquet", f"data.train_path={inputs['verl']}/train.parquet",
        f"data.eval_path={inputs['verl']}/test.parquet", "data.prompt_key=extra_info.question",
        "data.answer_key=extra_info.answer"])).metric("loss")
    out["verl_keys"] = [verl[s] for s in sorted(verl)]

    packed = run_sft(_config(inputs, os.path.join(root, "pp2_packed"), PACKED_PP2))
    out["pp2_packed"] = {"losses": [packed.metric("loss")[s] for s in sorted(packed.metric("loss"))],
                         "val_loss": packed.metric("val_loss")}

    uninterrupted = run_sft(_config(inputs, os.path.join(root, "full"), RESUME)).metric("loss")
    out["full"] = [uninterrupted[s] for s in sorted(uninterrupted)]

    # the same run, killed while fetching the data of step KILL_AFTER_STEP + 1
    killed = Trainer(_config(inputs, os.path.join(root, "killed"), RESUME), SFT)
    stream = killed.algorithm.stream
    next_step = stream.next_step
    calls = {"n": 0}

    def dying_next_step():
        calls["n"] += 1
        if calls["n"] > KILL_AFTER_STEP:
            raise _Killed()
        return next_step()

    stream.next_step = dying_next_step
    with pytest.raises(_Killed):
        killed.fit()
    killed_losses = killed.result.metric("loss")
    out["killed"] = [killed_losses[s] for s in sorted(killed_losses)]
    save_dir = killed.checkpoints.save_dir
    import torch.distributed as dist

    if dist.get_rank() == 0:  # a save of step 5 that died half-way: renamed never, must be ignored
        half = os.path.join(save_dir, ck.checkpoint_name(5) + ".tmp")
        os.makedirs(half)
        with open(os.path.join(half, "metadata.json"), "w") as f:
            f.write("{")
    dist.barrier()
    out["killed_checkpoints"] = sorted(os.listdir(save_dir))
    return out


def _second_launch(inputs, root):
    from megagsm.sft import run_sft
    from megagsm.sft.step import SFT
    from megagsm.train import Trainer
    from megagsm.utils.metrics import read_metrics

    resumed = run_sft(_config(inputs, os.path.join(root, "killed"), RESUME + ["train.resume=auto"]))
    rows = read_metrics(os.path.join(root, "killed", "metrics.jsonl"))
    # distributed-optimizer state cannot follow a TP change: a clear error before megatron's own
    try:
        Trainer(_config(inputs, os.path.join(root, "killed_tp2"), RESUME + [
            f"train.save_dir={os.path.join(root, 'killed', 'checkpoints')}", "parallel.tp=2"]), SFT).restore()
        tp2_error = None
    except ValueError as e:
        tp2_error = str(e)
    return {"losses": resumed.metric("loss"), "resumed_from": resumed.resumed_from, "rows": rows,
            "tp2_resume_error": tp2_error,
            "checkpoints": sorted(os.listdir(os.path.join(root, "killed", "checkpoints")))}


def _write_inputs(root):
    """Data written here, not by the synthetic generator, so the baseline does not move with it."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.randint(0, 99), rng.randint(1, 99)
        rows.append({"question": f"Tom has {a} apples. He gets {b} more apples. How many apples does Tom have now?",
                     "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    os.makedirs(root)
    paths = {}
    for split, part in (("train", rows[:40]), ("test", rows[40:])):
        paths[split] = os.path.join(root, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    texts = [f"{r['question']}\n{r['answer']}" for r in rows[:40]]
    from megagsm.data.prepare import prepare_gsm8k

    paths["verl"] = os.path.join(root, "verl")  # the same rows in verl's RL parquet layout
    prepare_gsm8k(root, paths["verl"])
    paths["base"] = os.path.join(root, "base")
    build_base(paths["base"], texts, TINY)
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    inputs = _write_inputs(str(root / "inputs"))
    first = run_ranks(_first_launch, 2, inputs, str(root))
    second = run_ranks(_second_launch, 2, inputs, str(root))
    assert first[0]["full"] == first[1]["full"]  # every rank reports the same losses
    return first[0], second[0]


def test_layouts_train(runs):
    first, _ = runs
    for name in LAYOUTS:
        losses = first[name]["losses"]
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), (name, losses)
        assert losses[-1] < losses[0] - 0.1, (name, losses)  # lr 3e-3 on a fresh model: clearly learning
        assert first[name]["checkpoint"].endswith("iter_0000004")
        rows = first[name]["rows"]
        steps = [r["step"] for r in rows if r["phase"] == "sft" and "loss" in r]
        assert steps == [1, 2, 3, 4], (name, steps)
    acc = first["tp2_sp"]["accuracy"]
    assert set(acc) == {0, 4} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert any("accuracy" in r and r["step"] == 0 for r in first["tp2_sp"]["rows"])


def test_packed_rows_train_under_pp2(runs):
    first, _ = runs
    losses, val_loss = first["pp2_packed"]["losses"], first["pp2_packed"]["val_loss"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0], losses
    assert set(val_loss) == {2} and math.isfinite(val_loss[2])


def test_verl_parquet_with_the_seed_keys_trains_as_the_jsonl_rows(runs):
    first, _ = runs
    assert first["verl_keys"] == pytest.approx(first["dp2"]["losses"], rel=1e-12)


@pytest.mark.parametrize("name", sorted(LORA_LAYOUTS))
def test_lora_trains_under_tp_sp_and_pp(runs, name):
    first, _ = runs
    losses = first[name]["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    # adapters start as a no-op (B = 0): the first loss is the base model's, as in the full run
    base = first[LORA_BASE[name]]["losses"]
    assert losses[0] == pytest.approx(base[0], rel=1e-6)
    assert losses[-1] < losses[0]
    # only the adapters move: a different curve from full fine-tuning
    assert losses[1:] != pytest.approx(base[1:], rel=1e-6)


def test_killed_run_resumes_with_identical_losses(runs):
    first, second = runs
    full, killed = first["full"], first["killed"]
    assert killed == full[:KILL_AFTER_STEP]
    assert "iter_0000003" in first["killed_checkpoints"] and "iter_0000005.tmp" in first["killed_checkpoints"]
    assert second["resumed_from"].endswith("iter_0000003")  # the half-written step-5 save was ignored
    resumed = second["losses"]
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step - 1], rel=RESUME_RTOL), (step, resumed[step], full[step - 1])
    # metrics.jsonl holds each step once: the killed launch's row for step 4 (after the step-3
    # checkpoint) was dropped on resume and logged again
    loss_rows = [r for r in second["rows"] if r["phase"] == "sft" and "loss" in r]
    assert [r["step"] for r in loss_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in loss_rows] == pytest.approx(full, rel=RESUME_RTOL)
    assert "tp=1" in second["tp2_resume_error"] and "tp=2" in second["tp2_resume_error"]
    assert "model.load=" in second["tp2_resume_error"]
    # keep_last_n=2 after the final save; the stale .tmp was cleaned up by the first new save
    assert second["checkpoints"] == ["iter_0000003", "iter_0000006", "latest"]


def test_loss_curves_match_baseline(runs):
    first, _ = runs
    current = {name: first[name]["losses"] for name in LAYOUTS}
    current["dp2_resume_full"] = first["full"]
    if os.environ.get("MEGAGSM_UPDATE_BASELINES") == "1":
        os.makedirs(os.path.dirname(BASELINE), exist_ok=True)
        with open(BASELINE, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
            f.write("\n")
    with open(BASELINE) as f:
        baseline = json.load(f)
    assert set(baseline) == set(current)
    for name, losses in current.items():
        assert losses == pytest.approx(baseline[name], rel=BASELINE_RTOL), name
