"""SFT training throughput: megagsm (megatron-core GPTModel, TP=1, one process) vs a plain transformers
Qwen2ForCausalLM + torch.optim.AdamW loop, same shape, batch and optimizer settings, in one process.

    python bench/sft.py [--repeats 7] [--batch 8] [--seq 256] [--no-memory]
    python bench/sft.py --shape 1b --dtype bf16 --batch 4 --seq 2048 --megagsm-only   # GPU MFU

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

megagsm's model and optimizer are built as `launch/train.py` builds them (`model.init=random`,
family qwen2, `megagsm.models.builder.build_model`, DDP, megatron's optimizer with
`megagsm.sft.optim.optimizer_config`: fp32 main params under bf16). Shapes: `20m` (default; hidden
512, 4 layers, 8 heads / 2 KV groups, FFN 1536, vocab 8192) and `1b` (hidden 2048, 22 layers, 32
heads / 4 KV groups, FFN 5632, vocab 32000: 1.1B parameters). On CUDA both loops run on the GPU and
the matmul peak is timed in the run's dtype (bf16: the MFU denominator); `--megagsm-only` skips the
transformers loop (MFU runs of a model too large for two copies).

Unless --no-memory, also runs bench/loss_memory.py (the loss kernel's peak memory, CPU) and
includes its figures as `loss_memory`.
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

SHAPES = {
    "20m": dict(hidden=512, layers=4, heads=8, kv_heads=2, ffn=1536, vocab=8192),
    "1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000),
}
OPTIM = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, clip=1.0)


def build_megagsm(shape: dict, seq: int, dtype: str):
    """(chunks, optimizer, torch dtype, device) as the SFT trainer builds them."""
    from megagsm.config.model import ModelConfig
    from megagsm.config.optim import OptimConfig
    from megagsm.config.parallel import ParallelConfig
    from megagsm.train.model import build_model
    from megagsm.models.training import build_optimizer, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.train.optim import optimizer_config

    parallel = ParallelConfig(use_distributed_optimizer=False)
    info = init_runtime(parallel, seed=0)
    model = ModelConfig(init="random", family="qwen2", dtype=dtype, hidden_size=shape["hidden"],
                        num_layers=shape["layers"], num_attention_heads=shape["heads"],
                        num_query_groups=shape["kv_heads"], ffn_hidden_size=shape["ffn"],
                        vocab_size=shape["vocab"], max_position_embeddings=seq, tie_word_embeddings=False)
    built = build_model(model, parallel, info.device)
    chunks = wrap_ddp(built.chunks, parallel)
    optim = OptimConfig(lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"], adam_beta1=OPTIM["betas"][0],
                        adam_beta2=OPTIM["betas"][1], adam_eps=OPTIM["eps"], clip_grad=OPTIM["clip"])
    optimizer = build_optimizer(chunks, optimizer_config(optim, parallel, built.dtype))
    return chunks, optimizer, built.dtype, info.device


def build_transformers(shape: dict, seq: int, dtype: torch.dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["ffn"], vocab_size=shape["vocab"], max_position_embeddings=seq,
        tie_word_embeddings=False, rms_norm_eps=1e-6, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], betas=OPTIM["betas"],
                                  eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    return model, optimizer


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_flops_per_token(shape: dict, params_in_matmuls: int, seq: int) -> float:
    d_attn = shape["heads"] * (shape["hidden"] // shape["heads"])
    return 6.0 * params_in_matmuls + 6.0 * shape["layers"] * seq * d_attn


def matmul_flops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def cpu_malloc_settings():
    from megagsm.runtime import cpu_malloc

    return cpu_malloc._applied


def fused_adamw(optimizer) -> bool:
    groups = [g for o in getattr(optimizer, "chained_optimizers", [optimizer]) for g in o.optimizer.param_groups]
    return all(bool(g.get("fused")) for g in groups)


def gsm8k_sft_batch(batch: int, seq: int, vocab: int) -> dict:
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
        tokenizer = train_tokenizer(tokenizer_training_texts(examples), vocab, os.path.join(tmp, "tok"))
    samples = [build_sft_sample(e.question, e.answer, tokenizer, seq) for e in examples[:batch]]
    return to_model_batch(collate_sft(samples, tokenizer.pad_token_id, seq_length=seq))


def all_tokens_batch(batch: int, seq: int, vocab: int) -> dict:
    """Random tokens, every position in the loss: the same work for both loops, token for token."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(batch, seq), "position_ids": torch.arange(seq).expand(batch, -1).contiguous(),
            "attention_mask": None}


def hf_labels(mg_batch: dict) -> torch.Tensor:
    """transformers shifts labels itself: position t+1 carries the target of megagsm's position t."""
    labels = torch.full_like(mg_batch["tokens"], -100)
    keep = mg_batch["loss_mask"][:, :-1] > 0
    labels[:, 1:] = torch.where(keep, mg_batch["labels"][:, :-1], labels[:, 1:])
    return labels


def throughput(args) -> dict:
    from megagsm.config.train import TrainConfig
    from megagsm.models.training import train_step
    from megagsm.sft.step import sft_forward_step

    shape, batch, seq = SHAPES[args.shape], args.batch, args.seq
    chunks, mg_opt, dtype, device = build_megagsm(shape, seq, args.dtype)
    forward_step = sft_forward_step(TrainConfig())  # what launch/train.py runs for the default train.loss
    workloads = {"gsm8k_sft": gsm8k_sft_batch(batch, seq, shape["vocab"]),
                 "all_tokens": all_tokens_batch(batch, seq, shape["vocab"])}
    workloads = {name: {k: v.to(device) if v is not None else None for k, v in b.items()}
                 for name, b in workloads.items()}

    def megagsm_step(mg_batch):
        return train_step(chunks, mg_opt, [mg_batch], 1, seq, batch, forward_step_func=forward_step).loss

    steps, first = [], {}
    sides = ["megagsm"]
    for name, mg_batch in workloads.items():
        steps.append((f"megagsm/{name}", lambda b=mg_batch: megagsm_step(b)))
    if not args.megagsm_only:
        sides.append("transformers")
        hf_model, hf_opt = build_transformers(shape, seq, dtype, device)

        def transformers_step(mg_batch, labels):
            hf_opt.zero_grad(set_to_none=True)
            loss = hf_model(input_ids=mg_batch["tokens"], labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf_model.parameters(), OPTIM["clip"])
            hf_opt.step()
            return loss.item()

        for name, mg_batch in workloads.items():
            labels = hf_labels(mg_batch)
            steps.append((f"transformers/{name}", lambda b=mg_batch, lab=labels: transformers_step(b, lab)))
    for key, step in steps:  # warm-up
        first[key] = step()
    times = {key: [] for key, _ in steps}
    cpu = {key: [] for key, _ in steps}
    peaks = []
    for round_ in range(args.repeats):
        peaks.append(matmul_flops(device, dtype))
        # alternate the order, so a load change within a round does not favour one side
        for key, step in steps if round_ % 2 == 0 else steps[::-1]:
            synchronize()
            c, t = time.process_time(), time.perf_counter()
            step()
            synchronize()
            times[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    peak = statistics.median(peaks)
    tok = batch * seq
    params = sum(p.numel() for p in chunks[0].module.parameters())
    embedding = shape["vocab"] * shape["hidden"]
    norms = shape["hidden"] * (2 * shape["layers"] + 1)
    flops_tok = model_flops_per_token(shape, params - embedding - norms, seq)

    def figures(name):
        tps = {side: tok / med[f"{side}/{name}"] for side in sides}
        out = {f"{side}_tokens_per_s": round(tps[side], 1) for side in sides}
        if "transformers" in tps:
            out["ratio"] = round(tps["megagsm"] / tps["transformers"], 3)
        out.update({f"{side}_frac_of_matmul_peak": round(tps[side] * flops_tok / peak, 3) for side in sides})
        out["loss_token_fraction"] = round(float(workloads[name]["loss_mask"].float().mean()), 3)
        out["first_loss"] = {side: round(first[f"{side}/{name}"], 4) for side in sides}
        # process CPU seconds per step (all threads): less sensitive to other processes than wall
        # time on a shared machine, a cross-check of the wall-clock ratio
        out["cpu_s_per_step"] = {side: round(cpu_med[f"{side}/{name}"], 3) for side in sides}
        if "transformers" in tps:
            out["cpu_ratio"] = round(cpu_med[f"transformers/{name}"] / cpu_med[f"megagsm/{name}"], 3)
        out["step_s_all"] = {side: [round(x, 3) for x in times[f"{side}/{name}"]] for side in sides}
        return out

    return {
        # headline: a GSM8K SFT batch (loss on response tokens only), as the trainer feeds it
        "workload": "gsm8k_sft",
        **figures("gsm8k_sft"),
        # the same loop with every token in the loss: identical work on both sides
        "all_tokens": figures("all_tokens"),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "model_flops_per_token": flops_tok,
        "params": params,
        "shape": args.shape, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch": [batch, seq], "repeats": args.repeats, "threads": torch.get_num_threads(),
        "megagsm_train_loss": TrainConfig().loss,
        "cpu_settings": {"malloc_tuning": cpu_malloc_settings(), "megagsm_fused_adamw": fused_adamw(mg_opt)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; figures are medians")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="20m", help="model shape (see above)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="model.dtype: auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--megagsm-only", action="store_true", help="skip the transformers loop")
    parser.add_argument("--no-memory", action="store_true", help="skip bench/loss_memory.py")
    args = parser.parse_args()
    result = throughput(args)
    if not args.no_memory:
        proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "loss_memory.py")],
                              capture_output=True, text=True, check=False,
                              env={k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")})
        if proc.returncode != 0:
            raise RuntimeError(f"bench/loss_memory.py failed:\n{proc.stderr[-3000:]}")
        result["loss_memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warnings

    warnings.filterwarnings("ignore")
    main()
