"""The one trainer: runtime, model, optimizer, metrics, evaluation and checkpoints around an algorithm.

`Trainer(cfg, Algorithm).fit()` runs on every rank (launch/train.py under torchrun / srun). What
differs between SFT and GSPO is the algorithm object (megagsm.sft.step.SFT, megagsm.rl.gspo.GSPO): it builds its
data from the trainer's parts and runs one training step. Everything else is here, the same for both:

1. init: process groups and seeds, the model (`model.init`: random or HF weights), LoRA adapters
   (`train.lora.enabled`), megatron DDP + (distributed) optimizer + LR schedule, metrics writers;
2. restore: `train.resume=auto|none|PATH` continues a run exactly (model, optimizer, scheduler, data
   position, RNG); without a checkpoint to resume, `model.load` gives the initial weights;
3. loop: `algorithm.train_step(step)`, one LR-scheduler step per step, evaluation every
   `train.eval_interval` steps (greedy held-out accuracy + the algorithm's own metrics), a checkpoint
   every `train.save_interval`, metrics to metrics.jsonl / TensorBoard, a progress bar;
4. finish: a final checkpoint, the HF export (`train.export_hf`, LoRA merged first; the adapters
   alone also in PEFT's format under <output_dir>/hf_adapter), the plots.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from megagsm.checkpoint.export import export_hf
from megagsm.checkpoint.manager import CheckpointManager, TrainerState, read_trainer_state
from megagsm.checkpoint.manifest import hf_side_files_writer
from megagsm.checkpoint.model_weights import save_mcore_checkpoint
from megagsm.checkpoint.peft_export import export_peft_adapter
from megagsm.config import RunConfig, save_config
from megagsm.data.from_config import load_run_examples
from megagsm.eval import EvalSampling, evaluate_model
from megagsm.models.gpt import unwrap_model
from megagsm.models.lora import apply_lora, merge_lora
from megagsm.models.provider import load_tokenizer
from megagsm.models.training import build_optimizer, wrap_ddp
from megagsm.runtime import init_runtime
from megagsm.train.model import build_model
from megagsm.train.optim import build_scheduler, current_lr, optimizer_config
from megagsm.utils.logging import get_logger, progress
from megagsm.rewards import scorer_for
from megagsm.utils.metrics import MetricsWriter
from megagsm.utils.plots import plot_metrics
from megagsm.utils.rank import is_rank0

log = get_logger(__name__)


class Algorithm(Protocol):
    """What a training algorithm adds to the trainer (megagsm.sft.step.SFT, megagsm.rl.gspo.GSPO)."""

    phase: str                 # metrics phase and progress-bar label
    plot_keys: list[str]       # metrics drawn in <output_dir>/<phase>_metrics.png
    samples_per_step: int      # consumed_samples per step in the trainer state
    needs_initial_policy: bool  # model.load must be applied even when resuming (GSPO's KL reference)

    def __init__(self, trainer: Trainer) -> None: ...
    def on_initial_policy(self) -> None: ...                 # after the initial weights, before a resume
    def train_step(self, step: int) -> dict: ...              # one step from `step` (0-based): a metrics row
    def evaluate(self, step: int) -> dict: ...                # the algorithm's own eval metrics
    def progress(self, row: dict) -> dict: ...                # progress-bar fields
    def data_state(self) -> dict: ...
    def load_data_state(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    steps: int = 0
    history: dict[int, dict] = field(default_factory=dict)   # step -> metrics row (0: before training)
    checkpoint: str | None = None
    hf_export: str | None = None
    hf_adapter: str | None = None   # LoRA runs: the adapters alone, in PEFT's format
    resumed_from: str | None = None

    def metric(self, name: str) -> dict[int, float]:
        """{step: value} of one metric over the steps that logged it."""
        return {step: row[name] for step, row in sorted(self.history.items()) if name in row}


class Trainer:
    """One run on this rank: its parts (attributes below) and its loop."""

    def __init__(self, cfg: RunConfig, algorithm: type[Algorithm]):
        self.cfg = cfg
        t = cfg.train
        check = getattr(algorithm, "check_config", None)
        if check is not None:
            check(cfg)  # before any process group: a bad value costs no startup
        self.info = init_runtime(cfg.parallel, seed=t.seed)
        if is_rank0():
            os.makedirs(t.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(t.output_dir, "config.yaml"))
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_dir)
        built = build_model(cfg.model, cfg.parallel, self.info.device, work_dir=t.output_dir)
        self.hf_config, self.dtype = built.hf_config, built.dtype
        chunks = apply_lora(built.chunks, t.lora, seed=t.seed) if t.lora.enabled else built.chunks
        self.chunks = wrap_ddp(chunks, cfg.parallel)
        self.optimizer = build_optimizer(self.chunks, optimizer_config(cfg.optim, cfg.parallel, self.dtype))
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, t.train_steps)
        # megatron pads the embedding table (to a multiple of tp and more): those rows are not tokens
        model_vocab = unwrap_model(self.chunks[0]).vocab_size
        self.vocab_limit = len(self.tokenizer) if len(self.tokenizer) < model_vocab else None
        self.train_examples, self.held_out = load_run_examples(cfg.data)
        if t.eval_max_examples:
            self.held_out = self.held_out[:t.eval_max_examples]
        self.eval_scorer = scorer_for(t.eval_reward, cfg.algorithm.gspo.reward_method,
                                      [e.data_source for e in self.held_out])
        self.metrics = MetricsWriter(t.output_dir)
        self.checkpoints = CheckpointManager(
            t.checkpoint_dir(), t.keep_last_n,
            hf_side_files_writer(self.hf_config, self.tokenizer, writer="trainer",
                                 vocab_size=self.hf_config.get("vocab_size"),
                                 written_with={"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep}))
        self.result = TrainResult()
        self.step = 0
        self.algorithm = algorithm(self)

    # ------------------------------------------------------------------ setup
    def restore(self) -> None:
        """Resume (train.resume), or start from model.load; the algorithm sees the initial policy
        in between (GSPO snapshots its KL reference there)."""
        path = self.checkpoints.resume_path(self.cfg.train.resume)
        if self.cfg.model.load and (path is None or self.algorithm.needs_initial_policy):
            self.checkpoints.load_weights(self.cfg.model.load, self.chunks)
        self.algorithm.on_initial_policy()
        if path is not None:
            state = self.checkpoints.load(path, self.chunks, self.optimizer, self.scheduler)
            self.algorithm.load_data_state(state.sampler)
            self.step, self.result.resumed_from = state.iteration, path
            log.info("resumed from %s at step %d", path, self.step)
        self.metrics.rewind(self.step if path is not None else -1)  # one metrics row per step

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        t = self.cfg.train
        started = time.perf_counter()
        row = self.algorithm.evaluate(self.step)
        if t.eval_accuracy and self.held_out:
            d, gen = self.cfg.data, self.cfg.generation
            sampling = EvalSampling(n=t.eval_n, temperature=t.eval_temperature, top_p=t.eval_top_p,
                                    max_new_tokens=gen.max_new_tokens, seed=gen.seed + self.step)
            result = evaluate_model(self.chunks, self.held_out, self.tokenizer, self.eval_scorer, sampling,
                                    template=d.prompt_template, max_prompt_len=d.max_prompt_len,
                                    truncation=d.truncation, max_batch_size=gen.max_batch_size,
                                    vocab_limit=self.vocab_limit, keep_samples=True,
                                    continuous_batching=gen.continuous_batching)
            row.update(result.metrics())
            for sample in result.samples[:1]:
                log.info("sample at step %d: %r -> %r (reference %s)", self.step,
                         self.held_out[sample["index"]].question[-80:], sample["response"][:120],
                         sample["ground_truth"])
        if row:
            row["time_eval"] = time.perf_counter() - started
            log.info("eval at step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return row

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """restore -> loop -> final save, export and plots. Collective: call on every rank."""
        t = self.cfg.train
        self.restore()
        if t.eval_at_start and self.step == 0:
            row = self.evaluate()
            if row:
                self.metrics.log(self.algorithm.phase, 0, row)
                self.result.history[0] = row
        bar = progress(total=t.train_steps, desc=self.algorithm.phase, initial=self.step)
        saved_at = None
        while self.step < t.train_steps:
            started = time.perf_counter()
            lr = current_lr(self.optimizer)  # the lr this step's updates use
            row = self.algorithm.train_step(self.step)
            self.scheduler.step(1)
            self.step += 1
            row.setdefault("step_time", time.perf_counter() - started)
            row["lr"] = lr
            if t.due(t.eval_interval, self.step):
                row.update(self.evaluate())
            self.metrics.log(self.algorithm.phase, self.step, row)
            self.result.history[self.step] = row
            bar.update(1)
            bar.set_postfix(self.algorithm.progress(row), refresh=False)  # the bar's own pace
            if self.step % t.log_interval == 0:
                log.debug("step %d: %s", self.step, row)
            if t.due(t.save_interval, self.step):
                self.save()
                saved_at = self.step
        bar.close()
        if saved_at != self.step and self.step > 0:
            resumed = self.result.resumed_from
            if resumed and read_trainer_state(resumed).iteration == self.step:
                self.checkpoints.latest = resumed  # resumed a finished run: nothing new to save
            else:
                self.save()
        self.result.steps = self.step
        self.result.checkpoint = self.checkpoints.latest
        return self.finish()

    def save(self) -> str:
        state = TrainerState(iteration=self.step, consumed_samples=self.step * self.algorithm.samples_per_step,
                             sampler=self.algorithm.data_state())
        return self.checkpoints.save(state, self.chunks, self.optimizer, self.scheduler)

    def finish(self) -> TrainResult:
        t = self.cfg.train
        if t.export_hf and self.result.checkpoint is not None:
            source = self.result.checkpoint
            if t.lora.enabled:  # fold the adapters into the base weights: the HF model has no adapters
                # ... after writing them alone in PEFT's format, for the HF base model
                self.result.hf_adapter = export_peft_adapter(self.chunks, os.path.join(t.output_dir, "hf_adapter"),
                                                             t.lora, self.hf_config, base_model=self.cfg.model.hf_dir)
                merge_lora(self.chunks)
                source = os.path.join(t.output_dir, "merged_weights")
                save_mcore_checkpoint(self.chunks, source, hf_files_from=self.result.checkpoint, overwrite=True,
                                      writer="trainer (LoRA merged)")
            self.result.hf_export = export_hf(source, os.path.join(t.output_dir, "hf"))
        self.metrics.close()
        jsonl = os.path.join(t.output_dir, "metrics.jsonl")
        if is_rank0() and os.path.exists(jsonl):
            plot_metrics(jsonl, os.path.join(t.output_dir, f"{self.algorithm.phase}_metrics.png"),
                         self.algorithm.plot_keys, phase=self.algorithm.phase,
                         counts={"accuracy": len(self.held_out)} if self.held_out else None)
        return self.result
