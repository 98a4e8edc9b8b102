"""Supervised fine-tuning as an algorithm of the shared trainer (megagsm.train.Trainer): a resumable
stream of tokenised microbatches and a forward step for megatron's schedules.

- data: the trainer's examples -> SFTDataset (loss on response tokens only; packed rows with
  `data.pack_sequences`, fed as THD documents) -> per-step microbatches for this DP rank
  (megagsm.sft.data);
- forward step: `train.loss=chunked` (default) runs the output projection and the vocab-parallel
  cross entropy in token chunks on loss tokens only (megagsm.sft.fused_ce); `plain` is megatron's
  output layer + cross entropy on every token;
- a step is megatron's `train_step` over `global_batch_size / (micro_batch_size * dp)` microbatches
  (gradient accumulation; the loss is divided once by the global token count);
- evaluation adds the validation loss on the held-out set to the trainer's greedy accuracy.
"""
from __future__ import annotations

import time

from megagsm.config.train import TrainConfig
from megagsm.models.training import eval_step, has_moe, lm_forward_step, sequence_length_multiple, train_step
from megagsm.runtime.collectives import dp_group, reduce_numbers
from megagsm.sft.data import MicrobatchStream, build_dataset, eval_microbatches
from megagsm.sft.fused_ce import chunked_lm_forward_step


def sft_forward_step(train: TrainConfig):
    """The megatron forward_step_func for train.loss."""
    return lm_forward_step if train.loss == "plain" else chunked_lm_forward_step(train.loss_chunk_size)


class SFT:
    phase = "sft"
    plot_keys = ["loss", "val_loss", "accuracy", "lr"]
    needs_initial_policy = False

    def __init__(self, trainer):
        cfg, t, d = trainer.cfg, trainer.cfg.train, trainer.cfg.data
        self.trainer = trainer
        dp_rank, dp = trainer.info.dp_rank, trainer.info.dp_size
        self.micro_batch_size = t.micro_batch_size
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        self.samples_per_step = t.global_batch_size
        self.multiple = sequence_length_multiple(cfg.parallel)
        self.forward_step = sft_forward_step(t)
        self.train_set = build_dataset(trainer.train_examples, trainer.tokenizer, d, "train")
        self.eval_set = build_dataset(trainer.held_out, trainer.tokenizer, d, "eval") if trainer.held_out else None
        self.pad_id = getattr(self.train_set, "pad_id", trainer.tokenizer.pad_token_id)
        self.stream = MicrobatchStream(self.train_set, self.pad_id, t.micro_batch_size, self.num_microbatches,
                                       d.seq_length, self.multiple, dp_rank, dp, seed=t.seed)

    def on_initial_policy(self) -> None:
        pass

    def train_step(self, step: int) -> dict:
        started = time.perf_counter()
        batch = self.stream.next_step()
        chunks = self.trainer.chunks
        tokens = None
        if has_moe(chunks):  # the aux losses' weight needs the step's global token count
            local = sum(float(mb["loss_mask"].sum()) for mb in batch.microbatches)
            tokens = reduce_numbers([local], "sum", dp_group(with_context_parallel=True))[0]
        out = train_step(chunks, self.trainer.optimizer, batch.microbatches, self.num_microbatches,
                         batch.seq_length, batch.micro_batch_size, forward_step_func=self.forward_step,
                         global_count=tokens)
        elapsed = time.perf_counter() - started
        row = {"loss": out.loss, "tokens": out.num_tokens, "step_time": elapsed,
               "tokens_per_s": out.num_tokens / max(elapsed, 1e-9)}
        if out.grad_norm is not None:
            row["grad_norm"] = out.grad_norm
        return row

    def evaluate(self, step: int) -> dict:
        if self.eval_set is None:
            return {}
        info, d = self.trainer.info, self.trainer.cfg.data
        batch = eval_microbatches(self.eval_set, self.pad_id, self.micro_batch_size, d.seq_length,
                                  self.multiple, info.dp_rank, info.dp_size)
        if not batch.microbatches:
            return {}
        val_loss, _ = eval_step(self.trainer.chunks, batch.microbatches, len(batch.microbatches), batch.seq_length,
                                batch.micro_batch_size, forward_step_func=self.forward_step)
        return {"val_loss": val_loss}

    def progress(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}

    def data_state(self) -> dict:
        return self.stream.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.stream.load_state_dict(state)
