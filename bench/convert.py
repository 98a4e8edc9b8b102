"""Conversion throughput and memory, against a plain safetensors copy of the same data.

    python bench/convert.py                 # ~1 GB synthetic Llama-shaped bf16 checkpoint
    python bench/convert.py --size-gb 0.05  # quicker

Writes a synthetic HF checkpoint (random bf16 weights, 512 MB shards), then times in fresh
processes (each measurement repeated, the fastest run counts): (1) plain copy: every shard read with safetensors.load_file and written back with
save_file; (2) hf-to-mcore (1 process); (3) mcore-to-hf (1 process). Checks the round trip is
bit-exact and prints one JSON line. Peak RSS is VmHWM of each process; `over_baseline` subtracts
the RSS the process already had before converting (python + torch + megatron + runtime).
Goals (issue 3): conversion within 2x the plain copy's time; peak RSS over baseline < 3x the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    """Peak RSS of this process image: VmHWM (reset by exec, unlike ru_maxrss, which a child
    inherits from the process that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shapes(args) -> list[tuple[str, tuple]]:
    h, f, v, d = args.hidden, args.ffn, args.vocab, args.hidden // args.heads
    kv = args.kv_heads * d
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(args.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_checkpoint(args, directory: Path) -> dict:
    import torch

    from megagsm.checkpoint.safetensors_io import ShardedSafetensorsWriter

    directory.mkdir(parents=True)
    shapes = _shapes(args)
    writer = ShardedSafetensorsWriter(directory, [(n, s, torch.bfloat16) for n, s in shapes], 512 * 2**20)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        writer.write(name, torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16))
    writer.finish()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "intermediate_size": args.ffn, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
              "vocab_size": args.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    largest = max(s[0] * (s[1] if len(s) > 1 else 1) for _, s in shapes) * 2
    return {"model_bytes": writer.total_bytes, "largest_tensor_bytes": largest, "tensors": len(shapes)}


def phase(name: str, work: Path, repeat: int) -> dict:
    """Runs in a fresh process: `repeat` conversions, the fastest one counts (the machine is shared)."""
    if name == "copy":
        from safetensors.torch import load_file, save_file

        def once():
            out = work / "copy"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for f in sorted((work / "hf").glob("*.safetensors")):
                save_file(load_file(f), out / f.name, metadata={"format": "pt"})
    elif name == "hf_to_mcore":
        from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore
        from megagsm.config.parallel import ParallelConfig
        from megagsm.runtime import init_runtime

        parallel = ParallelConfig(backend="gloo")
        init_runtime(parallel)

        def once():
            shutil.rmtree(work / "mcore", ignore_errors=True)
            convert_hf_to_mcore(work / "hf", work / "mcore", parallel, progress=False)
    elif name == "mcore_to_hf":
        from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf

        def once():
            shutil.rmtree(work / "back", ignore_errors=True)
            convert_mcore_to_hf(work / "mcore", work / "back", max_shard_bytes=512 * 2**20, progress=False)
    else:
        raise ValueError(name)
    baseline = _rss_mb()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    peak = _peak_mb()
    return {"seconds": round(min(times), 3), "all_seconds": [round(t, 3) for t in times],
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
            "over_baseline_mb": round(peak - baseline, 1)}


def _run_phase(name: str, work: Path, repeat: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--phase", name, "--workdir", str(work),
                           "--repeat", str(repeat)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False
    for key in ia:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="approximate checkpoint size (sets --layers)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    parser.add_argument("--ffn", type=int, default=5632, help="MLP size (default 5632)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--kv-heads", type=int, default=16, help="KV heads (default 16)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: from --size-gb)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, fastest counts (default 3)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.workdir), args.repeat)))
        return

    h, f, v, kv = args.hidden, args.ffn, args.vocab, args.kv_heads * (args.hidden // args.heads)
    per_layer = 2 * (2 * h * h + 2 * kv * h + 3 * f * h + 2 * h)
    if args.layers is None:
        args.layers = max(1, round((args.size_gb * 1e9 - 4 * v * h) / per_layer))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="megagsm-bench-convert-"))
    try:
        sizes = make_checkpoint(args, work / "hf")
        copy = _run_phase("copy", work, args.repeat)
        to_mcore = _run_phase("hf_to_mcore", work, args.repeat)
        to_hf = _run_phase("mcore_to_hf", work, args.repeat)
        exact = _same_tensors(work / "hf", work / "back")
        mb = sizes["model_bytes"] / 1e6
        for result in (copy, to_mcore, to_hf):
            result["mb_per_s"] = round(mb / max(result["seconds"], 1e-9), 1)
        largest_mb = sizes["largest_tensor_bytes"] / 2**20
        report = {
            "bench": "convert",
            "model_mb": round(mb, 1),
            "largest_tensor_mb": round(largest_mb, 1),
            "layers": args.layers,
            "plain_copy": copy,
            "hf_to_mcore": to_mcore,
            "mcore_to_hf": to_hf,
            "time_vs_copy": {"hf_to_mcore": round(to_mcore["seconds"] / copy["seconds"], 2),
                             "mcore_to_hf": round(to_hf["seconds"] / copy["seconds"], 2)},
            "rss_over_baseline_vs_largest": {
                "hf_to_mcore": round(to_mcore["over_baseline_mb"] / largest_mb, 2),
                "mcore_to_hf": round(to_hf["over_baseline_mb"] / largest_mb, 2)},
            "round_trip_bit_exact": exact,
        }
        report["goals_met"] = bool(
            exact and max(report["time_vs_copy"].values()) <= 2.0
            and max(report["rss_over_baseline_vs_largest"].values()) < 3.0
        )
        print(json.dumps(report))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
