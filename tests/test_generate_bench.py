"""bench/generate.py runs end to end at a small size and reports the decode roofline consistently."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark end to end: `make test-slow` (and `make gpu-check` on a GPU)
def test_bench_generate_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generate.py"), "--batch", "2", "--prompt-len", "16",
         "--new-tokens", "6", "--repeats", "1", "--hf-caches", "dynamic"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["memory_bandwidth_gb_s"] > 0
    [row] = report["results"]
    assert row["greedy_tokens_equal"] == 1.0  # same weights, fp32, greedy: the same tokens
    # a step reads every weight but the input embedding (untied output layer included) plus the KV
    # cache: 2 x 4 layers x batch 2 x mean context (16 + 3) x 2 KV heads x 64 x 4 bytes
    params = 20454912 - 8192 * 512
    assert row["decode_bytes_per_step"] == round(params * 4 + 2 * 4 * 2 * 19 * 2 * 64 * 4)
    for side in ("megagsm", "transformers"):
        assert 0 < row[f"{side}_decode_frac_of_roofline"] < 1.5
        assert row[f"{side}_decode_tok_s"] > 0
