"""No checkpoint runs code, and a damaged one is named before anything loads from it.

A crafted `.metadata` (a pickle whose reduce calls os.system to create a file) is refused by
`mcore-to-hf`, `verify`, `launch/generate.py --load` and direct torch / megatron reads; the file is
never created. Byte objects inside `.distcp` files and megatron's `common.pt` are refused the same
way. The converter's manifest (sizes, SHA-256 per file, tensor table) catches missing, truncated or
altered shards, and checkpoints without a manifest still get every shard checked against `.metadata`.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megagsm.errors import UserError
from megagsm.testing.tiny_hf import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "megagsm_checkpoint.json"


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


class _Payload:
    """Unpickling this runs `touch marker` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_tiny_hf_model("qwen2", root / "hf")
    done = _run("-m", "checkpoints_tools", "hf-to-mcore", "--hf-dir", root / "hf", "--out", root / "mcore",
                "--no-progress")
    assert done.returncode == 0, done.stderr
    return root


def _copy(converted: Path, tmp_path: Path, manifest: bool = True) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted / "mcore", ckpt)
    if not manifest:
        (ckpt / MANIFEST).unlink()
    return ckpt


def _hostile(converted, tmp_path, manifest=False) -> tuple[Path, Path]:
    ckpt, marker = _copy(converted, tmp_path, manifest), tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return ckpt, marker


def test_payload_really_runs_under_plain_pickle(tmp_path):
    """The test payload is live: plain pickle.load creates the file (so its absence below means something)."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_hostile_metadata_refused_by_mcore_to_hf(converted, tmp_path):
    ckpt, marker = _hostile(converted, tmp_path)
    line = _one_error_line(_run("-m", "checkpoints_tools", "mcore-to-hf", "--mcore-dir", ckpt, "--out",
                                tmp_path / "out", "--no-progress"))
    assert f"{ckpt / '.metadata'}: refused posix.system" in line and "run code" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_hostile_metadata_refused_by_verify(converted, tmp_path):
    ckpt, marker = _hostile(converted, tmp_path)
    line = _one_error_line(_run("-m", "checkpoints_tools", "verify", "--hf-dir", converted / "hf",
                                "--mcore-dir", ckpt))
    assert f"{ckpt / '.metadata'}: refused posix.system" in line
    assert not marker.exists()


def _ids_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"prompt_token_ids": [5, 6, 7]}) + "\n")
    return path


def test_hostile_metadata_refused_by_generate(converted, tmp_path):
    ckpt, marker = _hostile(converted, tmp_path)
    line = _one_error_line(_run(ROOT / "launch" / "generate.py", "--load", ckpt, "--prompts",
                                _ids_prompts(tmp_path), "--max-new-tokens", "2"))
    assert f"{ckpt / '.metadata'}: refused posix.system" in line
    assert not marker.exists()


def test_hostile_metadata_with_manifest_refused_before_unpickling(converted, tmp_path):
    """With the converter's manifest the altered .metadata fails its size/checksum first."""
    ckpt, marker = _hostile(converted, tmp_path, manifest=True)
    line = _one_error_line(_run("-m", "checkpoints_tools", "mcore-to-hf", "--mcore-dir", ckpt, "--out",
                                tmp_path / "out", "--no-progress"))
    assert str(ckpt / ".metadata") in line and MANIFEST in line
    assert not marker.exists()


def test_direct_reads_refuse_hostile_metadata(converted, tmp_path):
    import megagsm.checkpoint  # noqa: F401  (installs the guard)
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    ckpt, marker = _hostile(converted, tmp_path)
    with pytest.raises(UserError, match=r"\.metadata: refused posix\.system"):
        FileSystemReader(str(ckpt)).read_metadata()
    with pytest.raises(UserError, match=r"\.metadata: refused posix\.system"):
        dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert not marker.exists()


def test_guard_still_reads_real_checkpoints(converted):
    """The allowlist admits what torch and megatron write (a converter checkpoint here)."""
    import megagsm.checkpoint  # noqa: F401
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(converted / "mcore")).read_metadata()
    assert "embedding.word_embeddings.weight" in md.state_dict_metadata


def test_hostile_common_pt_refused(converted, tmp_path):
    import megagsm.checkpoint  # noqa: F401
    from megatron.core import dist_checkpointing

    ckpt, marker = _copy(converted, tmp_path), tmp_path / "PWNED"
    (ckpt / "common.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match=r"common\.pt: refused to unpickle"):
        dist_checkpointing.load_common_state_dict(str(ckpt))
    assert not marker.exists()


def test_hostile_byte_object_refused(tmp_path):
    """A ShardedObject's bytes in a .distcp file: DCP's planner would torch.load(weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from megagsm.checkpoint.safe_pickle import reraise_user_errors

    class RawBytesPlanner(DefaultSavePlanner):
        """Stores a BytesIO as its raw bytes, as megatron's planner stores ShardedObjects."""

        def transform_object(self, write_item, object):
            return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)

    marker = tmp_path / "PWNED"
    dcp.save({"rng_state": io.BytesIO(pickle.dumps(_Payload(marker)))}, checkpoint_id=str(tmp_path / "c"),
             planner=RawBytesPlanner(), no_dist=True)
    assert not marker.exists()
    with pytest.raises(UserError, match=r"__0_0\.distcp \(rng_state\): refused to unpickle"):
        with reraise_user_errors():
            dcp.load({"rng_state": io.BytesIO()}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    assert not marker.exists()


def test_manifest_records_files_and_tensors(converted):
    manifest = json.loads((converted / "mcore" / MANIFEST).read_text())
    files = manifest["files"]
    assert ".metadata" in files and "hf/config.json" in files and "common.pt" in files
    for rel, entry in files.items():
        path = converted / "mcore" / rel
        assert entry["bytes"] == path.stat().st_size
        import hashlib

        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    emb = manifest["tensors"]["embedding.word_embeddings.weight"]
    assert emb == {"shape": [300, 64], "dtype": "float32", "bytes": 300 * 64 * 4}


def _a_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("__*.distcp"))[3]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_shard_named(converted, tmp_path, capsys, damage, manifest):
    from checkpoints_tools import cli

    ckpt = _copy(converted, tmp_path, manifest)
    shard = _a_shard(ckpt)
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    code = cli.main(["mcore-to-hf", "--mcore-dir", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"error: {shard}: {damage}" in err[0]
    assert (MANIFEST in err[0]) == manifest and (".metadata" in err[0]) == (not manifest)
    assert not (tmp_path / "out").exists()


def test_altered_shard_fails_checksum(converted, tmp_path, capsys):
    from checkpoints_tools import cli

    ckpt = _copy(converted, tmp_path)
    shard = _a_shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code = cli.main(["mcore-to-hf", "--mcore-dir", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{shard}: SHA-256 differs" in err


def test_damaged_shard_named_by_generate(converted, tmp_path):
    ckpt = _copy(converted, tmp_path)
    shard = _a_shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:10])
    line = _one_error_line(_run(ROOT / "launch" / "generate.py", "--load", ckpt, "--prompts",
                                _ids_prompts(tmp_path), "--max-new-tokens", "2"))
    assert f"{shard}: truncated" in line
