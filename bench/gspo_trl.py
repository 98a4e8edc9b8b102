"""TRL's GRPOTrainer as GSPO (importance_sampling_level="sequence"), one optimizer step per command:
the `--vs-trl` side of bench/gspo_step.py.

It runs in its own process (any interpreter with trl, transformers and torch: `--trl-python`), so
that TRL and accelerate never share a process with megagsm's runtime, and so that the two sides can
alternate: the worker blocks before each step until the bench sends a line, then reports the step's
time, so megagsm's and TRL's rounds interleave on the same machine load.

Shapes mirror megagsm's: the same HF weights in fp32 on CPU, the same prompt texts (tokenised by
TRL with the same tokenizer: the bench reports whether the ids are equal), `n` samples per prompt,
`new_tokens` sampled at temperature 1, one generation per optimizer step (steps_per_generation =
gradient_accumulation_steps = rollouts / micro_batch_size, so TRL skips its old-log-prob pass
exactly when megagsm does), GSPO's clip range, loss_type "grpo" (each sequence's token mean, the GSPO
paper's and megagsm's seq-mean-token-mean), beta 0, AdamW with the same lr, weight decay and clip.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

TAG = "@@trl "   # prefix of the protocol's lines on the worker's stdout (libraries may print too)


def _reward(completions, answer, **_):
    """GSM8K strict: the completion's '#### N' equals the ground truth."""
    out = []
    for text, truth in zip(completions, answer):
        found = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
        out.append(float(found is not None and found.group(1).replace(",", "") == truth))
    return out


def _say(**fields) -> None:
    sys.stdout.write(TAG + json.dumps(fields) + "\n")
    sys.stdout.flush()


def worker(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON file written by TRLWorker")
    spec = json.load(open(ap.parse_args(argv).spec))
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    ids = [tokenizer(text)["input_ids"] for text in spec["prompts"]]
    ids_equal = sum(a == b for a, b in zip(ids, spec["prompt_ids"])) / len(ids)
    rollouts = spec["prompts_per_step"] * spec["n"]
    config = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=rollouts // spec["micro_batch_size"], num_generations=spec["n"],
        max_completion_length=spec["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=spec["steps"],
        beta=0.0, num_iterations=1, epsilon=spec["clip_low"], epsilon_high=spec["clip_high"],
        importance_sampling_level="sequence", loss_type="grpo", scale_rewards="group",
        report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(spec["prompts"], spec["answers"])])
    timing = {}

    class Lockstep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _say(ready=state.global_step)
            sys.stdin.readline()
            timing.update(started=time.perf_counter(), cpu=time.process_time(), generate_s=0.0,
                          generate_cpu_s=0.0, completion_tokens=0)

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - timing["started"]
            _say(step_s=step_s, generate_s=timing["generate_s"], update_s=step_s - timing["generate_s"],
                 step_cpu_s=time.process_time() - timing["cpu"], generate_cpu_s=timing["generate_cpu_s"],
                 completion_tokens=timing["completion_tokens"])

    trainer = GRPOTrainer(model=model, reward_funcs=[_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Lockstep()])
    generate_and_score = trainer._generate_and_score_completions

    def timed(inputs):
        started, cpu = time.perf_counter(), time.process_time()
        out = generate_and_score(inputs)
        timing["generate_s"] += time.perf_counter() - started
        timing["generate_cpu_s"] += time.process_time() - cpu
        timing["completion_tokens"] += int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed
    _say(loaded=True, prompt_ids_equal=ids_equal, trl=trl.__version__, transformers=transformers.__version__,
         torch=torch.__version__, threads=torch.get_num_threads())
    trainer.train()
    _say(done=True)


class TRLWorker:
    """The bench's handle on a worker process: start() once, step() per round, close() at the end."""

    def __init__(self, python: str, spec: dict, spec_path: str):
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore",
                   TOKENIZERS_PARALLELISM="false")
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)   # a single process: accelerate must not look for a process group
        self.stderr = open(spec_path + ".stderr", "w+")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--spec", spec_path], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        self.info = self._read("loaded")

    def _read(self, key: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                msg = json.loads(line[len(TAG):])
                if key in msg:
                    return msg
        self.stderr.seek(0)
        raise RuntimeError(f"the TRL worker exited (code {self.proc.wait()}):\n{self.stderr.read()[-3000:]}")

    def step(self) -> dict:
        self._read("ready")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read("step_s")

    def close(self) -> None:
        self._read("done")
        self.proc.wait(timeout=60)
        self.stderr.close()


if __name__ == "__main__":
    worker()
