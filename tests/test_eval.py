"""megagsm.eval: the metrics against hand counts (generation replaced by fixed responses), and the CLI
end to end on a tiny HF model and a verl-layout parquet file."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megagsm.data.gsm8k import GSM8KExample
from megagsm.eval import EvalSampling, answer_key, evaluate_model
from megagsm.rewards import scorer_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __len__(self):
        return 100

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + (ord(c) % 90) for c in text[:20]]}


def _fake_generation(responses):
    """generate_many stand-in: the responses of prompt j are responses[j] (n of them)."""

    def generate(chunks, prompts, params, tokenizer, **kwargs):
        assert len(prompts) == len(responses) and all(len(r) == params.n for r in responses)
        return SimpleNamespace(texts=[text for group in responses for text in group])

    return generate


def _evaluate(monkeypatch, examples, responses, n, reward="auto"):
    import megagsm.eval.core as core

    monkeypatch.setattr(core, "generate_many", _fake_generation(responses))
    scorer = scorer_for(reward, "strict", [e.data_source for e in examples])
    return evaluate_model([None], examples, _Tokenizer(), scorer, EvalSampling(n=n, temperature=0.7),
                          template="bare", max_prompt_len=64, keep_samples=True)


def test_mean_pass_and_majority_by_hand(monkeypatch):
    examples = [GSM8KExample(question="q0", answer="#### 5", final_answer="5"),
                GSM8KExample(question="q1", answer="#### 7", final_answer="7"),
                GSM8KExample(question="q2", answer="", final_answer="3", data_source="math_dapo")]
    responses = [["#### 5", "#### 4", "#### 4"],          # 1 of 3 correct; majority 4: wrong
                 ["#### 7", "#### 7", "so #### 8"],       # 2 of 3; majority 7: right
                 ["Answer: 3", "Answer: 2", "Answer: 9"]]  # math_dapo: 1 of 3 (+1 / -1 scores); tie -> first
    result = _evaluate(monkeypatch, examples, responses, n=3)
    assert result.accuracy == pytest.approx(4 / 9)
    assert result.pass_at_k == pytest.approx(3 / 3)
    assert result.maj_at_k == pytest.approx(2 / 3)  # prompt 2's vote is a three-way tie won by "3"
    assert result.per_source == {"math_dapo": pytest.approx(1 / 3), "openai/gsm8k": pytest.approx(3 / 6)}
    assert [s["reward"] for s in result.samples[6:]] == [1.0, -1.0, -1.0]
    row = result.metrics()
    assert row["accuracy"] == result.accuracy and row["pass_at_3"] == 1.0 and row["eval_problems"] == 3.0
    assert row["accuracy/math_dapo"] == pytest.approx(1 / 3)


def test_greedy_single_sample_is_plain_accuracy(monkeypatch):
    examples = [GSM8KExample(question=f"q{i}", answer=f"#### {i}", final_answer=str(i)) for i in range(4)]
    result = _evaluate(monkeypatch, examples, [["#### 0"], ["#### 9"], ["#### 2"], ["no answer"]], n=1)
    assert result.accuracy == result.pass_at_k == result.maj_at_k == 0.5
    assert set(result.metrics()) == {"accuracy", "eval_problems"}  # no pass@1 / per-source noise


def test_answer_key_reads_each_answer_style():
    assert answer_key("work\n#### 1,234") == "1234"
    assert answer_key("so\nAnswer: 42.") == "42"
    assert answer_key("thus \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert answer_key("no marker\nlast line") == "last line"


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megagsm.data.prepare import main as prepare
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs
    from megagsm.testing.tiny_runs import hf_model_dir

    root = tmp_path_factory.mktemp("eval")
    inputs = prepare_inputs(root / "inputs", DemoSpec(n_train=8, n_test=3,
                                                      model=dict(TINY_MODEL, max_position_embeddings=128)))
    hf_model_dir(inputs["base"], root / "hf")
    assert prepare(["gsm8k", "--input", str(root / "inputs" / "data"), "--out", str(root / "verl")]) == 0
    return root


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "megagsm.eval", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_cli_scores_an_hf_dir_on_verl_parquet(tiny):
    out = tiny / "results.jsonl"
    run = _cli("--load", str(tiny / "hf"), "--data", str(tiny / "verl" / "test.parquet"), "--n", "2",
               "--temperature", "0.8", "--max-new-tokens", "4", "--output", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[-1] == summary and len(lines) == 1 + 3 * 2
    for row in lines[:-1]:
        assert {"prompt", "response", "reward", "data_source", "correct"} <= set(row)
        assert row["data_source"] == "openai/gsm8k" and "Let's think step by step" in row["prompt"]
    assert summary["n"] == 2 and summary["num_prompts"] == 3
    correct = [row["correct"] for row in lines[:-1]]
    assert summary["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert set(summary["per_source"]) == {"openai/gsm8k"}
    assert 0.0 <= summary["maj_at_k"] <= summary["pass_at_k"] <= 1.0


def test_cli_user_errors_are_one_line_and_exit_2(tiny):
    missing = _cli("--load", str(tiny / "nope"), "--data", str(tiny / "verl" / "test.parquet"))
    assert missing.returncode == 2 and "--load=" in missing.stderr and "Traceback" not in missing.stderr
    bad_data = _cli("--load", str(tiny / "hf"), "--data", str(tiny / "absent.parquet"))
    assert bad_data.returncode == 2 and "absent.parquet" in bad_data.stderr and "Traceback" not in bad_data.stderr
    bad_n = _cli("--load", str(tiny / "hf"), "--data", str(tiny / "verl" / "test.parquet"), "--n", "0")
    assert bad_n.returncode == 2 and "--n=0" in bad_n.stderr
