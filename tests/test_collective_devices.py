"""Collectives get tensors their group's backend can serve, with NCCL's rule emulated on CPU.

On a GPU the default group is "cpu:gloo,cuda:nccl" and megatron's subgroups are NCCL (CUDA tensors
only). megagsm.testing.collective_check emulates that on gloo: megatron's groups answer "nccl", the
default group the mixed backend, and every torch.distributed collective the project issues is checked
(through runtime/collectives.py with an operand it moved, or one of the declared hot-path sites on
model-device tensors). One 2-rank launch runs hf->mcore conversion, an SFT step (TP2 + SP, greedy eval
at start), a GSPO step (DP2, distributed optimizer, in-process generation) and batched generation
under it: no violation. The same launch then plants
`dist.all_reduce(torch.tensor([1.0]), group=ps.get_data_parallel_group())` into each of those five
paths (compiled in the planted module's namespace, as an edit to that file would be) and into
runtime/collectives.py itself without moving the operand: every plant is reported.
"""
import os

import pytest

from megagsm.runtime.distributed import CUDA_DEFAULT_BACKEND, default_backend
from megagsm.testing.multirank import run_ranks

PLANTED_LINE = "dist.all_reduce(torch.tensor([1.0]), group=ps.get_data_parallel_group())"


def test_default_group_serves_both_devices_on_cuda():
    assert default_backend("auto", "cuda") == CUDA_DEFAULT_BACKEND == "cpu:gloo,cuda:nccl"
    assert default_backend("nccl", "cuda") == CUDA_DEFAULT_BACKEND
    assert default_backend("auto", "cpu") == "gloo"
    assert default_backend("gloo", "cuda") == "gloo"


def _planted(module_name: str, real):
    """`real` preceded by the planted line, compiled as code of `module_name`."""
    src = ("def planted(*args, **kwargs):\n"
           "    import torch\n"
           "    import torch.distributed as dist\n"
           "    from megatron.core import parallel_state as ps\n"
           f"    {PLANTED_LINE}\n"
           "    return real(*args, **kwargs)\n")
    namespace = {"__name__": module_name, "real": real}
    exec(compile(src, f"<planted in {module_name}>", "exec"), namespace)
    return namespace["planted"]


def _config(inputs, out_dir, algorithm, overrides):
    from megagsm.testing.tiny_runs import tiny_run_config

    return tiny_run_config(inputs, out_dir, [
        "optim.lr=1e-3", "train.global_batch_size=4", "train.micro_batch_size=2", "train.train_steps=1",
        "train.eval_at_start=true", "train.eval_accuracy=true", "train.eval_max_examples=4",
        "train.save_interval=0", "generation.max_new_tokens=4", "generation.max_batch_size=8",
        "algorithm.gspo.n_rollouts=2", "algorithm.gspo.prompts_per_step=2", "algorithm.gspo.mini_batches=1",
        *overrides], algorithm=algorithm)


def _every_path(inputs, root: str) -> None:
    """Conversion, SFT (TP2+SP) with greedy eval, GSPO (DP2) with generation, batched generation."""
    from megagsm.config.parallel import ParallelConfig
    from megagsm.generation import SamplingParams, generate_batched
    from megagsm.rl.gspo import GSPO
    from megagsm.sft.step import SFT
    from megagsm.testing.tiny_qwen2 import convert, load_converted, make_hf_model, tiny_qwen2_config
    from megagsm.runtime import init_runtime
    from megagsm.train import Trainer

    init_runtime(ParallelConfig(tp=2))
    mcore = convert(make_hf_model(tiny_qwen2_config(), seed=0), None, root, ParallelConfig(tp=2))
    Trainer(_config(inputs, os.path.join(root, "sft"), "sft",
                    ["parallel.tp=2", "parallel.sequence_parallel=true"]), SFT).fit()
    Trainer(_config(inputs, os.path.join(root, "gspo"), "gspo",
                    ["parallel.use_distributed_optimizer=true"]), GSPO).fit()
    init_runtime(ParallelConfig(tp=2))
    model, _ = load_converted(mcore, ParallelConfig(tp=2))
    generate_batched(model, [[3, 4, 5], [6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0),
                     max_batch_size=1)


def _plant_everywhere() -> dict:
    """Plants the line into each path; returns what to restore."""
    from megagsm.checkpoint import hf_to_mcore
    from megagsm.generation import engine
    from megagsm.rl.gspo import GSPO
    from megagsm.sft.step import SFT
    from megagsm.train import trainer

    targets = [(SFT, "train_step", "megagsm.sft.step"), (GSPO, "collect_rollouts", "megagsm.rl.gspo"),
               (hf_to_mcore, "convert_hf_to_mcore", "megagsm.checkpoint.hf_to_mcore"),
               (trainer, "evaluate_model", "megagsm.eval.core"),
               (engine._Generation, "run", "megagsm.generation.engine")]
    saved = {}
    for owner, name, module_name in targets:
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, _planted(module_name, getattr(owner, name)))
    return saved


def _launch(inputs, root):
    import torch
    import torch.distributed as dist

    from megagsm.runtime import collectives
    from megagsm.testing.collective_check import nccl_emulation

    out = {}
    with nccl_emulation() as emu:
        _every_path(inputs, os.path.join(root, "clean"))
        out["clean"] = {"violations": list(emu.violations), "checked": dict(emu.checked)}
    with nccl_emulation() as emu:
        saved = _plant_everywhere()
        try:
            _every_path(inputs, os.path.join(root, "planted"))
        finally:
            for (owner, name), real in saved.items():
                setattr(owner, name, real)
        # inside runtime/collectives.py: a reduction that forgets to move its operand, and one that does
        stray = {"__name__": collectives.__name__, "dist": dist, "torch": torch, "c": collectives}
        exec("def forgot():\n    dist.all_reduce(torch.tensor([1.0]), group=c.dp_group())\n"
             "def moved():\n    return c.reduce_tensor(torch.tensor([1.0]), 'sum', c.dp_group())\n", stray)
        before = len(emu.violations)
        stray["moved"]()
        out["moved_ok"] = len(emu.violations) == before
        stray["forgot"]()
        out["planted"] = list(emu.violations)
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs

    root = tmp_path_factory.mktemp("collectives")
    tiny = DemoSpec(n_train=16, n_test=4, model=TINY_MODEL)
    inputs = prepare_inputs(root / "inputs", tiny)
    return run_ranks(_launch, 2, inputs, str(root), timeout=900)


@pytest.mark.multirank
def test_every_path_gives_collectives_tensors_their_backend_serves(launch):
    for rank in launch:
        assert rank["clean"]["violations"] == []
        checked = rank["clean"]["checked"]
        # the emulation saw the project's collectives: reductions over megatron's groups, objects,
        # the hot-path sites (TP log-softmax in the chunked loss, the sampler's broadcast)
        assert any(k.startswith("megagsm.runtime.collectives.reduce_tensor") for k in checked)
        assert any(k.startswith("megagsm.runtime.collectives.gather_objects") for k in checked)
        assert any(k.startswith("megagsm.sft.fused_ce") for k in checked)
        assert any(k.startswith("megagsm.generation.forward.StageRunner.share") for k in checked)


@pytest.mark.multirank
def test_a_planted_cpu_collective_is_reported_in_every_path(launch):
    for rank in launch:
        planted = rank["planted"]
        for module in ("megagsm.sft.step", "megagsm.rl.gspo", "megagsm.checkpoint.hf_to_mcore",
                       "megagsm.eval.core", "megagsm.generation.engine"):
            assert any(v.startswith(f"{module}.planted: dist.all_reduce outside") for v in planted), module
        assert any(v.startswith("megagsm.runtime.collectives.forgot: dist.all_reduce on an NCCL group")
                   for v in planted)
        assert rank["moved_ok"]
        # nothing but the plants
        assert all(".planted:" in v or ".forgot:" in v for v in planted)
