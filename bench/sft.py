"""SFT training throughput: megagsm (megatron-core GPTModel, TP=1, one process) vs a plain transformers
Qwen2ForCausalLM + torch.optim.AdamW loop, same shape, batch and optimizer settings, in one process.

    python bench/sft.py [--repeats 7] [--batch 8] [--seq 256] [--no-memory]

Prints ONE JSON line. Two batches of [batch, seq] tokens, each trained by both loops:
* `gsm8k_sft` (the headline figures): an SFT batch as megagsm's trainer builds it: synthetic
  GSM8K-format problems (level 4: multi-step word problems, worked prose solutions; ~84 prompt and
  ~108 response tokens each), the default prompt template, a BPE tokenizer trained on them, right
  padding; loss on response tokens only (`loss_token_fraction`). transformers gets the same tokens with
  labels -100 outside the loss, as a plain HF SFT loop does. megagsm runs its default `train.loss`
  (chunked), which skips the output projection for tokens outside the loss.
* `all_tokens`: random tokens, every position in the loss: the same FLOPs on both sides.
Timing: after a warm-up step each, every round times a large fp32 matmul and the four steps back to
back (order reversed every other round, so load from other processes hits all alike); each figure is
the median over the rounds. tokens/s counts all batch x seq positions for both workloads. The process
CPU time per step is reported too (`cpu_ratio`), a cross-check on a machine shared with others.

Model FLOPs per trained token (forward + backward), documented so the fractions can be checked:
    6 * N  +  6 * L * s * d_attn
N = parameters that take part in matmuls (everything except the input embedding table and norm
weights; the untied output projection counts), L layers, s sequence length, d_attn = heads * head_dim;
the attention term is the score and value matmuls (4 * s * d_attn per token per layer forward, x3
with backward) halved for the causal mask. Fraction of peak = model FLOP/s / measured matmul FLOP/s
(2 * n^3 / t for an n x n fp32 matmul, median over rounds, best of 3 calls within a round).
Both loops are credited the same FLOPs per position (the output projection on every position, what
the transformers loop executes); on `gsm8k_sft` megagsm skips that projection outside the loss, so its
fraction there is an effective one (work a plain loop would have done, per second), not hardware use.

Both loops run in one process, so megagsm's CPU runtime settings made at `init_runtime` (glibc malloc
tuning, megagsm.runtime.cpu_malloc) apply to the transformers loop as well; megagsm's optimizer is
megatron's, with torch's fused AdamW kernel on CPU (megagsm.models.training.build_optimizer), the
transformers loop uses torch.optim.AdamW with its defaults, as a plain loop would.

Unless --no-memory, also measures the loss kernel's peak memory (output projection + cross-entropy,
forward + backward, 8192 tokens x 32768 vocab, hidden 512, fp32) for the plain path (matmul + megatron's
`vocab_parallel_cross_entropy`) and `megagsm.sft.fused_ce` (chunks of 1024 tokens; gradients formed in
the forward pass given the loss mask, and the recompute variant without it), each in a fresh
process, as the growth of the process's peak RSS (VmHWM, reset just before) over its RSS before the
step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# Qwen2-shaped, ~20M parameters
SHAPE = dict(hidden=512, layers=4, heads=8, kv_heads=2, ffn=1536, vocab=8192)
OPTIM = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, clip=1.0)


def build_megagsm(seq: int):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.gpt import GPTArchitecture, build_model_chunks
    from megagsm.models.training import build_optimizer, parallel_fields, wrap_ddp
    from megagsm.runtime import init_runtime

    parallel = ParallelConfig(use_distributed_optimizer=False)
    init_runtime(parallel, seed=0)
    config = TransformerConfig(
        num_layers=SHAPE["layers"], hidden_size=SHAPE["hidden"], num_attention_heads=SHAPE["heads"],
        num_query_groups=SHAPE["kv_heads"], ffn_hidden_size=SHAPE["ffn"],
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        # CUDA-only fusions: off on CPU (megatron would otherwise try apex/TE kernels)
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        **parallel_fields(parallel),
    )
    arch = GPTArchitecture(vocab_size=SHAPE["vocab"], max_sequence_length=seq, rotary_base=1000000.0)
    chunks = wrap_ddp(build_model_chunks(config, arch), parallel)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
        adam_beta1=OPTIM["betas"][0], adam_beta2=OPTIM["betas"][1], adam_eps=OPTIM["eps"],
        clip_grad=OPTIM["clip"], use_distributed_optimizer=False))
    return chunks, optimizer


def build_transformers(seq: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
        intermediate_size=SHAPE["ffn"], vocab_size=SHAPE["vocab"], max_position_embeddings=seq,
        tie_word_embeddings=False, rms_norm_eps=1e-6, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], betas=OPTIM["betas"],
                                  eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    return model, optimizer


def model_flops_per_token(params_in_matmuls: int, seq: int) -> float:
    d_attn = SHAPE["heads"] * (SHAPE["hidden"] // SHAPE["heads"])
    return 6.0 * params_in_matmuls + 6.0 * SHAPE["layers"] * seq * d_attn


def matmul_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def cpu_malloc_settings():
    from megagsm.runtime import cpu_malloc

    return cpu_malloc._applied


def fused_adamw(optimizer) -> bool:
    groups = [g for o in getattr(optimizer, "chained_optimizers", [optimizer]) for g in o.optimizer.param_groups]
    return all(bool(g.get("fused")) for g in groups)


def gsm8k_sft_batch(batch: int, seq: int) -> dict:
    """An SFT batch as the trainer builds it: synthetic GSM8K-format problems at the hardest level
    (multi-step word problems with worked prose solutions), the default prompt template, a BPE
    tokenizer trained on them, megagsm's SFT samples right-padded to `seq` (loss on response tokens
    only). Ids stay below the tokenizer's size, a subset of the model's vocabulary."""
    import tempfile

    from megagsm.data.gsm8k import GSM8KExample
    from megagsm.data.sft_dataset import build_sft_sample, collate_sft
    from megagsm.data.synthetic import generate_splits
    from megagsm.data.tokenizer import tokenizer_training_texts, train_tokenizer
    from megagsm.sft.data import to_model_batch

    problems, _ = generate_splits(max(256, batch), 0, level=4, seed=0)
    examples = [GSM8KExample(question=p.question, answer=p.answer, final_answer=str(p.final)) for p in problems]
    with tempfile.TemporaryDirectory(prefix="bench-sft-tok-") as tmp:
        tokenizer = train_tokenizer(tokenizer_training_texts(examples), SHAPE["vocab"], os.path.join(tmp, "tok"))
    samples = [build_sft_sample(e.question, e.answer, tokenizer, seq) for e in examples[:batch]]
    return to_model_batch(collate_sft(samples, tokenizer.pad_token_id, seq_length=seq))


def all_tokens_batch(batch: int, seq: int) -> dict:
    """Random tokens, every position in the loss: the same work for both loops, token for token."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab"], (batch, seq + 1), generator=gen)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(batch, seq), "position_ids": torch.arange(seq).expand(batch, -1).contiguous(),
            "attention_mask": None}


def hf_labels(mg_batch: dict) -> torch.Tensor:
    """transformers shifts labels itself: position t+1 carries the target of megagsm's position t."""
    labels = torch.full_like(mg_batch["tokens"], -100)
    keep = mg_batch["loss_mask"][:, :-1] > 0
    labels[:, 1:] = torch.where(keep, mg_batch["labels"][:, :-1], labels[:, 1:])
    return labels


def megagsm_forward_step():
    """What `torchrun launch/train.py` runs for SFT with the default `train.loss`."""
    from megagsm.config.train import TrainConfig
    from megagsm.models.training import lm_forward_step
    from megagsm.sft.fused_ce import chunked_lm_forward_step

    train = TrainConfig()
    return lm_forward_step if train.loss == "plain" else chunked_lm_forward_step(train.loss_chunk_size)


def throughput(args) -> dict:
    from megagsm.config.train import TrainConfig
    from megagsm.models.training import train_step

    batch, seq = args.batch, args.seq
    chunks, mg_opt = build_megagsm(seq)
    hf_model, hf_opt = build_transformers(seq)
    forward_step = megagsm_forward_step()
    workloads = {"gsm8k_sft": gsm8k_sft_batch(batch, seq), "all_tokens": all_tokens_batch(batch, seq)}

    def megagsm_step(mg_batch):
        return train_step(chunks, mg_opt, [mg_batch], 1, seq, batch, forward_step_func=forward_step).loss

    def transformers_step(mg_batch, labels):
        hf_opt.zero_grad(set_to_none=True)
        loss = hf_model(input_ids=mg_batch["tokens"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), OPTIM["clip"])
        hf_opt.step()
        return loss.item()

    steps, first = [], {}
    for name, mg_batch in workloads.items():
        labels = hf_labels(mg_batch)
        steps.append((f"megagsm/{name}", lambda b=mg_batch: megagsm_step(b)))
        steps.append((f"transformers/{name}", lambda b=mg_batch, lab=labels: transformers_step(b, lab)))
    for key, step in steps:  # warm-up
        first[key] = step()
    times = {key: [] for key, _ in steps}
    cpu = {key: [] for key, _ in steps}
    peaks = []
    for round_ in range(args.repeats):
        peaks.append(matmul_flops())
        # alternate the order, so a load change within a round does not favour one side
        for key, step in steps if round_ % 2 == 0 else steps[::-1]:
            c, t = time.process_time(), time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    peak = statistics.median(peaks)
    tok = batch * seq
    mg_params = sum(p.numel() for p in chunks[0].module.parameters())
    hf_params = sum(p.numel() for p in hf_model.parameters())
    embedding = SHAPE["vocab"] * SHAPE["hidden"]
    norms = SHAPE["hidden"] * (2 * SHAPE["layers"] + 1)
    flops_tok = model_flops_per_token(mg_params - embedding - norms, seq)

    def figures(name):
        mg, hf = f"megagsm/{name}", f"transformers/{name}"
        mg_tps, hf_tps = tok / med[mg], tok / med[hf]
        return {
            "megagsm_tokens_per_s": round(mg_tps, 1),
            "transformers_tokens_per_s": round(hf_tps, 1),
            "ratio": round(mg_tps / hf_tps, 3),
            "megagsm_frac_of_matmul_peak": round(mg_tps * flops_tok / peak, 3),
            "transformers_frac_of_matmul_peak": round(hf_tps * flops_tok / peak, 3),
            "loss_token_fraction": round(float(workloads[name]["loss_mask"].mean()), 3),
            "first_loss": {"megagsm": round(first[mg], 4), "transformers": round(first[hf], 4)},
            # process CPU seconds per step (all threads): less sensitive to other processes than wall
            # time on a shared machine, a cross-check of the wall-clock ratio
            "cpu_s_per_step": {"megagsm": round(cpu_med[mg], 3), "transformers": round(cpu_med[hf], 3)},
            "cpu_ratio": round(cpu_med[hf] / cpu_med[mg], 3),
            "step_s_all": {"megagsm": [round(x, 3) for x in times[mg]],
                           "transformers": [round(x, 3) for x in times[hf]]},
        }

    return {
        # headline: a GSM8K SFT batch (loss on response tokens only), as the trainer feeds it
        "workload": "gsm8k_sft",
        **figures("gsm8k_sft"),
        # the same loop with every token in the loss: identical work on both sides
        "all_tokens": figures("all_tokens"),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "model_flops_per_token": flops_tok,
        "params": {"megagsm": mg_params, "transformers": hf_params},
        "batch": [batch, seq], "repeats": args.repeats, "threads": torch.get_num_threads(),
        "megagsm_train_loss": TrainConfig().loss,
        "cpu_settings": {"malloc_tuning": cpu_malloc_settings(), "megagsm_fused_adamw": fused_adamw(mg_opt)},
    }


# ---- loss kernel memory (each variant in a fresh process) ----

MEM_SHAPE = dict(tokens=8192, hidden=512, vocab=32768, chunk=1024)


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process from /proc (Linux). Unlike getrusage's ru_maxrss,
    VmHWM is not inherited from the parent process, and writing 5 to clear_refs resets it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str) -> dict:
    from megatron.core import tensor_parallel

    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime import init_runtime
    from megagsm.sft.fused_ce import chunked_vocab_parallel_cross_entropy

    init_runtime(ParallelConfig(), seed=0)
    n, h, v = MEM_SHAPE["tokens"], MEM_SHAPE["hidden"], MEM_SHAPE["vocab"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 1, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (1, n), generator=gen)
    mask = torch.ones(1, n)

    def step():
        if variant == "plain":
            logits = torch.matmul(hidden, weight.t())  # megatron's output layer at TP=1
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
        elif variant == "chunked":  # gradients formed in the forward pass (loss mask given)
            loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, MEM_SHAPE["chunk"],
                                                        loss_mask=mask)
        else:  # chunked, logits recomputed in the backward pass
            loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, MEM_SHAPE["chunk"])
        (loss * mask).sum().backward()
        value = loss.detach().sum().item()
        hidden.grad = weight.grad = None
        return value

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = max(_status_bytes("VmRSS"), _status_bytes("VmHWM"))
    t = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - t
    peak = _status_bytes("VmHWM")
    return {"peak_extra_mib": round((peak - before) / 2**20, 1), "seconds": round(seconds, 3), "loss_sum": value}


def memory(args) -> dict:
    out = {"shape": dict(MEM_SHAPE), "full_logits_fp32_mib": MEM_SHAPE["tokens"] * MEM_SHAPE["vocab"] * 4 / 2**20}
    # a fresh rendezvous per child: this process's torch.distributed port is still bound
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    for variant in ("plain", "chunked", "chunked_recompute"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant], capture_output=True, text=True,
            env=dict(env, PYTHONWARNINGS="ignore"), check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", choices=["plain", "chunked", "chunked_recompute"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    result = throughput(args)
    if not args.no_memory:
        result["loss_memory"] = memory(args)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warnings

    warnings.filterwarnings("ignore")
    main()
