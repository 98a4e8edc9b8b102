"""Fault injection around trainer checkpoints: a run killed (SIGKILL) before, during or after the
rename of a save, a save that hits a full disk (ENOSPC), and a damaged shard; each followed by a resume.

Nothing may be lost: the resumed run repeats the uninterrupted run's losses bit for bit, metrics.jsonl
holds each step once, no `.tmp` directory survives the resume, and a damaged checkpoint is refused with
a line naming the file (the previous one still resumes). One process per launch (a kill leaves no peer
waiting); the default run keeps one case of each kind, the other kill points are marked slow.
"""
import errno
import json
import os
import signal

import pytest

from megagsm.testing.multirank import RankFailure, run_ranks

pytestmark = pytest.mark.multirank

STEPS, SAVE_EVERY, FAULT_AT = 6, 2, 4   # saves at 2, 4, 6; the fault hits the save of step 4


def _config(inputs, out_dir, overrides=()):
    from megagsm.config import load_config

    return load_config(None, [
        "model.init=random", f"model.hf_dir={inputs['base']}", "data.source=jsonl",
        f"data.train_path={inputs['train']}", "data.prompt_template=bare", "data.seq_length=48",
        "data.max_prompt_len=32", "optim.lr=3e-3", "optim.warmup_steps=2", "optim.lr_decay_style=cosine",
        "train.global_batch_size=4", "train.micro_batch_size=2", f"train.train_steps={STEPS}",
        f"train.save_interval={SAVE_EVERY}", "train.keep_last_n=3", "train.eval_at_start=false",
        "train.eval_accuracy=false", "train.export_hf=false", f"train.output_dir={out_dir}", "train.seed=11",
        "parallel.use_distributed_optimizer=false", *overrides])


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(fault: str) -> None:
    """Patches the checkpoint manager so that the save of step FAULT_AT fails as `fault` says."""
    from megagsm.checkpoint import manager

    target = manager.checkpoint_name(FAULT_AT)
    save, replace = manager.dist_checkpointing.save, manager.os.replace

    def faulty_save(state, directory, *args, **kwargs):
        if os.path.basename(directory) == target + ".tmp":
            if fault == "kill_before":
                _die()
            if fault == "disk_full":
                raise OSError(errno.ENOSPC, "No space left on device", directory)
            save(state, directory, *args, **kwargs)
            if fault == "kill_during":  # shards written, trainer state and rename not yet
                _die()
            return
        save(state, directory, *args, **kwargs)

    def faulty_replace(src, dst):
        replace(src, dst)
        if fault == "kill_after_rename" and os.path.basename(dst) == target:
            _die()  # renamed, `latest` not yet updated

    manager.dist_checkpointing.save = faulty_save
    manager.os.replace = faulty_replace


def _train(inputs, out_dir, fault=None, overrides=()):
    from megagsm.sft import run_sft
    from megagsm.utils.metrics import read_metrics

    if fault:
        _inject(fault)
    result = run_sft(_config(inputs, out_dir, overrides))
    rows = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"), "sft") if "loss" in r]
    return {"losses": result.metric("loss"), "resumed_from": result.resumed_from,
            "rows": [(r["step"], r["loss"]) for r in rows]}


def _write_inputs(root):
    from megagsm.demo import TINY_MODEL, DemoSpec, build_base

    rows = [{"question": f"Ann has {a} pens and buys {b} more. How many pens?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in ((i * 7 % 50, i * 3 % 40 + 1) for i in range(32))]
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    base = os.path.join(root, "base")
    build_base(base, [f"{r['question']}\n{r['answer']}" for r in rows],
               DemoSpec(model=TINY_MODEL))
    return {"train": path, "base": base}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    inputs = _write_inputs(str(root / "inputs"))
    reference = run_ranks(_train, 1, inputs, str(root / "reference"))[0]
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    return root, inputs, reference


def _check_resume_after(fault, setup):
    root, inputs, reference = setup
    out = str(root / fault)
    with pytest.raises(RankFailure):
        run_ranks(_train, 1, inputs, out, fault)
    ckpts = os.path.join(out, "checkpoints")
    assert "iter_0000002" in os.listdir(ckpts)  # the previous checkpoint is intact
    resumed = run_ranks(_train, 1, inputs, out)[0]
    expected_from = "iter_0000004" if fault == "kill_after_rename" else "iter_0000002"
    assert resumed["resumed_from"].endswith(expected_from), (fault, resumed["resumed_from"])
    first = int(expected_from[-1]) + 1
    for step in range(first, STEPS + 1):
        assert resumed["losses"][step] == reference["losses"][step], (fault, step)  # bit for bit
    assert [s for s, _ in resumed["rows"]] == list(range(1, STEPS + 1))  # each step once
    assert [loss for _, loss in resumed["rows"]] == [reference["losses"][s] for s in range(1, STEPS + 1)]
    assert not [n for n in os.listdir(ckpts) if n.endswith(".tmp")]


def test_kill_during_a_save_then_resume(setup):
    _check_resume_after("kill_during", setup)


def test_disk_full_during_a_save_then_resume(setup):
    _check_resume_after("disk_full", setup)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_before", "kill_after_rename"])
def test_kill_before_and_after_the_rename_then_resume(setup, fault):
    _check_resume_after(fault, setup)


def test_a_damaged_shard_is_named_and_the_previous_checkpoint_resumes(setup):
    import shutil

    root, inputs, reference = setup
    out = str(root / "damaged")
    shutil.copytree(str(root / "reference"), out)
    newest = os.path.join(out, "checkpoints", "iter_0000006")
    shard = sorted(n for n in os.listdir(newest) if n.endswith(".distcp"))[0]
    with open(os.path.join(newest, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(newest, shard)) // 2)
    with pytest.raises(RankFailure, match=shard):
        run_ranks(_train, 1, inputs, out, None, ["train.train_steps=8"])
    older = os.path.join(out, "checkpoints", "iter_0000004")
    resumed = run_ranks(_train, 1, inputs, out, None, [f"train.resume={older}"])[0]
    assert resumed["resumed_from"] == older
    for step in (5, 6):
        assert resumed["losses"][step] == reference["losses"][step]
