"""Sampling settings for rollouts and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0           # 0: greedy
    top_k: int = 0                     # 0: off
    top_p: float = 1.0                 # 1.0: off
    n_samples: int = 1                 # completions per prompt at evaluation
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings, besides the tokenizer's EOS
    max_batch_size: int = 8            # sequences decoded together
    # one engine call per rank that refills finished rows with waiting prompts (generate_refilled);
    # false: generate() per group of max_batch_size sequences (generate_batched, the baseline)
    continuous_batching: bool = True
    # decode steps with static shapes captured as a CUDA graph and replayed (CUDA only; dense models,
    # pp=1, needs continuous_batching)
    cuda_graphs: bool = False
    # GSPO: free the grad buffers and offload the optimizer state while rollouts are generated (the KV
    # cache gets the memory), both restored before the log-prob pass; None: true on GPU, false on CPU
    release_training_memory: bool | None = None
