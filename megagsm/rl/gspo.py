"""GSPO with in-process rollouts, as an algorithm of the shared trainer (megagsm.train.Trainer).

One step (`GSPO.train_step`):
1. rollouts: the step's `prompts_per_step` prompts (megagsm.rl.rollout: placement over DP ranks and
   mini-batches), `n_rollouts` samples each from the model being trained (megagsm.generation, at
   the training layout, same weights, no copy);
2. rewards (a registered reward function) and group-normalised advantages; groups whose rewards are
   all equal carry no signal: counted, and dropped when `filter_zero_std_groups`;
3. the update's microbatches: sequences packed to a token budget (megagsm.rl.packing, the default)
   or padded rows (megagsm.rl.batching, train.max_tokens_per_microbatch=0); old log-probs (and
   reference ones when kl_coef > 0) by a forward-only pass over those microbatches, then
   `ppo_epochs` x `mini_batches` optimizer steps of the GSPO loss through megatron's schedules
   (megagsm.rl.update);
4. metrics: reward, accuracy, lengths, clip fraction, KL, entropy, time split, tokens/s, the padded
   share of the update's computed tokens.
MoE routing replay (``routing_replay``: megagsm.rl.routing_replay) records the rollout's routing in
the engine and replays it (r3) or the old pass's (r2); ``rollout_correction`` weights the loss by
pi_old / pi_sampler (megagsm.rl.rollout_correction).
The trainer adds evaluation (greedy held-out accuracy), checkpoints, resume and the HF export; the
LR schedule steps once per GSPO step (optim.warmup_steps counts GSPO steps, as in verl).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megagsm.config import RunConfig
from megagsm.config.errors import ConfigError
from megagsm.data.prompts import encode_example_prompt, truncate_prompt
from megagsm.generation import generate_many
from megagsm.layers.attention import SDPAttention
from megagsm.layers.spec import core_attention_classes
from megagsm.models.router_replay import ModelRouting
from megagsm.models.training import sequence_length_multiple
from megagsm.rl.batching import Advantages, MiniBatch, Rollouts, build_minibatches, compute_advantages
from megagsm.rl.packing import build_packed_minibatches, token_budget
from megagsm.models.lora import adapter_dropout_disabled
from megagsm.rewards import make_batch_scorer
from megagsm.rl.reference import FrozenBaseReference, ReferencePolicy
from megagsm.rl.rollout import PromptSchedule, check_placement, rank_share, rollout_seed, sampling_params, stop_token_ids
from megagsm.rl.routing_replay import RoutingPass, routing_metrics
from megagsm.rl.update import LossSpec, MetricSums, compute_log_probs, update_policy, with_log_probs, with_values
from megagsm.runtime.collectives import dp_group, reduce_numbers
from megagsm.train.memory import release_enabled, training_memory_released
from megagsm.utils.logging import get_logger

log = get_logger(__name__)
UPDATE_METRICS = ["entropy", "logprob_diff_gen", "pg_clipfrac", "pg_clipfrac_lower", "ratio_mean", "seq_ratio_mean",
                  "approx_kl_k1", "approx_kl_k3", "kl_loss", "rollout_kl_k1", "rollout_kl_k3",
                  "rollout_is_weight_mean", "rollout_is_clip_fraction"]


def padded_token_fraction(minibatches: list[MiniBatch]) -> float:
    """Of the token positions the update's microbatches compute (all DP ranks), the share that is
    padding (collective over DP)."""
    computed, real = reduce_numbers([sum(mb.computed_tokens for mb in minibatches),
                                     sum(mb.real_tokens for mb in minibatches)], "sum", dp_group())
    return 1.0 - real / computed if computed else 0.0


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
        g, gen = cfg.algorithm.gspo, cfg.generation
        if g.rollout_correction != "none" and (gen.top_k != 0 or gen.top_p != 1.0):
            raise ConfigError(f"algorithm.gspo.rollout_correction={g.rollout_correction} needs generation.top_k=0 "
                              f"and generation.top_p=1.0 (got {gen.top_k}, {gen.top_p}): with truncated sampling "
                              "the sampler's log-probs are not those of the policy the trainer scores")
        if not g.rollout_correction_threshold > 0:
            raise ConfigError(f"algorithm.gspo.rollout_correction_threshold={g.rollout_correction_threshold} "
                              "must be > 0")

    def __init__(self, trainer):
        cfg, g = trainer.cfg, trainer.cfg.algorithm.gspo
        self.trainer, self.cfg, self.gspo = trainer, cfg, g
        info = trainer.info
        check_placement(g.prompts_per_step, g.mini_batches, info.dp_size)
        self.samples_per_step = g.prompts_per_step
        self.lora = cfg.train.lora.enabled
        # under LoRA the reference is the frozen base, which every checkpoint holds unchanged
        self.needs_initial_policy = g.kl_coef > 0 and not self.lora
        if self.lora and cfg.train.lora.dropout > 0:
            log.info("train.lora.dropout=%s is not applied by GSPO: rollouts, log-prob passes and updates "
                     "all run the adapters without dropout (the ratio compares one deterministic policy)",
                     cfg.train.lora.dropout)
        self.schedule = PromptSchedule(len(trainer.train_examples), g.prompts_per_step, cfg.train.seed)
        self.share = rank_share(g.prompts_per_step, g.mini_batches, info.dp_size, info.dp_rank)
        self.scorer = make_batch_scorer(g, cfg.generation.max_new_tokens,
                                        [e.data_source for e in trainer.train_examples])
        tokenizer = trainer.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.spec = LossSpec.from_config(g, cfg.generation, trainer.vocab_limit)
        self.multiple = sequence_length_multiple(cfg.parallel)
        t = cfg.train
        self.token_budget = token_budget(t.max_tokens_per_microbatch, t.micro_batch_size, cfg.data.max_prompt_len,
                                         cfg.generation.max_new_tokens, self.multiple)
        self.reference: ReferencePolicy | FrozenBaseReference | None = None
        self.routing: ModelRouting | None = None
        if g.routing_replay != "none":
            try:
                self.routing = ModelRouting(trainer.chunks)
            except ValueError:
                raise ConfigError(f"algorithm.gspo.routing_replay={g.routing_replay} needs a mixture-of-experts "
                                  "model with top-k routers (this model has none): use routing_replay=none") from None
        self.share_prompts = self._share_prompts(cfg)
        self.release_memory = release_enabled(cfg.generation.release_training_memory, info.device)
        self._prompts: dict[int, list[int]] = {}

    def _share_prompts(self, cfg) -> bool:
        """train.share_prompts resolved: shared prompts need megagsm's SDPA attention (transformer-engine
        attends inside each THD document only), packed microbatches and no routing replay."""
        wanted = cfg.train.share_prompts
        sdpa = core_attention_classes(self.trainer.chunks) <= {SDPAttention}
        if wanted and not sdpa:
            raise ConfigError("train.share_prompts=true needs model.attention_backend=sdpa: transformer-engine "
                              "attends inside each packed document only (use share_prompts=null|false)")
        return wanted is not False and sdpa and bool(self.token_budget) and self.routing is None

    def on_initial_policy(self) -> None:
        if self.gspo.kl_coef > 0:  # the initial policy, before any resume
            chunks = self.trainer.chunks
            self.reference = FrozenBaseReference(chunks) if self.lora else ReferencePolicy(chunks)

    def prompt(self, index: int) -> list[int]:
        if index not in self._prompts:
            data = self.cfg.data
            ids = encode_example_prompt(self.trainer.train_examples[index], self.trainer.tokenizer, data.prompt_template)
            self._prompts[index] = truncate_prompt(ids, data.max_prompt_len, data.truncation,
                                                   what=f"training example {index}")
        return self._prompts[index]

    # ------------------------------------------------------------------ one step
    def collect_rollouts(self, step: int) -> tuple[Rollouts, RolloutStats]:
        g, gen, trainer = self.gspo, self.cfg.generation, self.trainer
        indices = self.schedule.step_indices(step)
        mine = [(k, indices[pos]) for k, pos in self.share]
        started = time.perf_counter()
        params = sampling_params(gen, g.n_rollouts, stop_token_ids(trainer.tokenizer),
                                 rollout_seed(gen.seed + self.cfg.train.seed, step, trainer.info.dp_rank))
        out = generate_many(trainer.chunks, [self.prompt(i) for _, i in mine], params, trainer.tokenizer,
                            continuous_batching=gen.continuous_batching, cuda_graphs=gen.cuda_graphs,
                            max_batch_size=gen.max_batch_size, pad_token_id=self.pad_id,
                            vocab_limit=trainer.vocab_limit, routing=self.routing)
        generated = time.perf_counter()
        examples = [trainer.train_examples[i] for _, i in mine for _ in range(g.n_rollouts)]
        lengths = out.lengths.tolist()
        scores = self.scorer.scores(out.texts, [e.final_answer for e in examples], [e.data_source for e in examples])
        rewards = torch.tensor(self.scorer.with_penalty(scores, lengths), dtype=torch.float32)
        scored = time.perf_counter()
        rollouts = Rollouts(
            prompts=[self.prompt(i) for _, i in mine for _ in range(g.n_rollouts)],
            responses=out.completions(), rewards=rewards,
            mini_batch=[k for k, _ in mine for _ in range(g.n_rollouts)], group_size=g.n_rollouts,
            gen_log_probs=[out.logprobs[j, :n] for j, n in enumerate(lengths)], routing=out.routing)
        stats = RolloutStats(time_generate=generated - started, time_score=scored - generated,
                             truncated=sum(r == "length" for r in out.finish_reasons),
                             correct=float(sum(s >= 1.0 for s in scores)), lengths=lengths)
        return rollouts, stats

    def train_step(self, step: int) -> dict:
        g, trainer = self.gspo, self.trainer
        started = time.perf_counter()
        with training_memory_released(trainer.chunks, trainer.optimizer, self.release_memory):
            rollouts, stats = self.collect_rollouts(step)
        advantages = compute_advantages(rollouts, std_normalize=g.adv_std_normalize,
                                        filter_zero_std_groups=g.filter_zero_std_groups)
        minibatches = self.minibatches(rollouts, advantages)
        logprob_started = time.perf_counter()
        old_pass, update_pass = self._routing_passes()
        old, old_metrics = None, MetricSums()
        if not self.spec.on_policy:  # exactly on-policy: the update's own log-probs are the old ones
            old = compute_log_probs(trainer.chunks, minibatches, self.spec, with_metrics=True, routing=old_pass)
            minibatches, old_metrics = with_log_probs(minibatches, old, "old_log_prob"), old.metrics
            if g.routing_replay == "r2":
                minibatches = with_values(minibatches, old.routing, "old_routing")
        if self.reference is not None:
            with self.reference.swapped_in():
                minibatches = with_log_probs(minibatches, compute_log_probs(trainer.chunks, minibatches, self.spec),
                                             "ref_log_prob")
        update_started = time.perf_counter()
        with adapter_dropout_disabled(trainer.chunks):  # (no-op without LoRA)
            update = update_policy(trainer.chunks, trainer.optimizer, minibatches, self.spec, g.ppo_epochs,
                                   routing=update_pass)
        finished = time.perf_counter()
        row = self._global_rollout_stats(rollouts, advantages, stats, step)
        if self.routing is not None and old is not None:
            row.update(routing_metrics(old.routing_counts, rollouts.routing))
        row.update(old_metrics.merged(update.metrics).reduce(UPDATE_METRICS))
        row["padded_token_fraction"] = padded_token_fraction(minibatches)
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

    def minibatches(self, rollouts: Rollouts, advantages: Advantages) -> list:
        """The update's microbatches: packed to the token budget (train.max_tokens_per_microbatch), or
        micro_batch_size padded rows when it is 0."""
        device = self.trainer.info.device
        if self.token_budget:
            return build_packed_minibatches(rollouts, advantages, self.gspo.mini_batches, self.token_budget,
                                            self.multiple, device=device, share_prompts=self.share_prompts)
        return build_minibatches(rollouts, advantages, self.gspo.mini_batches, self.cfg.train.micro_batch_size,
                                 self.multiple, device=device)

    def _routing_passes(self) -> tuple[RoutingPass | None, RoutingPass | None]:
        """(old-log-prob pass, update) routing: r3 replays the rollout's in both, r2 keeps the old
        pass's natural choice and replays it in the update. The reference pass routes by itself."""
        if self.routing is None:
            return None, None
        r3 = self.gspo.routing_replay == "r3"
        old = RoutingPass(self.routing, replay_key="routing" if r3 else None, keep_chosen=not r3, count_matches=True)
        update = RoutingPass(self.routing, replay_key="routing" if r3 else "old_routing", backward=True)
        return old, update

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
