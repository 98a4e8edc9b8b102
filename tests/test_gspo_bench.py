"""bench/gspo_step.py: its arguments, forced lengths and baseline knobs, and a tiny run end to end."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench.{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_defaults_and_refusals():
    step = _bench("gspo_step")
    args = step.parse_args([])
    assert (args.shape, args.prompts, args.n, args.new_tokens, args.lengths) == ("20m", 8, 8, 128, "fixed")
    assert args.steps == 2 and args.micro_batch_size == 8 and args.gen_batch == 64
    assert not args.vs_trl and args.hf_dir is None and args.load is None and args.data is None
    for bad in (["--vs-trl"],                                              # TRL needs the HF weights
                ["--vs-trl", "--hf-dir", "x", "--lengths", "skewed"],       # TRL cannot force lengths
                ["--vs-trl", "--hf-dir", "x", "--mini-batches", "2"],
                ["--prompts", "3", "--n", "3", "--micro-batch-size", "2"],  # 9 rollouts in rows of 2
                ["--lengths", "uniform"]):
        with pytest.raises(SystemExit) as e:
            step.parse_args(bad)
        assert e.value.code == 2, bad


def test_skewed_lengths_long_tail():
    work = _bench("gspo_workload")
    cap = 400
    lengths = work.skewed_lengths(20000, cap, seed=3)
    t = torch.tensor(lengths, dtype=torch.float64)
    assert t.min() >= 1 and t.max() == cap
    assert 95 <= t.median() <= 105                       # a quarter of the cap
    assert 0.04 <= (t == cap).double().mean() <= 0.065   # ~5% run to the cap
    assert work.skewed_lengths(20000, cap, seed=3) == lengths   # every path of a step gets the same lengths
    assert work.skewed_lengths(20000, cap, seed=4) != lengths


def test_baseline_knobs_follow_the_config_fields():
    work = _bench("gspo_workload")

    @dataclasses.dataclass
    class Train:
        micro_batch_size: int = 1
        max_tokens_per_microbatch: int | None = None

    @dataclasses.dataclass
    class Generation:
        max_new_tokens: int = 8

    @dataclasses.dataclass
    class Run:
        train: Train = dataclasses.field(default_factory=Train)
        generation: Generation = dataclasses.field(default_factory=Generation)

    assert work.available_knobs(Run()) == {"train.max_tokens_per_microbatch": "0"}
    from megagsm.config import load_config

    cfg = load_config(None, [])
    expected = {key for key, field in (("train.max_tokens_per_microbatch", cfg.train),
                                       ("generation.continuous_batching", cfg.generation))
                if hasattr(field, key.split(".")[1])}
    assert set(work.available_knobs(cfg)) == expected


def test_forced_lengths_reach_the_engine_argument_and_are_undone():
    work = _bench("gspo_workload")
    seen = []

    def engine(model, prompts, params, tokenizer=None, *, max_batch_size=1, response_lengths=None):
        seen.append(response_lengths)
        return "out"

    def other(model, prompts, params):  # a generation function without the argument: left alone
        return "other"

    def passing(model, prompts, params, **kwargs):  # hands its kwargs on to the engine
        return "passing"

    engine.__module__ = other.__module__ = passing.__module__ = "megagsm.generation.fake"
    rl = types.ModuleType("megagsm.rl.fake")
    rl.engine, rl.other = engine, other
    through_kwargs = types.ModuleType("megagsm.rl.kwargs")
    through_kwargs.passing = passing
    assert bool(work.forcing_entries([through_kwargs])) == work.engine_takes_lengths()
    params = types.SimpleNamespace(n=3)
    with work.forced_lengths([rl], lambda prompts, p: list(range(1, len(prompts) * p.n + 1))) as names:
        assert names == ["engine"] and rl.other is other
        assert rl.engine("model", [[1], [2]], params, None, max_batch_size=4) == "out"
        rl.engine("model", [[1]], params, response_lengths=[9, 9, 9])  # a caller's own lengths win
    assert seen == [[1, 2, 3, 4, 5, 6], [9, 9, 9]]
    assert rl.engine is engine
    empty = types.ModuleType("megagsm.rl.empty")
    empty.other = other
    with pytest.raises(SystemExit, match="response_lengths"):
        with work.forced_lengths([empty], lambda *a: []):
            pass


def _run_bench(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gspo_step.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs
    from megagsm.testing.tiny_runs import hf_model_dir

    root = tmp_path_factory.mktemp("gspo-bench")
    inputs = prepare_inputs(root / "inputs", DemoSpec(n_train=16, n_test=2, model=TINY_MODEL))
    return hf_model_dir(inputs["base"], root / "hf"), inputs["train"]


@pytest.mark.slow  # a benchmark end to end (~25 s): `make test-slow`
def test_bench_gspo_smoke_on_an_hf_dir(tiny_hf):
    hf, train = tiny_hf
    report = _run_bench("--hf-dir", hf, "--data", train, "--template", "bare", "--prompts", "2", "--n", "2",
                        "--new-tokens", "4", "--max-prompt-len", "40", "--micro-batch-size", "2", "--gen-batch", "4",
                        "--steps", "1", "--threads", "1")
    assert report["rollouts"] == 4 and report["model"].startswith(f"hf {hf}")
    for key in ("step_s", "generate_s", "update_s", "baseline_step_s", "speedup", "step_cpu_s"):
        assert report[key] > 0, key
    assert report["logprob_s"] >= 0
    if "train.max_tokens_per_microbatch" in report["baseline_knobs"]:   # the trainer reports its padding
        assert 0 <= report["padded_token_fraction"] < 1 and 0 <= report["baseline"]["padded_token_fraction"] < 1
    # the step is the sum of its phases (plus scoring and batching)
    assert report["step_s"] >= report["generate_s"] + report["update_s"]
    # (of the rounded times)
    assert report["speedup"] == pytest.approx(report["baseline_step_s"] / report["step_s"], rel=0.05)
    assert 0 < report["response_tokens"] <= 4 * 4
    assert report["share_prompts"] is True   # the trainer's default on SDPA attention


@pytest.mark.slow  # a benchmark end to end (~25 s)
def test_bench_gspo_skewed_lengths_smoke(tiny_hf):
    if not _bench("gspo_workload").engine_takes_lengths():
        pytest.skip("the generation engine has no response_lengths argument yet")
    hf, train = tiny_hf
    report = _run_bench("--hf-dir", hf, "--data", train, "--template", "bare", "--prompts", "2", "--n", "4",
                        "--new-tokens", "8", "--max-prompt-len", "40", "--micro-batch-size", "4", "--gen-batch", "4",
                        "--steps", "1", "--threads", "1", "--lengths", "skewed")
    # the one timed round is step 1: its sequences stop at the lengths drawn for it (or earlier, at a
    # sampled EOS), far below the 8 x 8 tokens a random model runs to without them
    forced = _bench("gspo_workload").skewed_lengths(8, 8, seed=1001)
    assert report["lengths"] == "skewed" and 8 <= report["response_tokens"] <= sum(forced) < 8 * 8
    assert report["step_s"] > 0 and report["baseline_step_s"] > 0


@pytest.mark.slow  # TRL's trainer side by side (~60 s); needs trl (the `bench` extra)
def test_bench_gspo_vs_trl_smoke(tiny_hf):
    pytest.importorskip("trl")
    hf, train = tiny_hf
    report = _run_bench("--hf-dir", hf, "--data", train, "--template", "bare", "--prompts", "2", "--n", "2",
                        "--new-tokens", "4", "--max-prompt-len", "40", "--micro-batch-size", "2", "--gen-batch", "4",
                        "--steps", "1", "--threads", "1", "--vs-trl")
    assert report["trl_prompt_ids_equal"] == 1.0   # TRL tokenises the same prompt texts to the same ids
    assert report["trl_step_s"] > 0 and 0 < report["trl_completion_tokens"] <= 4 * 4
    assert report["speedup_vs_trl"] == pytest.approx(report["trl_step_s"] / report["step_s"], rel=0.05)
