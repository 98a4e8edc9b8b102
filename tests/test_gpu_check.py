"""scripts/gpu_check.sh (make gpu-check) on a machine without a GPU: one line, exit 0, nothing run; and
its flow on a "GPU" machine (nvidia-smi stubbed) with a budget too small for the benchmarks: the
gpu-marked tests run (skipped without CUDA), every step prints one JSON line, and the lines are
appended to bench/RESULTS.md under the device's name."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp_path) -> Path:
    repo = tmp_path / "repo"
    for rel in ("scripts", "megagsm", "tests/test_gpu.py", "bench/RESULTS.md", "pyproject.toml"):
        src, dst = ROOT / rel, repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return repo


def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(0o755)


def test_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    repo = _copy(tmp_path)
    bin_dir, marker = tmp_path / "bin", tmp_path / "python-ran"
    _stub(bin_dir, "nvidia-smi", "exit 9\n")                       # present, but lists no GPU
    _stub(bin_dir, "python-stub", f"touch {marker}\nexit 1\n")
    before = (repo / "bench/RESULTS.md").read_text()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_PYTHON": str(bin_dir / "python-stub")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert len(proc.stdout.strip().splitlines()) == 1 and "no NVIDIA GPU" in proc.stdout
    assert not marker.exists()
    assert (repo / "bench/RESULTS.md").read_text() == before


def test_flow_prints_one_json_line_per_step_and_appends_them(tmp_path):
    repo = _copy(tmp_path)
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "nvidia-smi", 'echo "NVIDIA H200"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_PYTHON": sys.executable,
           "GPU_CHECK_BUDGET_S": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert [l["check"] for l in lines] == ["gpu_tests", "sft_mfu", "decode_roofline", "gspo_step"]
    assert all("budget" in l["error"] for l in lines)               # 1 s: nothing had time to run
    assert proc.returncode == 1
    appended = (repo / "bench/RESULTS.md").read_text().split("## make gpu-check: NVIDIA H200")[-1]
    assert sum(l.startswith("{") for l in appended.splitlines()) == 4


@pytest.mark.slow
def test_gpu_tests_step_reports_the_marker_run(tmp_path):
    """Only the gpu_tests step: tests/test_gpu.py collected under the gpu marker, all skipped (no CUDA)."""
    repo = _copy(tmp_path)
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "nvidia-smi", 'echo "NVIDIA H200"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_PYTHON": sys.executable,
           "GPU_CHECK_STEPS": "gpu_tests", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert line["check"] == "gpu_tests" and line["tests"] == line["skipped"] >= 6 and not line["failed_tests"]
