"""glibc malloc tuning (megagsm.runtime.cpu_malloc): a training-like alloc/free cycle stops faulting
fresh pages in after warm-up. Each variant runs in its own process (mallopt is process-wide)."""
import json
import os
import subprocess
import sys

import pytest

_CYCLE = r"""
import json, resource, sys, torch
from megagsm.runtime.cpu_malloc import tune_glibc_malloc
applied = tune_glibc_malloc() if sys.argv[1] == "tuned" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # activation-like blocks, including one above glibc's 32 MiB mmap ceiling (logits)
    blocks = [torch.ones(6 << 20), torch.ones(3 << 20), torch.ones(16 << 20)]
    del blocks
for _ in range(3):
    step()
start = faults()
for _ in range(5):
    step()
print(json.dumps({"faults_per_step": (faults() - start) / 5, "applied": applied}))
"""


def _run(variant):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), MEGAGSM_MALLOC_TUNING="1")
    out = subprocess.run([sys.executable, "-c", _CYCLE, variant], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_allocator_reuses_freed_blocks():
    default, tuned = _run("default"), _run("tuned")
    if not tuned["applied"]:
        pytest.skip("not glibc")
    assert set(tuned["applied"]) == {"M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "M_TOP_PAD"}
    # one step touches 100 MiB = 25600 pages; default glibc re-faults at least the 64 MiB block
    assert default["faults_per_step"] > 10000
    assert tuned["faults_per_step"] < 500
