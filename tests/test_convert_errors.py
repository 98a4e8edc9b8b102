"""Converter input and output errors: one line on stderr, exit status 2, nothing at the output path.
Also: exports honour the umask (group/world readable under umask 022)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megagsm.testing.tiny_hf import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "checkpoints_tools", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def _in_process(capsys, *argv) -> tuple[int, str]:
    from checkpoints_tools import cli

    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1, err
    return code, err[0] if err else ""


def _nothing_at(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("converr")
    make_tiny_hf_model("qwen2", root / "hf")
    nan = root / "hf_nan"
    shutil.copytree(root / "hf", nan)
    tensors = load_file(nan / "model.safetensors")
    tensors[NAN_TENSOR][0, 0] = float("nan")
    tensors[NAN_TENSOR][1, 1] = float("inf")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    for src, out, extra in ((root / "hf", root / "mcore", []), (nan, root / "mcore_nan", ["--allow-nonfinite"])):
        done = _cli("hf-to-mcore", "--hf-dir", src, "--out", out, "--no-progress", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_truncated_safetensors(dirs, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(dirs / "hf", hf)
    weights = hf / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size - 1000])
    line = _line(_cli("hf-to-mcore", "--hf-dir", hf, "--out", tmp_path / "out", "--no-progress"))
    assert f"{weights}: truncated: {size - 1000} bytes, its header needs {size}" in line
    assert _nothing_at(tmp_path / "out")


def test_nan_weight_is_an_error_unless_allowed(dirs, tmp_path, capsys):
    line = _line(_cli("hf-to-mcore", "--hf-dir", dirs / "hf_nan", "--out", tmp_path / "out", "--no-progress"))
    assert f"tensor {NAN_TENSOR} has 1 NaN and 1 Inf value(s)" in line and "--allow-nonfinite" in line
    assert str(dirs / "hf_nan" / "model.safetensors") in line
    assert _nothing_at(tmp_path / "out")
    # the other direction: a checkpoint holding the NaN (converted with --allow-nonfinite)
    code, line = _in_process(capsys, "mcore-to-hf", "--mcore-dir", dirs / "mcore_nan", "--out", tmp_path / "back",
                             "--no-progress")
    assert code == 2 and f"tensor {NAN_TENSOR} has 1 NaN and 1 Inf value(s)" in line
    assert _nothing_at(tmp_path / "back")
    code, _ = _in_process(capsys, "mcore-to-hf", "--mcore-dir", dirs / "mcore_nan", "--out", tmp_path / "back",
                          "--no-progress", "--allow-nonfinite")
    assert code == 0
    back = load_file(tmp_path / "back" / "model.safetensors")[NAN_TENSOR]
    assert torch.isnan(back[0, 0]) and torch.isinf(back[1, 1])


def test_output_under_a_regular_file(dirs, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, line = _in_process(capsys, "mcore-to-hf", "--mcore-dir", dirs / "mcore", "--out", blocker / "sub" / "out",
                             "--no-progress")
    assert code == 2 and line == f"error: {blocker / 'sub' / 'out'}: cannot create it: {blocker} is a file, not a directory"


def test_read_only_output_dir_injected(dirs, tmp_path, capsys, monkeypatch):
    """The permission error an unwritable directory gives (injected: the tests may run as root)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    code, line = _in_process(capsys, "mcore-to-hf", "--mcore-dir", dirs / "mcore", "--out", tmp_path / "out",
                             "--no-progress")
    assert code == 2 and line == f"error: {tmp_path / 'out'}: cannot write there (Permission denied: {tmp_path})"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(dirs, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, line = _in_process(capsys, "mcore-to-hf", "--mcore-dir", dirs / "mcore", "--out", ro / "out",
                             "--no-progress")
    assert code == 2 and f"{ro / 'out'}: cannot write there (Permission denied" in line


def test_checkpoint_without_hf_dir_hints_hf_config_dir(dirs, tmp_path, capsys):
    ckpt = tmp_path / "plain"
    shutil.copytree(dirs / "mcore", ckpt)
    shutil.rmtree(ckpt / "hf")
    (ckpt / "megagsm_checkpoint.json").unlink()  # as plain megatron writes it: no manifest either
    code, line = _in_process(capsys, "mcore-to-hf", "--mcore-dir", ckpt, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "no hf/config.json" in line and "--hf-config-dir" in line
    code, _ = _in_process(capsys, "mcore-to-hf", "--mcore-dir", ckpt, "--out", tmp_path / "out", "--no-progress",
                          "--hf-config-dir", dirs / "hf")
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_honour_the_umask(dirs, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _ = _in_process(capsys, "mcore-to-hf", "--mcore-dir", dirs / "mcore", "--out", tmp_path / "out",
                              "--no-progress")
        assert code == 0
        assert _mode(tmp_path / "out") == 0o755
        for f in (tmp_path / "out").iterdir():
            assert _mode(f) & 0o044 == 0o044, (f.name, oct(_mode(f)))
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                       (0o002, 0o775, 0o664)])
def test_atomic_writes_take_the_umask_mode(tmp_path, umask, dir_mode, file_mode):
    from megagsm.utils.atomic import atomic_dir, write_text_atomic

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "d", collective=False) as tmp:
            assert _mode(tmp) == dir_mode  # mkdtemp alone would give 0700
        write_text_atomic(tmp_path / "f.txt", "x")  # mkstemp alone would give 0600
    finally:
        os.umask(old)
    assert _mode(tmp_path / "d") == dir_mode and _mode(tmp_path / "f.txt") == file_mode


def test_existing_output_is_still_a_file_exists_error(tmp_path):
    from megagsm.errors import UserError
    from megagsm.utils.atomic import atomic_dir

    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError) as info:
        with atomic_dir(tmp_path / "d", collective=False):
            pass
    assert isinstance(info.value, UserError) and "already exists" in str(info.value)
