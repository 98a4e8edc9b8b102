"""Atomic writes. A directory: build it under `<out>.tmp-XXXX` beside `out`, rename when complete,
remove the temp dir on any error. Collective when torch.distributed is up (every rank writes into
the same temp dir; rank 0 creates and renames it), so a half-written `out` never exists. A text
file: `write_text_atomic`.

`mkdtemp` / `mkstemp` create owner-only entries (0700 / 0600); what they make here is given the
mode an ordinary mkdir / open would (0777 / 0666 minus the umask), so under umask 022 an export
is readable by the group and others, as any other file the user writes.
A path that cannot be written (read-only directory, a regular file where a directory must be, an
existing output) is an OutputPathError (a UserError naming the path)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from megagsm.errors import UserError


class OutputPathError(UserError):
    """The output path cannot be created or written."""


class OutputExistsError(OutputPathError, FileExistsError):
    """The output exists and overwriting was not asked for."""


def current_umask() -> int:
    """The process umask: from /proc (no race with other threads), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool) -> int:
    return (0o777 if directory else 0o666) & ~current_umask()


def _output_error(path: Path, error: OSError) -> OutputPathError:
    """A one-line error naming the path at fault (the first existing non-directory above it, when
    that is the cause)."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return OutputPathError(f"{path}: cannot create it: {parent} is a file, not a directory")
    reason = error.strerror or type(error).__name__
    where = next((p for p in path.parents if p.exists()), path.parent)
    return OutputPathError(f"{path}: cannot write there ({reason}: {where})")


def make_temp_dir(out: Path) -> Path:
    """A fresh `<out>.tmp-XXXX` beside `out` (parents created), with the umask's directory mode."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise _output_error(out, e) from None
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


def write_text_atomic(path, text: str) -> None:
    """Write `text` (utf-8) to `path` through a temp file in the same directory, fsynced, then renamed
    over `path`: a reader sees the old file or the whole new one; the temp file goes on any error."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        os.fchmod(fd, umask_mode(directory=False))
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
        raise OutputExistsError(f"{out}: already exists (choose another path or overwrite)")
    from megagsm.runtime.collectives import barrier, broadcast_object

    tmp_name = [None]
    if rank == 0:
        try:
            tmp_name[0] = str(make_temp_dir(out))
        except OutputPathError as e:
            tmp_name[0] = e
    if together:
        tmp_name[0] = broadcast_object(tmp_name[0], src=0)
    if isinstance(tmp_name[0], OutputPathError):
        raise OutputPathError(str(tmp_name[0]))
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
        from megagsm.errors import PeerFailedError

        raise PeerFailedError(f"another rank failed while writing {out}")
