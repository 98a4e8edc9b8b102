"""Run pytest on a copy of the repository, isolated: its own process group, a timeout that kills the
run and every rank it spawned, and optionally forked from a process that imported torch, megatron
and transformers once (a fresh interpreter spends seconds on those imports before any test runs).
Used by the mutation harness (megagsm.testing.mutate)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path


def copy_tree(root: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.egg-info", ".hypothesis")
    shutil.copytree(root, dest, ignore=ignore, symlinks=True)
    return dest


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]
FAST_ONLY = ["-m", "not slow"]   # unless a run asks for the slow tests it names too
PRELOAD = ("torch", "numpy", "pytest", "hypothesis", "safetensors", "transformers", "megatron.core",
           "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.distributed")
_OWN_PACKAGES = ("megagsm", "checkpoints_tools", "tests", "conftest", "launch", "bench")


def preload() -> None:
    """Import the heavy third-party packages once in this process: forked test runs then skip the
    seconds each import costs. Never the project's own packages (those are what gets mutated)."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional package: the test run imports it itself (or skips)
            pass


def _forked_pytest(tree: Path, args: list[str]) -> int:
    """Child side of a forked run: forget the project's modules, run pytest in `tree`, never return."""
    rc = 3
    try:
        os.setsid()  # own process group: a timeout kills pytest and every rank it spawned
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for name in [n for n in sys.modules if n.split(".")[0] in _OWN_PACKAGES]:
            del sys.modules[name]
        # ranks started with multiprocessing's spawn re-import the parent's __main__: give them none
        sys.modules["__main__"] = types.ModuleType("__main__")
        os.chdir(tree)
        sys.path.insert(0, str(tree))
        sys.dont_write_bytecode = True
        os.environ.update(PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
        import pytest

        rc = int(pytest.main(args))
    finally:
        os._exit(rc)


def _wait(pid: int, timeout: float) -> int | None:
    """Exit code of child `pid`, or None after killing its process group at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for kill in (lambda: os.killpg(pid, 9), lambda: os.kill(pid, 9)):
                try:
                    kill()
                except OSError:
                    pass
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def run_tests(tree: Path, tests: list[str], timeout: float, fork: bool = False,
              slow: bool = False) -> tuple[str, float]:
    """(status, seconds) of pytest on `tests` inside `tree`: passed | failed | timeout | error.
    fork: run pytest in a fork of this (preloaded) process instead of a fresh interpreter.
    slow: also run the tests marked slow among `tests` (by default they are deselected)."""
    args = [*PYTEST_ARGS, *([] if slow else FAST_ONLY), *tests]
    start = time.perf_counter()
    if fork:
        pid = os.fork()
        if pid == 0:
            _forked_pytest(tree, args)
        rc = _wait(pid, timeout)
    else:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        rc = _wait(proc.pid, timeout)
        proc.returncode = rc  # reaped above
    if rc is None:
        return "timeout", time.perf_counter() - start
    status = {0: "passed", 1: "failed", 5: "error"}.get(rc, "failed")  # 2/3/4: collection/import errors
    return status, time.perf_counter() - start
