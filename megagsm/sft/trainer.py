"""Supervised fine-tuning on GSM8K-style data with megatron-core: build -> loop -> evaluate -> save.

`run_sft(cfg)` runs on every rank (launched by torchrun / srun through launch/train.py). The mechanics
are megatron's own, wired in `megagsm.models.training`: DDP + (distributed) optimizer, the pipeline
schedules of `get_forward_backward_func` over `num_microbatches` microbatches (gradient accumulation),
per-token loss normalisation. This module adds the run around them: data, LR schedule, evaluation,
checkpoints (resume=auto), metrics and the final HF export.

Optional pieces plug in through two hooks (other modules own them):
- train.lora.enabled -> `megagsm.sft.lora.apply_lora(chunks, lora_cfg)` freezes the base weights and
  adds adapters, before DDP wraps the chunks;
- train.loss=chunked (default) -> `megagsm.sft.fused_ce.chunked_lm_forward_step(train.loss_chunk_size)`:
  the model's forward stops at the hidden states and the loss is computed in token chunks, on loss
  tokens only (memory-efficient vocab-parallel cross entropy); train.loss=plain -> `lm_forward_step`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from megagsm.config import RunConfig, save_config
from megagsm.config.train import TrainConfig
from megagsm.models.builder import build_model
from megagsm.models.training import build_optimizer, lm_forward_step, train_step, wrap_ddp
from megagsm.runtime import init_runtime
from megagsm.sft import checkpoint as ckpt
from megagsm.sft.data import (MicrobatchStream, build_dataset, eval_microbatches, length_multiple,
                              load_examples, load_tokenizer)
from megagsm.sft.evaluation import gsm8k_accuracy, make_generate_fn, validation_loss
from megagsm.sft.export import export_hf, hf_side_files_writer
from megagsm.sft.optim import build_scheduler, current_lr, optimizer_config
from megagsm.utils.logging import MetricsWriter, get_logger, is_rank0, plot_metrics, progress

log = get_logger(__name__)
PHASE = "sft"


@dataclass
class SFTResult:
    steps: int = 0
    losses: dict[int, float] = field(default_factory=dict)          # step -> training loss
    accuracy: dict[int, float] = field(default_factory=dict)        # step -> held-out accuracy
    val_loss: dict[int, float] = field(default_factory=dict)
    checkpoint: str | None = None
    hf_export: str | None = None
    resumed_from: str | None = None


def apply_lora_hook(chunks: list, cfg: RunConfig) -> list:
    if not cfg.train.lora.enabled:
        return chunks
    from megagsm.sft.lora import apply_lora  # branch `sftlora`

    return apply_lora(chunks, cfg.train.lora, seed=cfg.train.seed)


def forward_step_hook(train: TrainConfig):
    """The megatron forward_step_func for train.loss."""
    if train.loss == "plain":
        return lm_forward_step
    from megagsm.sft.fused_ce import chunked_lm_forward_step  # branch `sftlora`

    return chunked_lm_forward_step(train.loss_chunk_size)


class SFTRun:
    """The state of one run on this rank: model, optimizer, data, writers."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t, d = cfg.train, cfg.data
        self.info = init_runtime(cfg.parallel, seed=t.seed)
        if is_rank0():
            os.makedirs(t.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(t.output_dir, "config.yaml"))
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_dir)
        built = build_model(cfg.model, cfg.parallel, self.info.device, work_dir=t.output_dir)
        self.hf_config, self.dtype = built.hf_config, built.dtype
        self.chunks = wrap_ddp(apply_lora_hook(built.chunks, cfg), cfg.parallel)
        self.optimizer = build_optimizer(self.chunks, optimizer_config(cfg.optim, cfg.parallel, self.dtype))
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, t.train_steps)
        self.forward_step = forward_step_hook(cfg.train)

        train_examples, self.held_out = load_examples(d)
        if t.eval_max_examples:
            self.held_out = self.held_out[:t.eval_max_examples]
        self.train_set = build_dataset(train_examples, self.tokenizer, d, "train")
        self.eval_set = build_dataset(self.held_out, self.tokenizer, d, "eval") if self.held_out else None
        dp = self.info.dp_size
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        self.multiple = length_multiple(cfg.parallel)
        self.pad_id = self.train_set.pad_id if hasattr(self.train_set, "pad_id") else self.tokenizer.pad_token_id
        self.stream = MicrobatchStream(self.train_set, self.pad_id, t.micro_batch_size, self.num_microbatches,
                                       d.seq_length, self.multiple, self.info.dp_rank, dp, seed=t.seed)
        self.metrics = MetricsWriter(t.output_dir)
        self.save_dir = t.checkpoint_dir()
        self.result = SFTResult()
        self.step = 0

    # ------------------------------------------------------------------ setup

    def restore(self) -> None:
        t = self.cfg.train
        path = ckpt.resolve_resume(t.resume, self.save_dir)
        if path is not None:
            state = ckpt.load_checkpoint(path, self.chunks, self.optimizer, self.scheduler)
            self.stream.load_state_dict(state.sampler)
            self.step = state.iteration
            self.result.resumed_from = path
            log.info("resumed from %s at step %d", path, self.step)
        elif self.cfg.model.load:
            ckpt.load_weights(self.cfg.model.load, self.chunks)
            log.info("initial weights from %s", self.cfg.model.load)
        self.metrics.rewind(self.step if path is not None else -1)  # one metrics row per step

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        if self.eval_set is None:
            return {}
        t, d = self.cfg.train, self.cfg.data
        metrics = {}
        batches, length = eval_microbatches(self.eval_set, self.pad_id, t.micro_batch_size, d.seq_length,
                                            self.multiple, self.info.dp_rank, self.info.dp_size)
        val = validation_loss(self.chunks, batches, length, t.micro_batch_size, self.forward_step)
        if val is not None:
            metrics["val_loss"] = val
            self.result.val_loss[self.step] = val
        if t.eval_accuracy:
            try:
                generate = make_generate_fn(self.chunks, self.tokenizer, self.cfg.generation)
                acc = gsm8k_accuracy(self.held_out, self.tokenizer, generate, d,
                                     self.cfg.generation.max_new_tokens)
            except NotImplementedError as e:
                log.warning("accuracy not evaluated: %s", e)
            else:
                metrics["accuracy"] = acc.accuracy
                self.result.accuracy[self.step] = acc.accuracy
                for sample in acc.samples[:1]:
                    log.info("sample at step %d: %r -> %r (reference %s)", self.step, sample["question"][-80:],
                             sample["completion"][:120], sample["reference"])
        if metrics:
            log.info("eval at step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ loop

    def train(self) -> SFTResult:
        t = self.cfg.train
        self.restore()
        if t.eval_at_start and self.step == 0:
            row = self.evaluate()
            if row:
                self.metrics.log(PHASE, 0, row)
        bar = progress(total=t.train_steps, desc="sft", initial=self.step)
        saved_at = None
        while self.step < t.train_steps:
            started = time.perf_counter()
            batch = self.stream.next_step()
            out = train_step(self.chunks, self.optimizer, batch.microbatches, self.num_microbatches,
                             batch.seq_length, t.micro_batch_size, forward_step_func=self.forward_step)
            lr = current_lr(self.optimizer)  # the lr this update used
            self.scheduler.step(1)
            self.step += 1
            elapsed = time.perf_counter() - started
            row = {"loss": out.loss, "lr": lr, "tokens": out.num_tokens, "step_time": elapsed,
                   "tokens_per_s": out.num_tokens / max(elapsed, 1e-9)}
            if out.grad_norm is not None:
                row["grad_norm"] = out.grad_norm
            self.result.losses[self.step] = out.loss
            if t.due(t.eval_interval, self.step):
                row.update(self.evaluate())
            self.metrics.log(PHASE, self.step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # the bar's own pace
            if self.step % t.log_interval == 0:
                log.debug("step %d loss %.4f lr %.3e grad_norm %s", self.step, out.loss, lr, out.grad_norm)
            if t.due(t.save_interval, self.step):
                self.save()
                saved_at = self.step
        bar.close()
        if saved_at != self.step and self.step > 0:
            if self.result.resumed_from and ckpt.read_trainer_state(self.result.resumed_from).iteration == self.step:
                self.result.checkpoint = self.result.resumed_from  # resumed a finished run: nothing new
            else:
                self.save()
        self.result.steps = self.step
        return self.result

    def save(self) -> None:
        state = ckpt.TrainerState(iteration=self.step, consumed_samples=self.step * self.cfg.train.global_batch_size,
                                  sampler=self.stream.state_dict())
        self.result.checkpoint = ckpt.save_checkpoint(
            self.save_dir, state, self.chunks, self.optimizer, self.scheduler,
            keep_last_n=self.cfg.train.keep_last_n, write_extra=hf_side_files_writer(self.hf_config, self.tokenizer))

    def finish(self) -> SFTResult:
        t = self.cfg.train
        if t.export_hf and self.result.checkpoint is not None:
            source = self.result.checkpoint
            if t.lora.enabled:  # fold the adapters into the base weights: the HF model has no adapters
                from megagsm.sft.lora import merge_lora  # branch `sftlora`

                merge_lora(self.chunks)
                source = ckpt.save_weights(os.path.join(t.output_dir, "merged_weights"), self.chunks,
                                           write_extra=hf_side_files_writer(self.hf_config, self.tokenizer))
            self.result.hf_export = export_hf(source, os.path.join(t.output_dir, "hf"))
        self.metrics.close()
        if is_rank0():
            jsonl = os.path.join(t.output_dir, "metrics.jsonl")
            if os.path.exists(jsonl):
                plot_metrics(jsonl, os.path.join(t.output_dir, "sft_metrics.png"),
                             ["loss", "val_loss", "accuracy", "lr"], phase=PHASE)
        return self.result


def run_sft(cfg: RunConfig) -> SFTResult:
    """Train, evaluate, checkpoint and export as `cfg` says. Collective: call on every rank."""
    run = SFTRun(cfg)
    run.train()
    return run.finish()
