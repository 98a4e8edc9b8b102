"""Scoring a model on held-out problems: n samples per prompt from the model's own weights (the
in-process engine), each scored with the reward of its example's data source.

Reported (the same numbers for the trainers' periodic evaluation and `python -m megagsm.eval`):
- `accuracy`: mean over all samples of "earned the full score" (mean@n; with n=1 and greedy
  decoding, the classic exact-answer accuracy),
- `pass_at_k` (k = n): fraction of prompts with at least one correct sample,
- `maj_at_k`: fraction of prompts whose most frequent extracted answer is a correct one,
- `per_source`: accuracy per data_source.
Prompts are sharded over data-parallel ranks; the result is the same on every rank (collective).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from megagsm.data.prompts import encode_example_prompt, truncate_prompt
from megagsm.errors import UserError
from megagsm.generation import SamplingParams, generate_many
from megagsm.rewards.gsm8k import extract_answer
from megagsm.rewards.latex_answers import last_boxed
from megagsm.rewards.math_rewards import dapo_extract
from megagsm.rewards.scoring import BatchScorer
from megagsm.runtime.collectives import dp_group, dp_rank_and_size, gather_objects


@dataclass(frozen=True)
class EvalSampling:
    n: int = 1
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class EvalResult:
    accuracy: float
    pass_at_k: float
    maj_at_k: float
    n: int
    num_prompts: int
    per_source: dict[str, float]
    samples: list[dict] = field(default_factory=list)  # every sample (rank 0 holds all when asked)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics for metrics.jsonl: accuracy, pass@n / maj@n when n > 1, per-source accuracy when
        there are several sources, and the number of problems."""
        row = {f"{prefix}accuracy": self.accuracy, f"{prefix}eval_problems": float(self.num_prompts)}
        if self.n > 1:
            row[f"{prefix}pass_at_{self.n}"] = self.pass_at_k
            row[f"{prefix}maj_at_{self.n}"] = self.maj_at_k
        if len(self.per_source) > 1:
            row.update({f"{prefix}accuracy/{source}": acc for source, acc in self.per_source.items()})
        return row


def answer_key(text: str) -> str:
    """The answer a response commits to, for majority voting: after `####`, an `Answer:` line, a
    `\\boxed{}`, else its last line."""
    for extracted in (extract_answer(text, "strict"), dapo_extract(text), last_boxed(text)):
        if extracted:
            return extracted.strip().rstrip(".").replace(",", "")
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _sampling_params(sampling: EvalSampling, tokenizer) -> SamplingParams:
    eos = tokenizer.eos_token_id
    stops = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    greedy = sampling.temperature == 0.0
    return SamplingParams(max_new_tokens=sampling.max_new_tokens, greedy=greedy,
                          temperature=0.0 if greedy else sampling.temperature, top_p=sampling.top_p,
                          n=sampling.n, seed=sampling.seed, stop_token_ids=stops, logprobs="none")


def evaluate_model(model_chunks: list, examples: list, tokenizer, scorer: BatchScorer, sampling: EvalSampling, *,
                   template: str, max_prompt_len: int, truncation: str = "left", max_batch_size: int = 8,
                   vocab_limit: int | None = None, keep_samples: bool = False,
                   continuous_batching: bool = True) -> EvalResult:
    """Scores `examples` (see the module doc). keep_samples: gather every sample's record to rank 0.
    continuous_batching: generation.continuous_batching (generate_refilled, else generate_batched)."""
    dp_rank, dp_size = dp_rank_and_size()
    mine = list(range(dp_rank, len(examples), dp_size))
    prompts = [truncate_prompt(encode_example_prompt(examples[i], tokenizer, template), max_prompt_len, truncation,
                               what=f"held-out example {i}") for i in mine]
    for i, ids in zip(mine, prompts):
        if not ids:
            raise UserError(f"held-out example {i} tokenizes to no tokens with the tokenizer of this model "
                            f"({getattr(tokenizer, 'name_or_path', '?')}): is it the model's own tokenizer?")
    texts: list[str] = []
    if prompts:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = generate_many(model_chunks, prompts, _sampling_params(sampling, tokenizer), tokenizer,
                            continuous_batching=continuous_batching, max_batch_size=max_batch_size,
                            pad_token_id=pad, vocab_limit=vocab_limit if vocab_limit is not None else len(tokenizer))
        texts = list(out.texts)
    n = sampling.n
    records = []
    for j, text in enumerate(texts):
        example = examples[mine[j // n]]
        records.append({"index": mine[j // n], "sample": j % n, "response": text,
                        "data_source": getattr(example, "data_source", "openai/gsm8k"),
                        "ground_truth": example.final_answer})
    scores = scorer.scores([r["response"] for r in records], [r["ground_truth"] for r in records],
                           [r["data_source"] for r in records])
    for record, score in zip(records, scores):
        record["reward"], record["correct"] = score, score >= 1.0
    per_prompt: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        per_prompt[record["index"]].append(record)
    local = {"correct": sum(r["correct"] for r in records), "samples": len(records),
             "pass": sum(any(r["correct"] for r in group) for group in per_prompt.values()),
             "maj": sum(_majority_correct(group) for group in per_prompt.values()), "prompts": len(per_prompt),
             "sources": _source_counts(records), "records": records if keep_samples else []}
    everyone = gather_objects(local, dp_group())
    totals = {k: sum(part[k] for part in everyone) for k in ("correct", "samples", "pass", "maj", "prompts")}
    sources: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for part in everyone:
        for source, (correct, count) in part["sources"].items():
            sources[source][0] += correct
            sources[source][1] += count
    samples = sorted((r for part in everyone for r in part["records"]), key=lambda r: (r["index"], r["sample"]))
    return EvalResult(accuracy=totals["correct"] / max(totals["samples"], 1),
                      pass_at_k=totals["pass"] / max(totals["prompts"], 1),
                      maj_at_k=totals["maj"] / max(totals["prompts"], 1), n=n, num_prompts=totals["prompts"],
                      per_source={s: c / max(k, 1) for s, (c, k) in sorted(sources.items())}, samples=samples)


def _majority_correct(group: list[dict[str, Any]]) -> bool:
    votes = Counter(answer_key(r["response"]) for r in group)
    top = votes.most_common(1)[0][0]
    return any(r["correct"] for r in group if answer_key(r["response"]) == top)


def _source_counts(records: list[dict]) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        counts[r["data_source"]][0] += int(r["correct"])
        counts[r["data_source"]][1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}
