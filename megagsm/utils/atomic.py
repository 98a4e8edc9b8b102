"""Atomic writes. A directory: build it under `<out>.tmp-XXXX` beside `out`, rename when complete,
remove the temp dir on any error. Collective when torch.distributed is up (every rank writes into
the same temp dir; rank 0 creates and renames it), so a half-written `out` never exists. A text
file: `write_text_atomic`."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist


def write_text_atomic(path, text: str) -> None:
    """Write `text` (utf-8) to `path` through a temp file in the same directory, fsynced, then renamed
    over `path`: a reader sees the old file or the whole new one; the temp file goes on any error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ok(ok: bool) -> bool:
    if not _distributed():
        return ok
    from megagsm.runtime.collectives import all_ranks_true  # runtime imports config, which imports this

    return all_ranks_true(ok)


@contextmanager
def atomic_dir(out, overwrite: bool = False, collective: bool = True):
    """Yields the temp dir path (same on every rank). On success `out` is replaced by it; with
    overwrite=False an existing `out` is an error raised before anything is written.
    collective=False: this process writes alone even when torch.distributed is up."""
    out = Path(out).absolute()
    together = collective and _distributed()
    rank = dist.get_rank() if together else 0
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (choose another path or overwrite)")
    from megagsm.runtime.collectives import barrier, broadcast_object

    tmp_name = [None]
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_name[0] = tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent)
    if together:
        tmp_name[0] = broadcast_object(tmp_name[0], src=0)
    tmp = Path(tmp_name[0])
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        everyone_ok = (_all_ok(ok) if together else ok)
        if rank == 0:
            if everyone_ok:
                if out.exists():
                    old = out.with_name(f"{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
                    out.rename(old)
                    tmp.rename(out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(out)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        if together:
            barrier()
    if not everyone_ok:
        raise RuntimeError(f"another rank failed while writing {out}")
