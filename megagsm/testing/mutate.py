"""Mutation testing of the core modules: plant one small bug at a time and check the fast tests catch it.

    python -m megagsm.testing.mutate [--module PATH ...] [--max-mutants N] [--jobs J] [--timeout-factor F]

Why a harness of our own: mutmut and cosmic-ray rewrite files in place (or through import hooks) and
run one test command for the whole tree; the tests here spawn ranks (torch.multiprocessing spawn)
that re-import megagsm from disk, and each module has its own small set of covering tests. So each
worker copies the tree once into a temp dir, writes one mutant of one file there, runs only the test
files listed for that module (`TARGETS` in mutation_targets.py: the one table to update when files move) with a
timeout, and restores the file. The real tree is never written.

Mutations (AST-located, applied as a text splice of the node's source segment so the rest of the
file is byte-identical): comparison boundaries and negations, + <-> -, * <-> /, `and` <-> `or`,
`not x` -> x, unary minus removed, int constants off by one (0 <-> 1), float 0.0 <-> 1.0 and x -> 2x,
True <-> False, `.detach()` dropped, mean <-> sum, max <-> min. Code inside raise/assert statements,
log calls, strings and annotations is not mutated (messages, not behaviour).

A mutant is killed when its tests fail, error or time out (a mutant that timed out while the machine's
load average exceeded its core count is run once more with twice the timeout first: on a shared
machine a load spike is not a kill); it survives when they pass. Mutants listed in `EQUIVALENT` (mutation_targets.py: no input can tell them from the original,
each with its reason) are not run. Per module, at most `--max-mutants` of the others are run, sampled
deterministically (seeded by the module path).
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import json
import os
import queue
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megagsm.testing.isolated_pytest import copy_tree, preload, run_tests
from megagsm.testing.mutation_targets import EQUIVALENT, PLANTED, TARGETS

SKIP_CALLS = {"log", "logger", "logging", "warnings", "print"}


@dataclass
class Mutant:
    module: str
    line: int
    col: int
    description: str
    start: tuple[int, int]
    end: tuple[int, int]
    replacement: str
    status: str = "pending"      # killed | survived | timeout | error | equivalent
    seconds: float = 0.0
    line_text: str = ""          # the mutated source line, stripped (what EQUIVALENT entries name)
    why: str = ""                # equivalent: the recorded reason

    def where(self) -> str:
        return f"{self.module}:{self.line}:{self.col + 1}"


def _flip_compare(op: ast.cmpop) -> ast.cmpop | None:
    table = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
    return table[type(op)]() if type(op) in table else None


BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}
ATTRS = {"mean": "sum", "sum": "mean", "max": "min", "min": "max", "amax": "amin", "amin": "amax"}


def _constant_variants(value) -> list:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [{0: 1, 1: 0}.get(value, value + 1)]
    if isinstance(value, float):
        return [{0.0: 1.0, 1.0: 0.0}.get(value, value * 2)]
    return []


def _variants(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """(description, replacement node) for each mutation of this node itself."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = _flip_compare(op)
            if new is not None:
                ops = list(node.ops)
                ops[i] = new
                out.append((f"{type(op).__name__} -> {type(new).__name__}", ast.Compare(node.left, ops, node.comparators)))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOPS:
        new = BINOPS[type(node.op)]()
        desc = f"{type(node.op).__name__} -> {type(new).__name__}"
        out.append((desc, ast.BinOp(node.left, new, node.right) if isinstance(node, ast.BinOp)
                    else ast.AugAssign(node.target, new, node.value)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append((f"{type(node.op).__name__} -> {type(new).__name__}", ast.BoolOp(new, node.values)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append((f"{type(node.op).__name__} removed", node.operand))
    elif isinstance(node, ast.Constant):
        out.extend((f"constant {node.value!r} -> {v!r}", ast.Constant(v)) for v in _constant_variants(node.value))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "detach" and not node.args:
            out.append((".detach() dropped", node.func.value))
    elif isinstance(node, ast.Attribute) and node.attr in ATTRS:
        out.append((f".{node.attr} -> .{ATTRS[node.attr]}", ast.Attribute(node.value, ATTRS[node.attr], node.ctx)))
    return out


def _skipped_subtrees(tree: ast.AST) -> set[int]:
    """ids of nodes whose subtree is not mutated: messages, checks on inputs, docstrings, annotations."""
    skip = set()
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)):
            roots.append(node)
        elif isinstance(node, ast.Call):
            f = node.func
            base = f.value if isinstance(f, ast.Attribute) else f
            if isinstance(base, ast.Name) and base.id in SKIP_CALLS:
                roots.append(node)
        elif isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            roots.append(node.returns)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                roots.append(first)
        for root in roots:
            skip.update(id(n) for n in ast.walk(root))
    return skip


def find_mutants(module: str, source: str, functions: list[str] | None = None) -> list[Mutant]:
    """Every mutant of `source` (the text of `module`), in source order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _skipped_subtrees(tree)
    scopes = [tree]
    if functions is not None:
        scopes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in functions]
        missing = set(functions) - {n.name for n in scopes}
        if missing:
            raise SystemExit(f"mutate: {module} has no top-level {sorted(missing)} (update TARGETS)")
    mutants, seen = [], set()
    for scope in scopes:
        for node in ast.walk(scope):
            if id(node) in skip or id(node) in seen or not hasattr(node, "end_lineno"):
                continue
            seen.add(id(node))
            for description, new in _variants(node):
                text = ast.unparse(ast.fix_missing_locations(new))
                if not isinstance(node, ast.stmt):
                    text = f"({text})"
                mutants.append(Mutant(module, node.lineno, node.col_offset, description,
                                      (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset), text,
                                      line_text=lines[node.lineno - 1].strip()))
    mutants.sort(key=lambda m: (m.line, m.col, m.description))
    return mutants


def apply_mutant(source: str, mutant: Mutant) -> str:
    """The source with the mutant's node replaced (columns are UTF-8 byte offsets, as in ast)."""
    lines = source.encode().splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutant.start, mutant.end
    head = b"".join(lines[:l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + b"".join(lines[l1:])
    out = (head + mutant.replacement.encode() + tail).decode()
    compile(out, mutant.module, "exec")  # a mutant that does not compile is a harness bug
    return out


def _matches(entry: dict, mutant: Mutant) -> bool:
    return (entry["module"] == mutant.module and entry["line"] == mutant.line_text
            and entry["mutation"] == mutant.description and entry.get("col", mutant.col + 1) == mutant.col + 1
            and entry.get("replacement", mutant.replacement) == mutant.replacement)


def split_equivalent(mutants: list[Mutant], table: list[dict]) -> tuple[list[Mutant], list[Mutant]]:
    """(mutants to run, mutants that `table` records as equivalent, status "equivalent" + the reason)."""
    run, equivalent = [], []
    for m in mutants:
        entry = next((e for e in table if _matches(e, m)), None)
        if entry is None:
            run.append(m)
        else:
            m.status, m.why = "equivalent", entry["why"]
            equivalent.append(m)
    return run, equivalent


def stale_equivalents(root: Path, table: list[dict]) -> list[dict]:
    """Entries of `table` that name no mutant of the tree at `root` (the code moved: update the table)."""
    found = {}
    for module in {e["module"] for e in table}:
        path = root / module
        found[module] = find_mutants(module, path.read_text()) if path.is_file() else []
    return [e for e in table if not any(_matches(e, m) for m in found[e["module"]])]


def sample(mutants: list[Mutant], limit: int | None, seed: str) -> list[Mutant]:
    if limit is None or len(mutants) <= limit:
        return mutants
    chosen = random.Random(seed).sample(range(len(mutants)), limit)
    return [mutants[i] for i in sorted(chosen)]


def _print(*args):
    print(*args, flush=True)


@dataclass
class Report:
    mutants: list[Mutant] = field(default_factory=list)
    equivalent: list[Mutant] = field(default_factory=list)   # recorded in EQUIVALENT: not run
    baseline: dict = field(default_factory=dict)     # module -> {"status", "seconds"}
    seconds: float = 0.0

    @property
    def caught(self) -> int:
        return sum(m.status in ("killed", "timeout") for m in self.mutants)

    @property
    def judged(self) -> int:
        return sum(m.status in ("killed", "timeout", "survived") for m in self.mutants)

    @property
    def score(self) -> float:
        return self.caught / self.judged if self.judged else 0.0

    def text(self) -> str:
        rows = ["module                                     caught / run   survived"]
        for module in dict.fromkeys(m.module for m in self.mutants):
            ms = [m for m in self.mutants if m.module == module]
            c = sum(m.status in ("killed", "timeout") for m in ms)
            rows.append(f"{module:<42} {c:>6} / {len(ms):<5} {sum(m.status == 'survived' for m in ms):>6}")
        for module, b in self.baseline.items():
            if b["status"] != "passed":
                rows.append(f"{module:<42} SKIPPED: its tests {b['status']} without a mutant")
        survivors = [m for m in self.mutants if m.status == "survived"]
        rows.append(f"\nsurvivors ({len(survivors)}):")
        rows += [f"  {m.where():<45} {m.description}" for m in survivors]
        errors = [m for m in self.mutants if m.status == "error"]
        rows += [f"  ERROR {m.where()} {m.description}" for m in errors]
        if self.equivalent:
            rows.append(f"\nnot run, recorded as equivalent in mutation_targets.EQUIVALENT ({len(self.equivalent)}):")
            rows += [f"  {m.where():<45} {m.description}" for m in self.equivalent]
        rows.append(f"\nscore: {self.caught}/{self.judged} caught = {100 * self.score:.1f}%  "
                    f"({self.seconds / 60:.1f} min)")
        return "\n".join(rows)


def run(root: Path, targets: dict[str, dict], max_mutants: int | None = None, jobs: int = 1,
        timeout_factor: float = 3.0, progress=None, fork: bool = False,
        equivalent: list[dict] | None = None) -> Report:
    """Mutation-test `targets` (TARGETS' format) of the tree at `root`; the tree is only read.
    fork: preload the heavy packages here and fork a test run per mutant (see `run_tests`).
    equivalent: EQUIVALENT's format; those mutants are recorded, not run (default: none)."""
    progress = progress or _print
    if fork:
        preload()
    start = time.perf_counter()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="megagsm-mutate-") as tmp:
        trees = queue.Queue()
        for j in range(jobs):
            trees.put(copy_tree(root, Path(tmp) / f"tree{j}"))
        planned = []
        for module, spec in targets.items():
            source = (root / module).read_text()
            found, skipped = split_equivalent(find_mutants(module, source, spec.get("functions")), equivalent or [])
            report.equivalent += skipped
            limit = min(x for x in (max_mutants, spec.get("max_mutants"), len(found)) if x is not None)
            planned.append((module, spec, source, sample(found, limit, module)))
            progress(f"{module}: {len(planned[-1][3])} of {len(found)} mutants"
                     + (f" ({len(skipped)} more recorded as equivalent)" if skipped else ""))

        def baseline(key):
            tests, slow = key
            tree = trees.get()
            try:
                status, seconds = run_tests(tree, list(tests), 1800, fork, slow)
            finally:
                trees.put(tree)
            progress(f"baseline {' '.join(tests)}: {status} in {seconds:.0f}s")
            return key, {"status": status, "seconds": seconds}

        def one(mutant, source, tests, timeout, slow):
            tree = trees.get()
            path = tree / mutant.module
            try:
                path.write_text(apply_mutant(source, mutant))
                status, mutant.seconds = run_tests(tree, tests, timeout, fork, slow)
                if status == "timeout" and os.getloadavg()[0] > (os.cpu_count() or 1):
                    # once more, with room for the load spike (a real hang then costs 3 timeouts)
                    status, mutant.seconds = run_tests(tree, tests, 2 * timeout, fork, slow)
            finally:
                path.write_text(source)
                trees.put(tree)
            mutant.status = {"passed": "survived", "failed": "killed"}.get(status, status)
            progress(f"{mutant.status:>8} {mutant.where()} {mutant.description} ({mutant.seconds:.0f}s)")
            return mutant

        with cf.ThreadPoolExecutor(jobs) as pool:
            # the unmutated tests, once per distinct test list (modules often share one)
            keys = {module: (tuple(spec["tests"]), bool(spec.get("slow"))) for module, spec, _, _ in planned}
            by_tests = dict(pool.map(baseline, dict.fromkeys(keys.values())))
            report.baseline = {module: by_tests[keys[module]] for module, _, _, _ in planned}
            futures = []
            for module, spec, source, mutants in planned:
                base = report.baseline[module]
                if base["status"] != "passed":
                    continue
                timeout = max(timeout_factor * base["seconds"], base["seconds"] + 30)
                futures += [pool.submit(one, m, source, spec["tests"], timeout, bool(spec.get("slow")))
                            for m in mutants]
            report.mutants = [f.result() for f in futures]
    report.seconds = time.perf_counter() - start
    return report


def run_planted(root: Path, planted: list[dict], jobs: int = 1, progress=None, fork: bool = False) -> list[dict]:
    """Each planted bug in a temp copy of the tree: [{name, module, status}], status killed|survived|..."""
    progress = progress or _print
    if fork:
        preload()
    with tempfile.TemporaryDirectory(prefix="megagsm-planted-") as tmp:
        trees = queue.Queue()
        for j in range(jobs):
            trees.put(copy_tree(root, Path(tmp) / f"tree{j}"))

        def one(bug):
            source = (root / bug["module"]).read_text()
            if source.count(bug["old"]) != 1:
                return {**bug, "status": "error: text not found exactly once (update PLANTED)"}
            tree = trees.get()
            try:
                (tree / bug["module"]).write_text(source.replace(bug["old"], bug["new"]))
                status, seconds = run_tests(tree, bug["tests"], 600, fork)
            finally:
                (tree / bug["module"]).write_text(source)
                trees.put(tree)
            status = {"passed": "survived", "failed": "killed"}.get(status, status)
            progress(f"{status:>8} {bug['name']} ({seconds:.0f}s)")
            return {**bug, "status": status}

        with cf.ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, planted))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megagsm.testing.mutate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="modules (TARGETS):\n  " + "\n  ".join(TARGETS))
    p.add_argument("--module", action="append", help="only this module (repeatable; default: all of TARGETS)")
    p.add_argument("--max-mutants", type=int, default=None, help="at most N mutants per module, sampled "
                   "deterministically (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="per-mutant timeout: max(F x the unmutated run, that + 30 s) (default 3)")
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2], help="repository root")
    p.add_argument("--json", type=Path, help="also write every mutant and its status here")
    p.add_argument("--no-fork", action="store_true", help="a fresh interpreter per test run (default: fork "
                   "this process after importing torch/megatron/transformers once: ~5 s less per mutant)")
    p.add_argument("--planted", action="store_true", help="instead: plant each bug of PLANTED (issue 17's "
                   "weak spots) and check its tests catch it")
    p.add_argument("--fail-under", type=float, default=0.0, help="exit 1 if the score (%%) is below this")
    args = p.parse_args(argv)
    if args.planted:
        results = run_planted(args.root, PLANTED, args.jobs, fork=not args.no_fork)
        for r in results:
            print(f"{r['status']:>8}  {r['name']}  ({r['module']}; {', '.join(r['tests'])})")
        return 0 if all(r["status"] in ("killed", "timeout") for r in results) else 1
    targets = TARGETS
    if args.module:
        unknown = [m for m in args.module if m not in TARGETS]
        if unknown:
            p.error(f"--module {unknown[0]}: not in TARGETS (choose from {', '.join(TARGETS)})")
        targets = {m: TARGETS[m] for m in args.module}
    report = run(args.root, targets, args.max_mutants, args.jobs, args.timeout_factor, fork=not args.no_fork,
                 equivalent=EQUIVALENT)
    print(report.text())
    for e in stale_equivalents(args.root, EQUIVALENT):  # the code moved: review the entry
        print(f"stale EQUIVALENT entry (no such mutant now): {e['module']}: {e['mutation']} in {e['line']!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"score": report.score, "seconds": report.seconds,
                                         "baseline": report.baseline,
                                         "mutants": [asdict(m) for m in report.mutants],
                                         "equivalent": [asdict(m) for m in report.equivalent]}, indent=1))
    return 1 if 100 * report.score < args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
