"""`python -m checkpoints_tools`: help, bad input (exit 2, one line, nothing written), happy paths.

Real subprocesses for the cheap error paths and one conversion; the rest runs the same `main()` inside
2 spawned ranks (one launch) to keep the suite fast. torchrun itself is exercised in a slow test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megagsm.testing.multirank import run_ranks
from megagsm.testing.tiny_hf import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "checkpoints_tools", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_hf_model("llama", root / "llama")
    make_tiny_hf_model("llama", root / "llama_other", seed=1)     # same shapes, other weights
    make_tiny_hf_model("qwen2", root / "one_group", num_key_value_heads=1)  # cannot split at tp=2
    unknown = root / "unknown"
    shutil.copytree(root / "llama", unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "mamba9"
    (unknown / "config.json").write_text(json.dumps(cfg))

    def edited(name, edit):
        d = root / name
        shutil.copytree(root / "llama", d)
        tensors = load_file(d / "model.safetensors")
        edit(tensors)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    edited("bad_shape", lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    edited("missing", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    edited("leftover", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}))
    return root


def test_help_documents_every_flag():
    from checkpoints_tools.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "verify" in a.choices).choices
    assert set(subparsers) == {"hf-to-mcore", "mcore-to-hf", "verify"}
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                assert action.option_strings[-1] in text
    flags = {a.option_strings[-1] for a in subparsers["hf-to-mcore"]._actions if a.option_strings}
    assert {"--hf-dir", "--out", "--tp", "--pp", "--ep"} <= flags


def test_cli_bad_input_exits_2_with_one_line(hf_dirs, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["hf-to-mcore", "--hf-dir", tmp_path / "nope", "--out", out], "nope: no such directory"),
        (["hf-to-mcore", "--hf-dir", hf_dirs / "unknown", "--out", out], "known: deepseek_v2, deepseek_v3, gemma, llama, qwen2, qwen2_moe, qwen3, qwen3_moe, seed_oss"),
        (["hf-to-mcore", "--hf-dir", hf_dirs / "llama", "--out", out, "--tp", "2"], "torchrun --nproc-per-node 2"),
        (["mcore-to-hf", "--mcore-dir", hf_dirs / "nope", "--out", out], "no such directory"),
        (["hf-to-mcore", "--hf-dir", hf_dirs / "llama", "--out", hf_dirs / "unknown"], "already exists"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
        assert _no_leftovers(out)


def test_cli_subprocess_converts(hf_dirs, tmp_path):
    out = tmp_path / "llama.mcore"
    done = _cli("hf-to-mcore", "--hf-dir", hf_dirs / "llama", "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["model_type"] == "llama" and summary["bytes"] > 0
    assert (out / "metadata.json").is_file() and (out / ".metadata").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / "hf" / name).is_file(), name
    assert not (out / "hf" / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp-*"))


def _in_ranks(hf, work):
    """CLI commands run through cli.main on every rank, as torchrun would run them."""
    import contextlib
    import io

    import torch.distributed as dist

    from checkpoints_tools import cli

    def call(*argv):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main([str(a) for a in argv], keep_process_group=True)
        return {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}

    res = {}
    for name in ("bad_shape", "missing", "leftover"):
        res[name] = call("hf-to-mcore", "--hf-dir", f"{hf}/{name}", "--out", f"{work}/{name}.out", "--no-progress")
    res["layout"] = call("hf-to-mcore", "--hf-dir", f"{hf}/one_group", "--out", f"{work}/layout.out", "--tp", "2")
    # tp=1 on 2 ranks: data-parallel replicas, only the main replica of each tensor writes it
    res["convert"] = call("hf-to-mcore", "--hf-dir", f"{hf}/llama", "--out", f"{work}/m", "--no-progress")
    res["verify_tp2"] = call("verify", "--hf-dir", f"{hf}/llama", "--mcore-dir", f"{work}/m", "--tp", "2")
    res["verify_pp2"] = call("verify", "--hf-dir", f"{hf}/llama", "--mcore-dir", f"{work}/m", "--pp", "2",
                             "--seq-len", "8")
    res["verify_wrong"] = call("verify", "--hf-dir", f"{hf}/llama_other", "--mcore-dir", f"{work}/m")
    res["export"] = call("mcore-to-hf", "--mcore-dir", f"{work}/m", "--out", f"{work}/back", "--no-progress")
    dist.barrier()
    # a failure in the middle of writing: nothing at the output path, no temp dir left behind
    from megagsm.checkpoint import hf_to_mcore

    calls = {"n": 0}
    real = hf_to_mcore.read_region

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    hf_to_mcore.read_region = failing
    try:
        call("hf-to-mcore", "--hf-dir", f"{hf}/llama", "--out", f"{work}/crash", "--tp", "2", "--no-progress")
        res["crash"] = "no error"
    except BaseException as e:  # noqa: BLE001 - DCP wraps failures in CheckpointException(BaseException)
        res["crash"] = type(e).__name__
    finally:
        hf_to_mcore.read_region = real
    return res


@pytest.mark.multirank
def test_cli_commands_on_two_ranks(hf_dirs, tmp_path):
    results = run_ranks(_in_ranks, 2, str(hf_dirs), str(tmp_path))
    r0, r1 = results
    expect = {
        "bad_shape": "model.layers.1.self_attn.k_proj.weight has shape [16, 64] but the config implies [32, 64]",
        "missing": "model.layers.0.mlp.up_proj.weight missing",
        "leftover": "model.layers.0.mlp.extra.weight has no megatron mapping",
        "layout": "num_key_value_heads=1 is not divisible by tp=2",
    }
    for case, message in expect.items():
        assert r0[case]["code"] == 2 and r1[case]["code"] == 2, (case, r0[case])
        lines = r0[case]["stderr"].strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (case, r0[case]["stderr"])
        assert r1[case]["stderr"] == ""  # one line in all, from rank 0
        assert _no_leftovers(tmp_path / f"{case}.out")
    assert r0["convert"]["code"] == 0, r0["convert"]["stderr"]
    for case in ("verify_tp2", "verify_pp2"):
        assert r0[case]["code"] == 0 and r1[case]["code"] == 0, r0[case]
        report = json.loads(r0[case]["stdout"].strip().splitlines()[-1])
        assert report["ok"] and report["argmax_match"] == 1.0 and report["max_abs_logit_diff"] < 1e-5
    wrong = json.loads(r0["verify_wrong"]["stdout"].strip().splitlines()[-1])
    assert r0["verify_wrong"]["code"] == 1 and not wrong["ok"] and wrong["max_abs_logit_diff"] > 1e-3
    assert r0["export"]["code"] == 0 and r1["export"]["code"] == 0
    original, back = load_file(hf_dirs / "llama" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    assert r0["crash"] != "no error" and r1["crash"] != "no error"
    assert _no_leftovers(tmp_path / "crash")


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    make_tiny_hf_model("gemma", tmp_path / "gemma")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "-m", "checkpoints_tools"]
    out = tmp_path / "m"
    for args in (["hf-to-mcore", "--hf-dir", tmp_path / "gemma", "--out", out, "--tp", "2", "--no-progress"],
                 ["verify", "--hf-dir", tmp_path / "gemma", "--mcore-dir", out, "--pp", "2"]):
        done = subprocess.run([*base, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] < 1e-5
