"""The synthetic GSM8K-format generator."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megagsm.data import synthetic
from megagsm.data.gsm8k import extract_final_answer, load_gsm8k_with_report
from megagsm.data.synthetic import LEVELS, LevelSpec, generate_splits, write_synthetic_dataset

_EQUATION = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)")


def _check_solution(question: str, answer: str, spec: LevelSpec) -> None:
    """Every step line is correct arithmetic, chained, and the final line is its result."""
    lines = answer.split("\n")
    assert lines[-1] == f"#### {extract_final_answer(answer)}"
    steps = [_EQUATION.search(line) for line in lines[:-1]]
    assert all(steps), answer
    assert spec.min_steps <= len(steps) <= spec.max_steps
    start = int(re.match(r"\w+ has (\d+) ", question).group(1))
    value = start
    for match in steps:
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        assert a == value
        assert op in spec.ops
        if op == "/":
            assert b > 0 and a % b == 0
        expected = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a // b}[op]()
        assert c == expected and 0 <= c <= spec.max_value
        assert str(b) in question and b > 0
        value = c
    assert int(extract_final_answer(answer)) == value


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_levels_are_correct_and_split_disjoint(level):
    train, test = generate_splits(300, 40, level=level, seed=11)
    assert len(train) == 300 and len(test) == 40
    assert len({p.question for p in test}) == 40
    assert not {p.question for p in train} & {p.question for p in test}
    for problem in train + test:
        _check_solution(problem.question, problem.answer, LEVELS[level])
        assert problem.final == int(extract_final_answer(problem.answer))


def test_level0_is_fixed_format():
    train, _ = generate_splits(200, 10, level=0, seed=0)
    pattern = re.compile(
        r"Tom has (\d+) apples\. He gets (\d+) more apples\. How many apples does Tom have now\?"
    )
    for p in train:
        a, b = map(int, pattern.fullmatch(p.question).groups())
        assert 0 <= a <= 99 and 1 <= b <= 99
        assert p.answer == f"{a} + {b} = {a + b}\n#### {a + b}"


def test_higher_levels_vary():
    train, _ = generate_splits(300, 10, level=3, seed=0)
    names = {p.question.split()[0] for p in train}
    ops = {m[2] for p in train for m in _EQUATION.finditer(p.answer)}
    assert len(names) >= 5 and ops == {"+", "-", "*", "/"}
    assert max(p.final for p in train) > 200


def test_seeded_determinism():
    a = generate_splits(50, 10, level=2, seed=5)
    b = generate_splits(50, 10, level=2, seed=5)
    c = generate_splits(50, 10, level=2, seed=6)
    assert a == b and a != c
    assert generate_splits(50, 10, level=1, seed=5) != a


def test_small_space_errors(monkeypatch):
    tiny = LevelSpec(1, 1, (0, 1), (0, 1), (2, 2), ("+",), False, False, 2)  # 4 possible problems
    monkeypatch.setitem(LEVELS, 99, tiny)
    train, test = generate_splits(20, 2, level=99, seed=0)
    assert len(train) == 20 and not {p.question for p in train} & {p.question for p in test}
    with pytest.raises(ValueError, match="only 4 unique test problems of 5"):
        generate_splits(1, 5, level=99, seed=0)
    with pytest.raises(ValueError, match="no train problems left"):
        generate_splits(1, 4, level=99, seed=0)
    with pytest.raises(ValueError, match="unknown level 7"):
        generate_splits(1, 1, level=7)


def test_write_and_load_back(tmp_path):
    train_path, test_path = write_synthetic_dataset(tmp_path / "syn", 30, 5, level=1, seed=2)
    rows, report = load_gsm8k_with_report(train_path, on_bad_row="error")
    assert len(rows) == 30 and report.count == 0
    first = json.loads(train_path.read_text().splitlines()[0])
    assert set(first) == {"question", "answer"}
    assert len(load_gsm8k_with_report(test_path)[0]) == 5
    assert not list(Path(tmp_path / "syn").glob(".*"))  # no temp files left behind


def test_cli(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "megagsm.data.synthetic", "--out", str(out), "--n-train", "12", "--n-test", "3",
         "--level", "0", "--seed", "4"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert "wrote 12 rows" in result.stdout
    assert len((out / "train.jsonl").read_text().splitlines()) == 12
    assert len((out / "test.jsonl").read_text().splitlines()) == 3
    expected_train, _ = synthetic.generate_splits(12, 3, level=0, seed=4)
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [line["question"] for line in lines] == [p.question for p in expected_train]
