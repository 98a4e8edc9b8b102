"""Checkpoint directory rules without training: what counts as complete, which one resume=auto picks,
keep-last-N pruning, and that half-written `.tmp` saves are never picked (they are what a crash
mid-save leaves)."""
import json
import os

import pytest
import torch

from megagsm.checkpoint import manager as ck


def _fake_checkpoint(save_dir, iteration, complete=True, tmp=False):
    path = os.path.join(save_dir, ck.checkpoint_name(iteration) + (".tmp" if tmp else ""))
    os.makedirs(path)
    if complete:
        with open(os.path.join(path, "metadata.json"), "w") as f:
            json.dump({"sharded_backend": "torch_dist"}, f)
        with open(os.path.join(path, ck.TRAINER_STATE_FILE), "w") as f:
            json.dump(ck.TrainerState(iteration).to_json(), f)
    return path


def test_name_and_trainer_state_roundtrip():
    assert ck.checkpoint_name(42) == "iter_0000042"
    state = ck.TrainerState(7, consumed_samples=56, sampler={"epoch": 1, "offset": 8}, world_size=2,
                            extra={"best": 0.5})
    assert ck.TrainerState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_resume_auto_ignores_tmp_and_incomplete(tmp_path):
    save = str(tmp_path)
    assert ck.resolve_resume("auto", save) is None  # fresh run
    _fake_checkpoint(save, 10)
    _fake_checkpoint(save, 20)
    _fake_checkpoint(save, 30, tmp=True)          # killed mid-save: complete-looking contents, .tmp name
    _fake_checkpoint(save, 40, complete=False)    # final name but no metadata: not ours / damaged
    assert [i for i, _ in ck.list_checkpoints(save)] == [10, 20]
    assert ck.resolve_resume("auto", save).endswith("iter_0000020")
    assert ck.resolve_resume("none", save) is None


def test_latest_pointer_lagging_behind_is_not_trusted(tmp_path):
    save = str(tmp_path)
    _fake_checkpoint(save, 10)
    _fake_checkpoint(save, 20)
    # a run died after renaming iter_20 into place but before updating `latest`
    (tmp_path / ck.LATEST_FILE).write_text("iter_0000010\n")
    assert ck.find_latest(save).endswith("iter_0000020")
    (tmp_path / ck.LATEST_FILE).write_text("iter_0000020\n")
    assert ck.find_latest(save).endswith("iter_0000020")


def test_resume_from_explicit_paths(tmp_path):
    save = str(tmp_path)
    first = _fake_checkpoint(save, 10)
    _fake_checkpoint(save, 20)
    assert ck.resolve_resume(first, save) == first           # a checkpoint dir
    assert ck.resolve_resume(save, "/elsewhere").endswith("iter_0000020")  # a save dir
    with pytest.raises(FileNotFoundError, match="train.resume"):
        ck.resolve_resume(str(tmp_path / "empty"), save)


def test_keep_last_n_prunes_oldest_and_stale_tmp(tmp_path):
    save = str(tmp_path)
    for it in (10, 20, 30, 40):
        _fake_checkpoint(save, it)
    _fake_checkpoint(save, 50, tmp=True)
    removed = ck.prune_checkpoints(save, keep_last_n=2)
    assert sorted(removed) == ["iter_0000010", "iter_0000020", "iter_0000050.tmp"]
    assert sorted(os.listdir(save)) == ["iter_0000030", "iter_0000040"]
    assert ck.prune_checkpoints(save, keep_last_n=0) == []  # 0 keeps all
    assert len(ck.list_checkpoints(save)) == 2


def test_optimizer_layout_mismatch_is_refused_with_the_fields():
    saved = {"distributed_optimizer": True, "tp": 1, "pp": 1, "ep": 1, "vpp": None}
    ck.check_optimizer_layout("ck/iter_0000003", saved, dict(saved))   # same layout: fine (DP is free)
    ck.check_optimizer_layout("ck/iter_0000003", {}, dict(saved, tp=2))  # older checkpoint: unknown
    plain = dict(saved, distributed_optimizer=False)
    ck.check_optimizer_layout("ck/iter_0000003", plain, dict(plain, tp=2, pp=2))  # layout-free state
    with pytest.raises(ValueError) as err:
        ck.check_optimizer_layout("ck/iter_0000003", saved, dict(saved, tp=2))
    message = str(err.value)
    assert "tp=1" in message and "tp=2" in message and "model.load=ck/iter_0000003" in message
    with pytest.raises(ValueError, match="distributed_optimizer=False"):
        ck.check_optimizer_layout("ck/iter_0000003", saved, plain)


def _resume_across_layouts(root):
    """Save after step 1 at DP2 with the plain (non-distributed) optimizer, continue there; resume the
    same checkpoint at TP2 and at PP2 and take the same two steps."""
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.training import build_optimizer, train_step, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.testing.parity import ParityData, TinyGPTSpec, _microbatches, make_global_batch, tiny_gpt_model

    spec, data = TinyGPTSpec(), ParityData(global_batch=4, micro_batch_size=2)
    layouts = {"dp2": ParallelConfig(use_distributed_optimizer=False),
               "tp2": ParallelConfig(tp=2, use_distributed_optimizer=False),
               "pp2": ParallelConfig(pp=2, use_distributed_optimizer=False)}
    out, init = {}, None
    for name, parallel in layouts.items():
        info = init_runtime(parallel, seed=1)
        chunks = tiny_gpt_model(spec, parallel)
        init = init if init is not None else gather_full_state_dict(chunks)
        load_full_state_dict(chunks, init)
        chunks = wrap_ddp(chunks, parallel)
        optimizer = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-2,
                                                             use_distributed_optimizer=False))

        def step(s):
            mbs = _microbatches(make_global_batch(spec, data, s), info.dp_rank, info.dp_size, 2)
            return train_step(chunks, optimizer, mbs, len(mbs), spec.seq_length, 2).loss

        if name == "dp2":
            step(0)
            ck.save_checkpoint(os.path.join(root, "ck"), ck.TrainerState(iteration=1), chunks, optimizer)
        else:
            ck.load_checkpoint(os.path.join(root, "ck", ck.checkpoint_name(1)), chunks, optimizer)
        out[name] = {"losses": [step(1), step(2)], "final": gather_full_state_dict(chunks, dst=0)}
    return out


@pytest.mark.multirank
def test_plain_optimizer_state_resumes_under_another_layout(tmp_path):
    from megagsm.testing.multirank import run_ranks

    result = run_ranks(_resume_across_layouts, 2, str(tmp_path))[0]
    ref = result["dp2"]
    for name in ("tp2", "pp2"):
        # without the Adam moments (weights alone) the step-2 loss already differs
        assert result[name]["losses"] == pytest.approx(ref["losses"], rel=1e-6), name
        for key, value in ref["final"].items():
            torch.testing.assert_close(result[name]["final"][key], value, rtol=0, atol=2e-5, msg=f"{name} {key}")
