"""`generation.release_training_memory`: grad buffers freed and optimizer state offloaded while GSPO
generates, restored before the log-prob pass, with no effect on the run.

One 2-rank launch: a 2-step GSPO run at TP2 and at DP2 (distributed optimizer), each with release off
and on (set true explicitly: the default is off on CPU). Metrics and losses must be identical (the
truth is the run without releasing); while rollouts are generated the grad buffers must hold no
storage (on) or all of it (off). The same launch measures the live bytes of grad buffers and optimizer
state before/inside/after the release on a model that has taken an optimizer step.
"""
import os

import pytest

from megagsm.rewards import register_reward
from megagsm.testing.multirank import run_ranks

TOY_REWARD = "test_release_has_digit"
TIMING_KEYS = ("time_", "step_time", "tokens_per_s", "gen_tokens_per_s")


@register_reward(TOY_REWARD)
def has_digit(solution_str, ground_truth, **kwargs):
    """A random policy earns it about half the time: groups are mixed, so updates happen."""
    return 1.0 if any(c.isdigit() for c in solution_str) else 0.0


def _config(inputs, out_dir, overrides):
    from megagsm.testing.tiny_runs import tiny_run_config

    cfg = tiny_run_config(inputs, out_dir, [
        "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.clip_grad=1.0", "optim.adam_eps=1e-6",
        "train.micro_batch_size=4", "train.train_steps=2", "algorithm.gspo.mini_batches=2",
        f"algorithm.gspo.reward={TOY_REWARD}", *overrides])
    return cfg


def _launch(inputs, root):
    from megagsm.rl.gspo import GSPO
    from megagsm.train import Trainer
    from megagsm.train.memory import training_memory_released, training_state_bytes

    seen = []
    real = GSPO.collect_rollouts

    def recording(self, step):  # the grad-buffer bytes while the rollouts are generated
        seen.append(training_state_bytes(self.trainer.chunks, self.trainer.optimizer).grad_buffers)
        return real(self, step)

    GSPO.collect_rollouts = recording
    out = {}
    try:
        for layout, overrides in (("tp2", ["parallel.tp=2", "parallel.use_distributed_optimizer=false"]),
                                  ("dp2", ["parallel.use_distributed_optimizer=true"])):
            for release in ("false", "true"):
                seen.clear()
                run = Trainer(_config(inputs, os.path.join(root, f"{layout}_{release}"),
                                      overrides + [f"generation.release_training_memory={release}"]), GSPO)
                history = [row for _, row in sorted(run.fit().history.items())]
                out[(layout, release)] = {"history": history, "grad_bytes_during_rollouts": list(seen)}
    finally:
        GSPO.collect_rollouts = real

    # bytes of live training state on a model after one optimizer step (DP2, distributed optimizer)
    trainer = Trainer(_config(inputs, os.path.join(root, "measure"),
                              ["parallel.use_distributed_optimizer=true", "train.train_steps=1"]), GSPO)
    trainer.fit()
    before = training_state_bytes(trainer.chunks, trainer.optimizer)
    with training_memory_released(trainer.chunks, trainer.optimizer, True):
        inside = training_state_bytes(trainer.chunks, trainer.optimizer)
    after = training_state_bytes(trainer.chunks, trainer.optimizer)
    params = sum(p.numel() for c in trainer.chunks for p in c.parameters())
    out["bytes"] = {"before": before.__dict__, "inside": inside.__dict__, "after": after.__dict__,
                    "params_on_rank": params}
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs

    root = tmp_path_factory.mktemp("release")
    tiny = DemoSpec(n_train=64, n_test=8, model=TINY_MODEL)
    inputs = prepare_inputs(root / "inputs", tiny)
    return run_ranks(_launch, 2, inputs, str(root), timeout=900)


def _without_timings(history):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in history]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_releasing_changes_nothing_in_the_run(launch, layout):
    for rank in launch:
        off, on = rank[(layout, "false")], rank[(layout, "true")]
        assert len(off["history"]) == 2 and any(r.get("updates", 0) > 0 for r in off["history"])
        assert _without_timings(on["history"]) == _without_timings(off["history"])
        # the release really happened during generation (and only when asked)
        assert all(b > 0 for b in off["grad_bytes_during_rollouts"])
        assert on["grad_bytes_during_rollouts"] == [0, 0]


@pytest.mark.multirank
def test_release_frees_grad_buffers_and_restores_them(launch):
    for rank in launch:
        b = rank["bytes"]
        # fp32 grad buffer (grad_reduce_in_fp32): 4 bytes per parameter of this rank's chunks
        assert b["before"]["grad_buffers"] >= 4 * b["params_on_rank"]
        assert b["inside"]["grad_buffers"] == 0
        assert b["after"] == b["before"]
        # on CPU the optimizer state is already in host memory: megatron's offload moves CUDA tensors only
        # (fp32 Adam: m and v, 8 bytes per parameter of this rank's shard, about half the parameters
        # under DP2: shards are cut at bucket boundaries, so not exactly half)
        assert b["inside"]["optimizer_state"] == b["before"]["optimizer_state"] > 3.5 * b["params_on_rank"]
        assert b["before"]["main_params"] == 0  # fp32 training: the optimizer steps the model's own storage
