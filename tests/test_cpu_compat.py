"""The CPU compatibility layer: installed only without CUDA, pinned to megatron-core 0.16.1, and the
CUDA assumptions it covers behave as CPU equivalents. Runs in a spawned process so the global patches
never leak into the rest of the test session."""
import pytest
import torch

from megagsm.testing.multirank import run_ranks


def _probe():
    from megatron.core import tensor_parallel

    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime import cpu_compat, init_runtime

    out = {"installed_before": cpu_compat.is_installed()}
    info = init_runtime(ParallelConfig(), seed=7)
    out["installed"] = cpu_compat.is_installed()
    out["device"] = str(info.device)
    out["backend"] = info.backend
    out["literal_cuda"] = str(torch.zeros(2, device="cuda").device)
    out["current_device"] = str(torch.empty(1, device=torch.cuda.current_device()).device)
    t = torch.ones(2)
    out["cuda_noop"] = t.cuda() is t
    out["to_cuda"] = str(t.to("cuda").device)
    out["type_name"] = torch.nn.Parameter(torch.ones(1)).type()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    ev = torch.cuda.Event()
    ev.record()
    ev.synchronize()
    # megatron's model-parallel RNG: forking must be reproducible and leave the default stream alone
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    out["default_untouched"] = bool(torch.equal(before, torch.get_rng_state()))
    init_runtime(ParallelConfig(), seed=7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    out["fork_reproducible"] = bool(torch.equal(a, b))
    with tensor_parallel.get_cuda_rng_tracker().fork():
        c = torch.rand(3)
    out["fork_advances"] = not torch.equal(b, c)
    # the version pin refuses another megatron
    from megatron.core import package_info

    real = package_info.__version__
    package_info.__version__ = "0.99.0"
    try:
        cpu_compat.check_megatron_version()
        out["version_error"] = ""
    except cpu_compat.CpuCompatError as e:
        out["version_error"] = str(e)
    finally:
        package_info.__version__ = real
    return out


@pytest.fixture(scope="module")
def probe():
    if torch.cuda.is_available():
        pytest.skip("the CPU layer is only installed without CUDA")
    return run_ranks(_probe, 1)[0]


def test_installed_only_once_runtime_starts(probe):
    assert probe["installed_before"] is False
    assert probe["installed"] is True
    assert probe["device"] == "cpu" and probe["backend"] == "gloo"


def test_cuda_placements_land_on_cpu(probe):
    assert probe["literal_cuda"] == "cpu"
    assert probe["current_device"] == "cpu"
    assert probe["to_cuda"] == "cpu"
    assert probe["cuda_noop"] is True


def test_optimizer_type_check_sees_cuda_names(probe):
    assert probe["type_name"] == "torch.cuda.FloatTensor"


def test_rng_tracker_forks_reproducibly(probe):
    assert probe["default_untouched"]
    assert probe["fork_reproducible"]
    assert probe["fork_advances"]


def test_other_megatron_versions_are_refused_by_name(probe):
    assert "0.16.1" in probe["version_error"] and "0.99.0" in probe["version_error"]
