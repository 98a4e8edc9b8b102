"""GSPO with in-process rollouts: generate -> score -> advantages -> old log-probs -> update -> save.

`run_gspo(cfg)` runs on every rank (launch/train.py with algorithm.name=gspo). One step:
1. the step's `prompts_per_step` prompts (megagsm.rl.rollout: placement over DP ranks and
   mini-batches), `n_rollouts` samples each from the model being trained (megagsm.generation, at
   the training layout, same weights, no copy),
2. rewards (registered reward function) and group-normalised advantages; groups whose rewards are
   all equal carry no signal: counted, and dropped when `filter_zero_std_groups`,
3. old log-probs (and reference ones when kl_coef > 0) by a forward-only pass over the update's own
   microbatches, then `ppo_epochs` x `mini_batches` optimizer steps of the GSPO loss through
   megatron's schedules (megagsm.rl.update),
4. metrics (reward, accuracy, lengths, clip fraction, KL, entropy, time split, tokens/s), held-out
   accuracy by greedy decoding every `eval_interval` steps, checkpoints as in SFT (resume=auto).

The LR schedule steps once per GSPO step (optim.warmup_steps counts GSPO steps, as in verl).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.config import RunConfig, save_config
from megagsm.config.errors import ConfigError
from megagsm.data.prompts import encode_prompt
from megagsm.generation.mode import unwrap
from megagsm.models.builder import build_model
from megagsm.models.training import build_optimizer, wrap_ddp
from megagsm.rl.batching import Rollouts, build_minibatches, comm_device, compute_advantages
from megagsm.rl.reference import ReferencePolicy
from megagsm.rl.rollout import (PromptSchedule, Scorer, check_placement, generate_rollouts, rank_share,
                                rollout_seed, sampling_params, stop_token_ids)
from megagsm.rl.update import LossSpec, MetricSums, compute_log_probs, update_policy
from megagsm.runtime import init_runtime
from megagsm.sft import checkpoint as ckpt
from megagsm.sft.data import length_multiple, load_examples, load_tokenizer
from megagsm.sft.evaluation import gsm8k_accuracy, make_generate_fn
from megagsm.sft.optim import build_scheduler, current_lr, optimizer_config
from megagsm.utils.logging import MetricsWriter, get_logger, is_rank0, plot_metrics, progress

log = get_logger(__name__)
PHASE = "gspo"
UPDATE_METRICS = ["entropy", "logprob_diff_gen", "pg_clipfrac", "ratio_mean", "seq_ratio_mean",
                  "approx_kl_k1", "approx_kl_k3", "kl_loss"]
PLOT_KEYS = ["reward_mean", "accuracy", "rollout_accuracy", "response_length", "entropy"]


class GSPORun:
    """The state of one GSPO run on this rank."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        g, t = cfg.algorithm.gspo, cfg.train
        if cfg.parallel.cp > 1 or (cfg.parallel.vpp or 1) > 1:
            raise ConfigError("algorithm.name=gspo needs parallel.cp=1 (a sequence's ratio must stay on one "
                              "rank) and parallel.vpp unset (generation runs one model chunk per rank)")
        self.info = init_runtime(cfg.parallel, seed=t.seed)
        check_placement(g.prompts_per_step, g.mini_batches, self.info.dp_size)
        if is_rank0():
            os.makedirs(t.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(t.output_dir, "config.yaml"))
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_dir)
        built = build_model(cfg.model, cfg.parallel, self.info.device)
        self.hf_config, self.dtype = built.hf_config, built.dtype
        self.chunks = wrap_ddp(built.chunks, cfg.parallel)
        self.optimizer = build_optimizer(self.chunks, optimizer_config(cfg.optim, cfg.parallel, self.dtype))
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, t.train_steps)
        self.train_set, self.held_out = load_examples(cfg.data)
        if t.eval_max_examples:
            self.held_out = self.held_out[:t.eval_max_examples]
        self.schedule = PromptSchedule(len(self.train_set), g.prompts_per_step, t.seed)
        self.share = rank_share(g.prompts_per_step, g.mini_batches, self.info.dp_size, self.info.dp_rank)
        self.scorer = Scorer(g.reward, g.reward_method)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # megatron pads the embedding table (to a multiple of tp and more): those rows are not tokens
        model_vocab = unwrap(self.chunks[0]).vocab_size
        self.vocab_limit = len(self.tokenizer) if len(self.tokenizer) < model_vocab else None
        gen = cfg.generation
        self.spec = LossSpec(g.loss_mode, g.clip_ratio_low, g.clip_ratio_high, g.loss_agg_mode, g.kl_coef,
                             gen.temperature if gen.temperature > 0 else 1.0, self.vocab_limit,
                             float(gen.max_new_tokens))
        self.multiple = length_multiple(cfg.parallel)
        self.metrics = MetricsWriter(t.output_dir)
        self.save_dir = t.checkpoint_dir()
        self.reference: ReferencePolicy | None = None
        self.resumed_from: str | None = None
        self.checkpoint: str | None = None
        self.history: dict[int, dict] = {}
        self._prompts: dict[int, list[int]] = {}
        self.step = 0

    # ------------------------------------------------------------------ setup
    def restore(self) -> None:
        path = ckpt.resolve_resume(self.cfg.train.resume, self.save_dir)
        if self.cfg.model.load:  # the policy to start from (e.g. the SFT run's last checkpoint)
            ckpt.load_weights(ckpt.resolve_resume(self.cfg.model.load, self.cfg.model.load), self.chunks)
        if self.cfg.algorithm.gspo.kl_coef > 0:
            self.reference = ReferencePolicy(self.chunks)  # the initial policy, before any resume
        if path is not None:
            saved_optimizer = ckpt.read_trainer_state(path).extra.get("optimizer_saved", True)
            state = ckpt.load_checkpoint(path, self.chunks, self.optimizer if saved_optimizer else None,
                                         self.scheduler)
            self.step, self.resumed_from = state.iteration, path
            log.info("resumed from %s at step %d", path, self.step)
        self.metrics.rewind(self.step if path is not None else -1)  # one metrics row per step

    def prompt(self, index: int) -> list[int]:
        if index not in self._prompts:
            ids = encode_prompt(self.train_set[index].question, self.tokenizer, self.cfg.data.prompt_template)
            limit = self.cfg.data.max_prompt_len
            if len(ids) > limit:
                if self.cfg.data.truncation == "error":
                    raise ValueError(f"prompt of training example {index} has {len(ids)} tokens > "
                                     f"data.max_prompt_len={limit} (data.truncation=error)")
                ids = ids[-limit:] if self.cfg.data.truncation == "left" else ids[:limit]
            self._prompts[index] = ids
        return self._prompts[index]

    # ------------------------------------------------------------------ one step
    def collect_rollouts(self) -> tuple[Rollouts, dict]:
        g, gen = self.cfg.algorithm.gspo, self.cfg.generation
        indices = self.schedule.step_indices(self.step)
        mine = [(k, indices[pos]) for k, pos in self.share]
        started = time.perf_counter()
        params = sampling_params(gen, g.n_rollouts, stop_token_ids(self.tokenizer),
                                 rollout_seed(gen.seed + self.cfg.train.seed, self.step, self.info.dp_rank))
        out = generate_rollouts(self.chunks, [self.prompt(i) for _, i in mine], params, self.tokenizer,
                                max_batch_size=gen.max_batch_size, pad_token_id=self.pad_id,
                                vocab_limit=self.vocab_limit)
        generated = time.perf_counter()
        truths = [self.train_set[i].final_answer for _, i in mine for _ in range(g.n_rollouts)]
        rewards = self.scorer(out.texts, truths)
        scored = time.perf_counter()
        lengths = out.lengths.tolist()
        rollouts = Rollouts(
            prompts=[self.prompt(i) for _, i in mine for _ in range(g.n_rollouts)],
            responses=out.completions(), rewards=rewards,
            mini_batch=[k for k, _ in mine for _ in range(g.n_rollouts)], group_size=g.n_rollouts,
            gen_log_probs=[out.logprobs[j, :n] for j, n in enumerate(lengths)])
        truncated = sum(r == "length" for r in out.finish_reasons)
        stats = {"time_generate": generated - started, "time_score": scored - generated, "truncated": truncated,
                 "correct": float((rewards >= self.scorer.full_score).sum()), "lengths": lengths}
        return rollouts, stats

    def train_step(self) -> dict:
        g, t = self.cfg.algorithm.gspo, self.cfg.train
        started = time.perf_counter()
        rollouts, stats = self.collect_rollouts()
        advantages = compute_advantages(rollouts, std_normalize=g.adv_std_normalize,
                                        filter_zero_std_groups=g.filter_zero_std_groups)
        minibatches = build_minibatches(rollouts, advantages, g.mini_batches, t.micro_batch_size, self.multiple,
                                        device=self.info.device)
        sums = MetricSums()
        logprob_started = time.perf_counter()
        compute_log_probs(self.chunks, minibatches, self.spec, "old_log_prob", sums)
        if self.reference is not None:
            with self.reference.swapped_in():
                compute_log_probs(self.chunks, minibatches, self.spec, "ref_log_prob")
        update_started = time.perf_counter()
        lr = current_lr(self.optimizer)
        update = update_policy(self.chunks, self.optimizer, minibatches, self.spec, g.ppo_epochs, sums)
        self.scheduler.step(1)
        finished = time.perf_counter()
        row = self._global_rollout_stats(rollouts, advantages, stats)
        row.update(sums.reduce(UPDATE_METRICS))
        row.update({"lr": lr, "updates": update.updates, "skipped_updates": update.skipped,
                    "time_generate": stats["time_generate"], "time_score": stats["time_score"],
                    "time_logprob": update_started - logprob_started, "time_update": finished - update_started,
                    "step_time": finished - started})
        if update.losses:
            row["loss"] = sum(update.losses) / len(update.losses)
        if update.grad_norms:
            row["grad_norm"] = sum(update.grad_norms) / len(update.grad_norms)
        row["gen_tokens_per_s"] = row["response_tokens"] / max(stats["time_generate"], 1e-9)
        row["tokens_per_s"] = row["sequence_tokens"] / max(row["step_time"], 1e-9)
        return row

    def _global_rollout_stats(self, rollouts: Rollouts, advantages, stats: dict) -> dict:
        """Sums over DP ranks (TP/PP peers hold the same rollouts)."""
        r = rollouts.rewards.double()
        lengths = torch.tensor(stats["lengths"], dtype=torch.float64)
        prompt_tokens = float(sum(len(p) for p in rollouts.prompts))
        local = torch.tensor([r.sum(), (r * r).sum(), len(r), stats["correct"], lengths.sum(), stats["truncated"],
                              advantages.stats["zero_std_groups"], advantages.stats["num_groups"],
                              float(advantages.keep.sum()), prompt_tokens], dtype=torch.float64)
        longest = torch.tensor([lengths.max() if len(lengths) else 0.0], dtype=torch.float64)
        if dist.is_initialized() and self.info.dp_size > 1:
            local, longest = local.to(comm_device()), longest.to(comm_device())
            dist.all_reduce(local, group=ps.get_data_parallel_group())
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        s, s2, n, correct, length_sum, truncated, zero_std, groups, kept, prompt_sum = local.cpu().tolist()
        mean = s / n
        return {"reward_mean": mean, "reward_std": max(s2 / n - mean * mean, 0.0) ** 0.5,
                "rollout_accuracy": correct / n, "response_length": length_sum / n,
                "response_length_max": float(longest.item()), "truncated_fraction": truncated / n,
                "zero_std_groups": zero_std, "zero_std_fraction": zero_std / groups, "trained_sequences": kept,
                "response_tokens": length_sum, "sequence_tokens": length_sum + prompt_sum,
                "epoch": self.schedule.epoch_of(self.step + 1)}

    # ------------------------------------------------------------------ evaluation, loop, saving
    def evaluate(self) -> dict:
        if not self.held_out or not self.cfg.train.eval_accuracy:
            return {}
        started = time.perf_counter()
        greedy = make_generate_fn(self.chunks, self.tokenizer, self.cfg.generation)
        acc = gsm8k_accuracy(self.held_out, self.tokenizer, greedy, self.cfg.data,
                             self.cfg.generation.max_new_tokens, method=self.cfg.algorithm.gspo.reward_method)
        log.info("eval at step %d: accuracy %.4f (%d held-out examples)", self.step, acc.accuracy, acc.num_examples)
        return {"accuracy": acc.accuracy, "time_eval": time.perf_counter() - started}

    def train(self) -> dict[int, dict]:
        t = self.cfg.train
        self.restore()
        if t.eval_at_start and self.step == 0:
            row = self.evaluate()
            if row:
                self.metrics.log(PHASE, 0, row)
                self.history[0] = row
        bar = progress(total=t.train_steps, desc="gspo", initial=self.step)
        while self.step < t.train_steps:
            row = self.train_step()
            self.step += 1
            if t.due(t.eval_interval, self.step):
                row.update(self.evaluate())
            self.metrics.log(PHASE, self.step, row)
            self.history[self.step] = row
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", len=f"{row['response_length']:.1f}")
            if self.step % t.log_interval == 0:
                log.info("step %d: reward %.4f (std %.3f), rollout acc %.3f, zero-std groups %d, entropy %.3f, "
                         "clipfrac %.4f, gen %.1fs update %.1fs", self.step, row["reward_mean"], row["reward_std"],
                         row["rollout_accuracy"], row["zero_std_groups"], row.get("entropy", float("nan")),
                         row.get("pg_clipfrac", float("nan")), row["time_generate"], row["time_update"])
            if t.due(t.save_interval, self.step):
                self.save()
        bar.close()
        return self.history

    def save(self) -> None:
        g = self.cfg.algorithm.gspo
        # Until the first optimizer step (every group so far had equal rewards) Adam has no state, and
        # megatron cannot describe an empty one; its stand-in, a step on zero grads, would move the
        # weights (weight decay). Such a checkpoint holds no optimizer state, and says so.
        has_state = _optimizer_has_state(self.optimizer)
        state = ckpt.TrainerState(iteration=self.step, consumed_samples=self.step * g.prompts_per_step,
                                  sampler={"prompt_seed": self.cfg.train.seed, "prompts_per_step": g.prompts_per_step,
                                           "num_examples": len(self.train_set)},
                                  extra={"optimizer_saved": has_state})
        self.checkpoint = ckpt.save_checkpoint(self.save_dir, state, self.chunks,
                                               self.optimizer if has_state else None, self.scheduler,
                                               keep_last_n=self.cfg.train.keep_last_n)

    def finish(self) -> None:
        self.metrics.close()
        jsonl = os.path.join(self.cfg.train.output_dir, "metrics.jsonl")
        if is_rank0() and os.path.exists(jsonl):
            plot_metrics(jsonl, os.path.join(self.cfg.train.output_dir, "gspo_metrics.png"), PLOT_KEYS, phase=PHASE)


def _optimizer_has_state(optimizer) -> bool:
    inner = [getattr(opt, "optimizer", None) for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    local = torch.tensor([float(any(o is not None and len(o.state) > 0 for o in inner))], device=comm_device())
    if dist.is_initialized():  # every rank must take the same branch of the (collective) save
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return bool(local.item() > 0)


def run_gspo(cfg: RunConfig) -> GSPORun:
    """Train as `cfg` says. Collective: call on every rank. Returns the run (history, checkpoint)."""
    run = GSPORun(cfg)
    run.train()
    run.finish()
    return run
