"""bench/sft.py: the transformers side sees the same SFT targets, and the bench runs end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_sft", ROOT / "bench" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_labels_give_the_same_masked_loss():
    bench = _bench_module()
    g = torch.Generator().manual_seed(0)
    b, s, vocab = 3, 12, 17
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    mask = torch.ones(b, s)
    mask[:, :5] = 0.0    # prompt
    mask[1, 9:] = 0.0    # right padding
    mask[:, -1] = 0.0    # transformers has no target for the last position: padded batches end masked
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    logits = torch.randn(b, s, vocab, generator=g)
    ours = (F.cross_entropy(logits.reshape(-1, vocab), batch["labels"].reshape(-1), reduction="none")
            * mask.view(-1)).sum() / mask.sum()
    labels = bench.hf_labels(batch)
    # transformers' causal-LM loss: logits[:, t] predict labels[:, t + 1], -100 ignored, token mean
    theirs = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, theirs)
    assert int((labels != -100).sum()) == int(mask.sum())


def test_bench_sft_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sft.py"), "--batch", "2", "--seq", "192", "--repeats", "1",
         "--no-memory"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["workload"] == "gsm8k_sft" and report["megagsm_train_loss"] == "chunked"
    assert 0.2 < report["loss_token_fraction"] < 0.9      # prompt tokens carry no loss
    assert report["all_tokens"]["loss_token_fraction"] == 1.0
    for figures in (report, report["all_tokens"]):
        assert figures["megagsm_tokens_per_s"] > 0 and figures["transformers_tokens_per_s"] > 0
        # both start from random init over the same vocabulary: losses near ln(vocab) on both sides
        for loss in figures["first_loss"].values():
            assert abs(loss - torch.log(torch.tensor(8192.0)).item()) < 1.0


@pytest.mark.slow  # a benchmark end to end: `make test-slow` (and `make gpu-check` on a GPU)
def test_bench_sft_megagsm_only_bf16_smoke():
    """The GPU MFU mode's code path (bf16 model with fp32 main params, no transformers loop), on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sft.py"), "--batch", "2", "--seq", "192", "--repeats", "1",
         "--dtype", "bf16", "--megagsm-only", "--no-memory"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dtype"] == "bfloat16" and report["params"] == 20454912
    assert "ratio" not in report and "transformers_tokens_per_s" not in report
    assert report["megagsm_tokens_per_s"] > 0 and 0 < report["megagsm_frac_of_matmul_peak"]
