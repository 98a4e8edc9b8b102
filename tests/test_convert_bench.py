"""bench/convert.py runs end to end (tiny size: the numbers themselves are only meaningful at ~1 GB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark end to end: `make test-slow` (and `make gpu-check` on a GPU)
def test_bench_convert_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "convert.py"), "--hidden", "128", "--ffn", "256", "--vocab", "1000",
         "--heads", "4", "--kv-heads", "2", "--layers", "2", "--repeat", "1", "--workdir", str(tmp_path / "w")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["round_trip_bit_exact"] is True
    for phase in ("plain_copy", "hf_to_mcore", "mcore_to_hf"):
        assert report[phase]["seconds"] > 0 and report[phase]["peak_rss_mb"] > 0 and report[phase]["mb_per_s"] > 0
    assert report["largest_tensor_mb"] == round(1000 * 128 * 2 / 2**20, 1)
    assert set(report["time_vs_copy"]) == {"hf_to_mcore", "mcore_to_hf"}
