"""GSPO with in-process rollouts, as an algorithm of the shared trainer (megagsm.train.Trainer).

One step (`GSPO.train_step`):
1. rollouts: the step's `prompts_per_step` prompts (megagsm.rl.rollout: placement over DP ranks and
   mini-batches), `n_rollouts` samples each from the model being trained (megagsm.generation, at
   the training layout, same weights, no copy);
2. rewards (a registered reward function) and group-normalised advantages; groups whose rewards are
   all equal carry no signal: counted, and dropped when `filter_zero_std_groups`;
3. old log-probs (and reference ones when kl_coef > 0) by a forward-only pass over the update's own
   microbatches, then `ppo_epochs` x `mini_batches` optimizer steps of the GSPO loss through
   megatron's schedules (megagsm.rl.update);
4. metrics: reward, accuracy, lengths, clip fraction, KL, entropy, time split, tokens/s.
The trainer adds evaluation (greedy held-out accuracy), checkpoints, resume and the HF export; the
LR schedule steps once per GSPO step (optim.warmup_steps counts GSPO steps, as in verl).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megagsm.config import RunConfig
from megagsm.config.errors import ConfigError
from megagsm.data.prompts import encode_prompt
from megagsm.generation import generate_batched
from megagsm.models.training import sequence_length_multiple
from megagsm.rl.batching import Advantages, Rollouts, build_minibatches, compute_advantages
from megagsm.rl.reference import ReferencePolicy
from megagsm.rl.rollout import (PromptSchedule, Scorer, check_placement, rank_share, rollout_seed, sampling_params,
                                stop_token_ids)
from megagsm.rl.update import LossSpec, compute_log_probs, update_policy, with_log_probs
from megagsm.runtime.collectives import dp_group, reduce_numbers
from megagsm.train.memory import release_enabled, training_memory_released
from megagsm.utils.logging import get_logger

log = get_logger(__name__)
UPDATE_METRICS = ["entropy", "logprob_diff_gen", "pg_clipfrac", "ratio_mean", "seq_ratio_mean",
                  "approx_kl_k1", "approx_kl_k3", "kl_loss"]


@dataclass
class RolloutStats:
    """This rank's share of a step's rollouts, before any reduction."""

    time_generate: float
    time_score: float
    truncated: int                      # responses cut at max_new_tokens
    correct: float                      # responses earning the full reward
    lengths: list[int]                  # response lengths


class GSPO:
    phase = "gspo"
    plot_keys = ["reward_mean", "accuracy", "response_length", "entropy"]
    needs_initial_policy = False

    @staticmethod
    def check_config(cfg: RunConfig) -> None:
        if cfg.parallel.cp > 1 or (cfg.parallel.vpp or 1) > 1:
            raise ConfigError("algorithm.name=gspo needs parallel.cp=1 (a sequence's ratio must stay on one "
                              "rank) and parallel.vpp unset (generation runs one model chunk per rank)")

    def __init__(self, trainer):
        cfg, g = trainer.cfg, trainer.cfg.algorithm.gspo
        self.trainer, self.cfg, self.gspo = trainer, cfg, g
        info = trainer.info
        check_placement(g.prompts_per_step, g.mini_batches, info.dp_size)
        self.samples_per_step = g.prompts_per_step
        self.reward_method = g.reward_method
        self.needs_initial_policy = g.kl_coef > 0
        self.schedule = PromptSchedule(len(trainer.train_examples), g.prompts_per_step, cfg.train.seed)
        self.share = rank_share(g.prompts_per_step, g.mini_batches, info.dp_size, info.dp_rank)
        self.scorer = Scorer(g.reward, g.reward_method)
        tokenizer = trainer.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.spec = LossSpec.from_config(g, cfg.generation, trainer.vocab_limit)
        self.multiple = sequence_length_multiple(cfg.parallel)
        self.reference: ReferencePolicy | None = None
        self.release_memory = release_enabled(cfg.generation.release_training_memory, info.device)
        self._prompts: dict[int, list[int]] = {}

    def on_initial_policy(self) -> None:
        if self.gspo.kl_coef > 0:
            self.reference = ReferencePolicy(self.trainer.chunks)  # the initial policy, before any resume

    def prompt(self, index: int) -> list[int]:
        if index not in self._prompts:
            data = self.cfg.data
            ids = encode_prompt(self.trainer.train_examples[index].question, self.trainer.tokenizer,
                                data.prompt_template)
            if len(ids) > data.max_prompt_len:
                if data.truncation == "error":
                    raise ConfigError(f"prompt of training example {index} has {len(ids)} tokens > "
                                      f"data.max_prompt_len={data.max_prompt_len} (data.truncation=error)")
                ids = ids[-data.max_prompt_len:] if data.truncation == "left" else ids[:data.max_prompt_len]
            self._prompts[index] = ids
        return self._prompts[index]

    # ------------------------------------------------------------------ one step
    def collect_rollouts(self, step: int) -> tuple[Rollouts, RolloutStats]:
        g, gen, trainer = self.gspo, self.cfg.generation, self.trainer
        indices = self.schedule.step_indices(step)
        mine = [(k, indices[pos]) for k, pos in self.share]
        started = time.perf_counter()
        params = sampling_params(gen, g.n_rollouts, stop_token_ids(trainer.tokenizer),
                                 rollout_seed(gen.seed + self.cfg.train.seed, step, trainer.info.dp_rank))
        out = generate_batched(trainer.chunks, [self.prompt(i) for _, i in mine], params, trainer.tokenizer,
                               max_batch_size=gen.max_batch_size, pad_token_id=self.pad_id,
                               vocab_limit=trainer.vocab_limit)
        generated = time.perf_counter()
        truths = [trainer.train_examples[i].final_answer for _, i in mine for _ in range(g.n_rollouts)]
        rewards = self.scorer(out.texts, truths)
        scored = time.perf_counter()
        lengths = out.lengths.tolist()
        rollouts = Rollouts(
            prompts=[self.prompt(i) for _, i in mine for _ in range(g.n_rollouts)],
            responses=out.completions(), rewards=rewards,
            mini_batch=[k for k, _ in mine for _ in range(g.n_rollouts)], group_size=g.n_rollouts,
            gen_log_probs=[out.logprobs[j, :n] for j, n in enumerate(lengths)])
        stats = RolloutStats(time_generate=generated - started, time_score=scored - generated,
                             truncated=sum(r == "length" for r in out.finish_reasons),
                             correct=float((rewards >= self.scorer.full_score).sum()), lengths=lengths)
        return rollouts, stats

    def train_step(self, step: int) -> dict:
        g, trainer = self.gspo, self.trainer
        started = time.perf_counter()
        with training_memory_released(trainer.chunks, trainer.optimizer, self.release_memory):
            rollouts, stats = self.collect_rollouts(step)
        advantages = compute_advantages(rollouts, std_normalize=g.adv_std_normalize,
                                        filter_zero_std_groups=g.filter_zero_std_groups)
        minibatches = build_minibatches(rollouts, advantages, g.mini_batches, self.cfg.train.micro_batch_size,
                                        self.multiple, device=trainer.info.device)
        logprob_started = time.perf_counter()
        old = compute_log_probs(trainer.chunks, minibatches, self.spec, with_metrics=True)
        minibatches = with_log_probs(minibatches, old, "old_log_prob")
        if self.reference is not None:
            with self.reference.swapped_in():
                minibatches = with_log_probs(minibatches, compute_log_probs(trainer.chunks, minibatches, self.spec),
                                             "ref_log_prob")
        update_started = time.perf_counter()
        update = update_policy(trainer.chunks, trainer.optimizer, minibatches, self.spec, g.ppo_epochs)
        finished = time.perf_counter()
        row = self._global_rollout_stats(rollouts, advantages, stats, step)
        row.update(old.metrics.merged(update.metrics).reduce(UPDATE_METRICS))
        row.update({"updates": update.updates, "skipped_updates": update.skipped,
                    "time_generate": stats.time_generate, "time_score": stats.time_score,
                    "time_logprob": update_started - logprob_started, "time_update": finished - update_started,
                    "step_time": finished - started})
        if update.losses:
            row["loss"] = sum(update.losses) / len(update.losses)
        if update.grad_norms:
            row["grad_norm"] = sum(update.grad_norms) / len(update.grad_norms)
        row["gen_tokens_per_s"] = row["response_tokens"] / max(stats.time_generate, 1e-9)
        row["tokens_per_s"] = row["sequence_tokens"] / max(row["step_time"], 1e-9)
        return row

    def _global_rollout_stats(self, rollouts: Rollouts, advantages: Advantages, stats: RolloutStats,
                              step: int) -> dict:
        """Sums over DP ranks (TP/PP peers hold the same rollouts)."""
        r = rollouts.rewards.double()
        lengths = torch.tensor(stats.lengths, dtype=torch.float64)
        prompt_tokens = float(sum(len(p) for p in rollouts.prompts))
        group = dp_group()
        s, s2, n, correct, length_sum, truncated, zero_std, groups, kept, prompt_sum = reduce_numbers(
            [r.sum(), (r * r).sum(), len(r), stats.correct, lengths.sum(), stats.truncated,
             advantages.stats["zero_std_groups"], advantages.stats["num_groups"], float(advantages.keep.sum()),
             prompt_tokens], "sum", group)
        longest = reduce_numbers([lengths.max() if len(lengths) else 0.0], "max", group)[0]
        mean = s / n
        return {"reward_mean": mean, "reward_std": max(s2 / n - mean * mean, 0.0) ** 0.5,
                "rollout_accuracy": correct / n, "response_length": length_sum / n,
                "response_length_max": float(longest), "truncated_fraction": truncated / n,
                "zero_std_groups": zero_std, "zero_std_fraction": zero_std / groups, "trained_sequences": kept,
                "response_tokens": length_sum, "sequence_tokens": length_sum + prompt_sum,
                "epoch": self.schedule.epoch_of(step + 1)}

    # ------------------------------------------------------------------ trainer hooks
    def evaluate(self, step: int) -> dict:
        return {}

    def progress(self, row: dict) -> dict:
        return {"reward": f"{row['reward_mean']:.3f}", "len": f"{row['response_length']:.1f}"}

    def data_state(self) -> dict:
        # prompt order is a pure function of (seed, step): this only documents what it was made of
        return {"prompt_seed": self.cfg.train.seed, "prompts_per_step": self.gspo.prompts_per_step,
                "num_examples": len(self.trainer.train_examples)}

    def load_data_state(self, state: dict) -> None:
        pass
