"""One round of the GSPO bench: each path generates its own rollouts (for its generate time), then
each path trains on the same rollouts (the first path's), so the update and log-prob times compare
identical work (used by bench/gspo_step.py).

A path is a GSPO algorithm object built on the shared trainer with that path's config; its step is the
trainer's own `GSPO.train_step`, with `collect_rollouts` answering the round's rollouts.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import megagsm.rl.gspo as gspo_module
from bench.gspo_workload import forced_lengths, rl_modules, skewed_lengths


@dataclass
class BenchPath:
    name: str
    cfg: object                          # RunConfig
    algorithm: object = None             # GSPO on the shared trainer, with this cfg
    rounds: list[dict] = field(default_factory=list)

    def best(self) -> dict:
        return min(self.rounds, key=lambda r: r["step_s"])


@contextlib.contextmanager
def configured(trainer, cfg):
    """The trainer's cfg is `cfg` for the duration (GSPO reads trainer.cfg when it is built)."""
    saved = trainer.cfg
    trainer.cfg = cfg
    try:
        yield
    finally:
        trainer.cfg = saved


def build_paths(trainer, cfgs: dict, two_pass: bool) -> list[BenchPath]:
    import dataclasses

    paths = []
    for name, cfg in cfgs.items():
        with configured(trainer, cfg):
            algorithm = gspo_module.GSPO(trainer)
        if two_pass:  # the old-log-prob pass even when exactly on-policy (the baseline of the skip)
            algorithm.spec = dataclasses.replace(algorithm.spec, on_policy=False)
        paths.append(BenchPath(name, cfg, algorithm))
    return paths


def _lengths_for(step: int, cap: int):
    """Lengths of a call's sequences (prompt-major, as the engine numbers them), the same for every
    path at one step."""
    return lambda prompts, params: skewed_lengths(len(prompts) * params.n, cap, seed=1000 + step)


def generate(path: BenchPath, trainer, step: int, lengths: str):
    """(rollouts, stats, (wall, cpu) seconds): the path's collect_rollouts (generation and scoring) at `step`."""
    cap = path.cfg.generation.max_new_tokens
    forcing = forced_lengths(rl_modules(), _lengths_for(step, cap)) if lengths == "skewed" else contextlib.nullcontext()
    with configured(trainer, path.cfg), forcing:
        started, cpu = time.perf_counter(), time.process_time()
        rollouts, stats = path.algorithm.collect_rollouts(step)
        seconds = time.perf_counter() - started, time.process_time() - cpu
    return rollouts, stats, seconds


def train(path: BenchPath, trainer, step: int, rollouts, stats) -> tuple[dict, float]:
    """The path's train_step on the given rollouts: (metrics row, its CPU seconds)."""
    algorithm = path.algorithm
    algorithm.collect_rollouts = lambda _step: (rollouts, stats)
    try:
        with configured(trainer, path.cfg):
            cpu = time.process_time()
            row = algorithm.train_step(step)
            cpu = time.process_time() - cpu
    finally:
        del algorithm.collect_rollouts   # back to the class's method
    return row, cpu


def run_round(paths: list[BenchPath], trainer, step: int, lengths: str) -> None:
    """Appends one round's figures to every path's `rounds`."""
    generated = [generate(p, trainer, step, lengths) for p in paths]
    rollouts, stats, _ = generated[0]
    for path, (_, own_stats, (gen_s, gen_cpu)) in zip(paths, generated):
        row, train_cpu = train(path, trainer, step, rollouts, stats)
        path.rounds.append({
            "step_s": gen_s + row["step_time"], "generate_s": own_stats.time_generate,
            "score_s": own_stats.time_score, "logprob_s": row["time_logprob"], "update_s": row["time_update"],
            "train_s": row["step_time"], "step_cpu_s": gen_cpu + train_cpu, "generate_cpu_s": gen_cpu,
            # the trainer's metric (absent before packed microbatches, train.max_tokens_per_microbatch)
            "padded_token_fraction": row.get("padded_token_fraction"),
            "generated_tokens": int(sum(own_stats.lengths)), "row": row,
        })
