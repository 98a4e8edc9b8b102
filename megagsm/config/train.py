"""Training loop: batch sizes, how long, checkpoints, outputs, loss kernel, LoRA."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # megatron-core linear module names the adapters wrap
    targets: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])


@dataclass
class TrainConfig:
    global_batch_size: int = 8         # sequences per optimizer step (SFT)
    micro_batch_size: int = 1          # sequences per forward/backward on one rank
    # GSPO's log-prob, reference and update passes: tokens per packed microbatch (sequences packed
    # without padding, THD). null: micro_batch_size*(data.max_prompt_len+generation.max_new_tokens)
    # rounded up to the sequence-length multiple; 0: micro_batch_size padded rows (no packing)
    max_tokens_per_microbatch: int | None = None  # GSPO tokens per packed microbatch (null: auto, 0: padded rows)
    # GSPO packed microbatches: a group's sequences share one copy of their prompt (the model runs the
    # prompt's tokens once, its responses attend to it). null: auto = on with megagsm's SDPA attention
    # and no routing replay; true: required (refused under transformer-engine or routing replay); false: off
    share_prompts: bool | None = None
    train_steps: int = 100             # optimizer steps
    eval_interval: int = 0             # steps between evaluations; 0: only at the end
    save_interval: int = 0             # steps between checkpoints; 0: only at the end
    keep_last_n: int = 2               # checkpoints kept; 0 keeps all
    output_dir: str = "runs/default"   # metrics, logs, resolved config
    save_dir: str | None = None        # checkpoints; None: <output_dir>/checkpoints
    resume: str = "auto"               # auto: latest in save_dir if any | none | <checkpoint path>
    seed: int = 1234
    log_interval: int = 1
    eval_at_start: bool = True         # evaluate before the first step (the "before" accuracy)
    eval_accuracy: bool = True         # GSM8K accuracy by greedy generation at each evaluation
    eval_max_examples: int = 0         # held-out examples used per evaluation; 0: all
    export_hf: bool = True             # convert the final checkpoint to a HF model dir (<output_dir>/hf)
    # chunked (default): output projection + CE fused over token chunks, only on loss tokens (less
    # memory, fewer FLOPs, same loss and gradients); plain: megatron's output layer + CE on all tokens
    loss: Literal["plain", "chunked"] = "chunked"
    loss_chunk_size: int = 1024        # tokens per chunk for loss=chunked
    lora: LoraConfig = field(default_factory=LoraConfig)
    # held-out evaluation sampling (verl's val_kwargs): eval_n samples per problem report mean@n as
    # accuracy, plus pass@n and maj@n when eval_n > 1; eval_temperature 0 is greedy decoding
    eval_n: int = 1
    eval_temperature: float = 0.0
    eval_top_p: float = 1.0
    eval_reward: str = "auto"          # auto: each problem's reward from its data_source (gsm8k strict, math, math_dapo)

    def checkpoint_dir(self) -> str:
        return self.save_dir if self.save_dir is not None else os.path.join(self.output_dir, "checkpoints")

    def due(self, interval: int, step: int) -> bool:
        """Whether `step` is an eval/save step for `interval` (eval_interval, save_interval): every
        `interval` steps (0: none) and always the last step."""
        return bool(interval and step % interval == 0) or step == self.train_steps
