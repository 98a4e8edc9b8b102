"""Run a function on N local ranks (spawned processes over gloo) and collect each rank's result.

A process launch costs seconds here (importing torch + megatron), so callers should run many cases
inside one launch. Results travel through files read with `torch.load(weights_only=True)`: they may
hold tensors, numbers, strings, lists and dicts.
"""
from __future__ import annotations

import os
import socket
import tempfile
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
        try:
            from megagsm.runtime import shutdown_runtime

            shutdown_runtime()
        except Exception:
            pass


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 600.0, **kwargs) -> list:
    """fn(*args, **kwargs) on `world_size` spawned ranks; returns the per-rank results in rank order.
    Raises RankFailure with every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="megagsm-ranks-") as out_dir:
        procs = [
            ctx.Process(target=_child, args=(r, world_size, port, out_dir, fn, args, kwargs))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                              f"{', timed out' if r in hung else ''})")
                results.append(None)
                continue
            record = torch.load(path, weights_only=True)
            if record["ok"]:
                results.append(record["result"])
            else:
                errors.append(f"rank {r}:\n{record['error']}")
                results.append(None)
        if errors:
            raise RankFailure("\n".join(errors))
        return results
