"""Run a function on N local ranks (spawned processes over gloo) and collect each rank's result.

A process launch costs seconds here (importing torch + megatron), so callers should run many cases
inside one launch. Results travel through files read with `torch.load(weights_only=True)`: they may
hold tensors, numbers, strings, lists and dicts.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, out_dir, fn, args, kwargs):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        result = fn(*args, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if torch.distributed.is_initialized():  # importing megatron just to find nothing costs seconds
            try:
                from megagsm.runtime import shutdown_runtime

                shutdown_runtime()
            except Exception:
                pass


def _launch(fn, world_size, args, kwargs, timeout, out_dir):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, out_dir, fn, args, kwargs))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        # a rank that failed leaves its peers blocked in a collective: give them a grace period
        # to fail too, then stop them instead of waiting out the whole timeout
        if failed_at is None and any(p.exitcode not in (None, 0) or _failed(out_dir, r)
                                     for r, p in enumerate(procs)):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
            break
        time.sleep(0.1)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    results, errors = [], []
    for r in range(world_size):
        path = Path(out_dir) / f"rank{r}.pt"
        if not path.exists():
            errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                          f"{', stopped: timed out or a peer failed' if r in hung else ''})")
            results.append(None)
            continue
        record = torch.load(path, weights_only=True)
        if record["ok"]:
            results.append(record["result"])
        else:
            errors.append(f"rank {r}:\n{record['error']}")
            results.append(None)
    return results, errors


_GRACE_S = 30.0


def _failed(out_dir, rank) -> bool:
    path = Path(out_dir) / f"rank{rank}.pt"
    # the file is written in one torch.save at the end; only read it once the writer is done
    return path.exists() and path.stat().st_size > 0 and _is_error(path)


def _is_error(path) -> bool:
    try:
        return not torch.load(path, weights_only=True)["ok"]
    except Exception:
        return False


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 600.0, **kwargs) -> list:
    """fn(*args, **kwargs) on `world_size` spawned ranks; returns the per-rank results in rank order.
    Raises RankFailure with every failing rank's traceback. A launch whose rendezvous port was taken
    between choosing and binding it (other programs on the machine) is retried once on a new port."""
    for attempt in range(2):
        with tempfile.TemporaryDirectory(prefix="megagsm-ranks-") as out_dir:
            results, errors = _launch(fn, world_size, args, kwargs, timeout, out_dir)
        text = "\n".join(errors)
        if errors and attempt == 0 and ("EADDRINUSE" in text or "address already in use" in text):
            continue
        if errors:
            raise RankFailure(text)
        return results
