"""python -m megagsm.data.prepare gsm8k: openai/gsm8k rows -> verl's RL parquet layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megagsm.data.gsm8k import load_gsm8k
from megagsm.data.prepare import build_parser, main
from megagsm.data.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def verl_reference(rows: list[dict], split: str):
    """What verl's examples/data_preprocess/gsm8k.py writes, re-done here with `datasets` the way that
    script does it (its process_fn, map with indices, to_parquet), as the independent truth."""
    import re

    import datasets

    def extract_solution(solution_str):
        return re.search("#### (\\-?[0-9\\.\\,]+)", solution_str).group(0).split("#### ")[1].replace(",", "")

    def process_fn(example, idx):
        question_raw = example.pop("question")
        answer_raw = example.pop("answer")
        return {"data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": question_raw + " " + INSTRUCTION}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": extract_solution(answer_raw)},
                "extra_info": {"split": split, "index": idx, "answer": answer_raw, "question": question_raw}}

    return datasets.Dataset.from_list(rows).map(process_fn, with_indices=True)


def _read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def test_round_trip_synthetic_prepare_load(tmp_path):
    train_jsonl, test_jsonl = write_synthetic_dataset(tmp_path / "syn", 40, 8, level=1, seed=3)
    assert main(["gsm8k", "--input", str(tmp_path / "syn"), "--out", str(tmp_path / "verl")]) == 0
    for split, source in [("train", train_jsonl), ("test", test_jsonl)]:
        original = load_gsm8k(source, on_bad_row="error")
        prepared = load_gsm8k(tmp_path / "verl" / f"{split}.parquet", on_bad_row="error", kind="parquet")
        assert [(e.question, e.answer, e.final_answer) for e in prepared] == \
               [(e.question, e.answer, e.final_answer) for e in original]
        assert all(e.data_source == "openai/gsm8k" and e.messages[0]["content"] == f"{e.question} {INSTRUCTION}"
                   for e in prepared)


def test_rows_and_schema_match_verl(tmp_path):
    rows = [{"question": "Q one?", "answer": "1 + 1 = 2\n#### 2"},
            {"question": "Q two?", "answer": "it costs 1,234 dollars\n#### 1,234"}]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["gsm8k", "--input", str(src), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.parquet"]  # one file: one split
    ours = _read(tmp_path / "out" / "train.parquet")
    reference = verl_reference(rows, "train")
    reference.to_parquet(str(tmp_path / "ref.parquet"))
    theirs = _read(tmp_path / "ref.parquet")
    assert ours.schema.remove_metadata() == theirs.schema.remove_metadata()
    assert ours.to_pylist() == theirs.to_pylist()
    assert ours.to_pylist()[1]["reward_model"] == {"style": "rule", "ground_truth": "1234"}


def test_saved_dataset_dict_and_test_input(tmp_path):
    import datasets

    rows = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert main(["gsm8k", "--input", str(tmp_path / "dd"), "--out", str(tmp_path / "a")]) == 0
    assert _read(tmp_path / "a" / "train.parquet").num_rows == 3
    test_rows = _read(tmp_path / "a" / "test.parquet").to_pylist()
    assert [r["extra_info"]["split"] for r in test_rows] == ["test"] and test_rows[0]["extra_info"]["index"] == 0
    train, test = tmp_path / "tr.jsonl", tmp_path / "te.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text(json.dumps(rows[2]) + "\n")
    assert main(["gsm8k", "--input", str(train), "--test-input", str(test), "--out", str(tmp_path / "b"),
                 "--limit", "2"]) == 0
    assert _read(tmp_path / "b" / "train.parquet").num_rows == 2
    assert _read(tmp_path / "b" / "test.parquet").to_pylist()[0]["extra_info"]["question"] == "Q2?"


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    syn = tmp_path / "syn"
    write_synthetic_dataset(syn, 5, 2)
    with (syn / "test.jsonl").open("a") as f:
        f.write(json.dumps({"question": "Q", "answer": "no final line"}) + "\n")
    out = tmp_path / "out"
    assert main(["gsm8k", "--input", str(syn), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megagsm.data.prepare: 1 bad row(s) in ")
    assert "test.jsonl row 2: line 3: 'answer' has no '#### <number>' final answer" in err
    assert not out.exists()  # train.parquet was not written either
    out.mkdir()
    assert main(["gsm8k", "--input", str(syn), "--out", str(out)]) == 2
    assert list(out.iterdir()) == []
    assert main(["gsm8k", "--input", str(syn), "--out", str(out), "--on-bad-row", "skip"]) == 0
    assert _read(out / "test.parquet").num_rows == 2
    capsys.readouterr()
    assert main(["gsm8k", "--input", str(syn), "--out", str(out), "--on-bad-row", "skip"]) == 2
    assert "already exist(s); pass --overwrite" in capsys.readouterr().err
    assert main(["gsm8k", "--input", str(syn), "--out", str(out), "--on-bad-row", "skip", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]  # no temp files left
    assert main(["gsm8k", "--input", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "--input: data file not found:" in capsys.readouterr().err


def test_cli_help_and_exit_status():
    help_text = build_parser().format_help()
    for option in ["--input", "--test-input", "--out", "--overwrite", "--on-bad-row", "--limit", "gsm8k"]:
        assert option in help_text
    done = subprocess.run([sys.executable, "-m", "megagsm.data.prepare", "gsm8k", "--input", "/nonexistent/x.jsonl",
                           "--out", "/tmp/never"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "x.jsonl" in done.stderr


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_bad_limit(tmp_path, limit, capsys):
    assert main(["gsm8k", "--input", "x", "--out", str(tmp_path), "--limit", limit]) == 2
    assert "--limit" in capsys.readouterr().err
