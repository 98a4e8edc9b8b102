"""Seeded generator of GSM8K-format word problems for CPU-sized runs.

Each problem is a chain of integer steps applied to one quantity ("Tom has 3 apples. He gets 4 more
apples. ..."), with a worked solution of one ``a op b = c`` line per step and the GSM8K final line
``#### c``. Levels set the number of steps, the number ranges, the operations and how varied the
wording is:

- level 0: one addition (a in 0..99, b in 1..99) in one fixed sentence; solution ``"38 + 4 = 42\\n#### 42"``.
  Measured: a 0.85M-parameter causal transformer (4 layers, width 128, this package's digit-splitting
  tokenizer and default prompt) reached 26% exact answers on held-out problems after 400 steps of
  batch 32 (~1 minute on one CPU thread) and 76% after 1000 steps. Numbers 0..99 rather than 0..9: with
  only 100 possible problems a held-out test split is unseen pairs a small model cannot infer (it
  memorised the train pairs and scored 5% on the rest).
- level 1: one or two steps of + / - with numbers up to 99, fixed person and item, fixed sentences.
- level 2: two or three steps of + - *, numbers up to 100, varied names, items and sentences.
- level 3: three or four steps of + - * /, numbers up to 200, prose solution lines.
- level 4: four to six steps, numbers up to 1000.

Test questions are unique and never appear in the train split (train may repeat questions, more so
when the level's problem space is small). Same seed, same level, same sizes: same files.

CLI: ``python -m megagsm.data.synthetic --out DIR --n-train N --n-test N --level L --seed S`` writes
``DIR/train.jsonl`` and ``DIR/test.jsonl`` with ``question`` and ``answer`` keys.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LevelSpec:
    min_steps: int
    max_steps: int
    start_range: tuple[int, int]  # the starting quantity
    operand_range: tuple[int, int]  # operands of + and -
    factor_range: tuple[int, int]  # operands of * and /
    ops: tuple[str, ...]
    varied_wording: bool  # random names, items and sentence variants
    prose_solution: bool  # "After that, Tom has 3 + 4 = 7 apples." instead of "3 + 4 = 7"
    max_value: int  # intermediate results stay within [0, max_value]


LEVELS: dict[int, LevelSpec] = {
    0: LevelSpec(1, 1, (0, 99), (1, 99), (2, 2), ("+",), False, False, 198),
    1: LevelSpec(1, 2, (0, 99), (1, 99), (2, 2), ("+", "-"), False, False, 199),
    2: LevelSpec(2, 3, (1, 100), (1, 100), (2, 5), ("+", "-", "*"), True, False, 1000),
    3: LevelSpec(3, 4, (1, 200), (1, 200), (2, 9), ("+", "-", "*", "/"), True, True, 10000),
    4: LevelSpec(4, 6, (1, 1000), (1, 1000), (2, 12), ("+", "-", "*", "/"), True, True, 100000),
}

_PEOPLE = [("Tom", "He"), ("Anna", "She"), ("Ravi", "He"), ("Mei", "She"), ("Carlos", "He"), ("Zoe", "She"),
           ("Omar", "He"), ("Lena", "She"), ("Kofi", "He"), ("Ines", "She"), ("Yuki", "She"), ("Sam", "He")]
_FRIENDS = ["Ben", "Lucy", "Ahmed", "Sara", "Ivan", "Nora", "Leo", "Maya"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "shells", "cards", "stamps"]
_OP_SYMBOL = {"+": "+", "-": "-", "*": "*", "/": "/"}

# Sentence variants per operation; {P} person, {p} pronoun, {f} friend, {n} operand, {i} items.
_FIXED_SENTENCES = {
    "+": ["{p} gets {n} more {i}."],
    "-": ["{p} gives {n} {i} to a friend."],
    "*": ["{p} then has {n} times as many {i}."],
    "/": ["{p} splits the {i} into {n} equal groups and keeps one group."],
}
_VARIED_SENTENCES = {
    "+": ["{p} gets {n} more {i}.", "{f} gives {P} {n} {i}.", "{p} buys {n} more {i} at the store.",
          "{p} finds {n} more {i}."],
    "-": ["{p} gives {n} {i} to {f}.", "{p} loses {n} {i}.", "{p} sells {n} {i}.",
          "{p} uses {n} of the {i}."],
    "*": ["{p} then has {n} times as many {i}.", "The number of {i} {P} has becomes {n} times as large.",
          "{f} helps {P} collect until {P} has {n} times as many {i}."],
    "/": ["{p} splits the {i} into {n} equal groups and keeps one group.",
          "{p} shares the {i} equally among {n} friends, including {P}, and keeps one share.",
          "{P} keeps only one of every {n} {i}."],
}
_PROSE_LEAD = {"+": "After that,", "-": "Then", "*": "Now", "/": "After sharing,"}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    final: int


def _apply(op: str, x: int, n: int) -> int:
    if op == "+":
        return x + n
    if op == "-":
        return x - n
    if op == "*":
        return x * n
    return x // n


def _pick_step(rng: random.Random, spec: LevelSpec, x: int) -> tuple[str, int] | None:
    """An (op, operand) whose result stays in [0, max_value] (exact division); None if none fits."""
    ops = list(spec.ops)
    rng.shuffle(ops)
    for op in ops:
        lo, hi = spec.factor_range if op in "*/" else spec.operand_range
        if op == "-":
            hi = min(hi, x)
        if op == "+":
            hi = min(hi, spec.max_value - x)
        if op == "*":
            hi = min(hi, spec.max_value // max(x, 1))
        if op == "/":
            candidates = [n for n in range(max(lo, 2), hi + 1) if x % n == 0 and x > 0]
            if candidates:
                return op, rng.choice(candidates)
            continue
        if hi >= lo:
            return op, rng.randint(lo, hi)
    return None


def generate_problem(rng: random.Random, level: int) -> Problem:
    spec = LEVELS[level]
    if spec.varied_wording:
        person, pronoun = rng.choice(_PEOPLE)
        friend = rng.choice([f for f in _FRIENDS if f != person])
        items = rng.choice(_ITEMS)
    else:
        (person, pronoun), friend, items = _PEOPLE[0], _FRIENDS[0], _ITEMS[0]
    sentences_by_op = _VARIED_SENTENCES if spec.varied_wording else _FIXED_SENTENCES
    n_steps = rng.randint(spec.min_steps, spec.max_steps)
    x = rng.randint(*spec.start_range)
    sentences = [f"{person} has {x} {items}."]
    lines = []
    for _ in range(n_steps):
        step = _pick_step(rng, spec, x)
        if step is None:
            break
        op, n = step
        template = rng.choice(sentences_by_op[op])
        sentences.append(template.format(P=person, p=pronoun, f=friend, n=n, i=items))
        y = _apply(op, x, n)
        equation = f"{x} {_OP_SYMBOL[op]} {n} = {y}"
        lines.append(f"{_PROSE_LEAD[op]} {person} has {equation} {items}." if spec.prose_solution else equation)
        x = y
    sentences.append(f"How many {items} does {person} have now?")
    answer = "\n".join(lines + [f"#### {x}"])
    return Problem(question=" ".join(sentences), answer=answer, final=x)


def generate_splits(
    n_train: int, n_test: int, level: int = 0, seed: int = 0, *, max_attempts_factor: int = 50
) -> tuple[list[Problem], list[Problem]]:
    """Unique test problems, then train problems that are never test questions (repeats allowed)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}; known levels: {sorted(LEVELS)}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    rng = random.Random(f"megagsm-synthetic-{seed}-{level}")
    test: list[Problem] = []
    test_questions: set[str] = set()
    attempts = 0
    while len(test) < n_test:
        attempts += 1
        if attempts > max_attempts_factor * (n_test + 20):
            raise ValueError(
                f"level {level}: found only {len(test)} unique test problems of {n_test} requested; "
                "the level's problem space is too small, ask for fewer test problems"
            )
        problem = generate_problem(rng, level)
        if problem.question not in test_questions:
            test_questions.add(problem.question)
            test.append(problem)
    train: list[Problem] = []
    attempts = 0
    while len(train) < n_train:
        attempts += 1
        if attempts > max_attempts_factor * (n_train + 20):
            raise ValueError(f"level {level}: the test split holds (almost) every problem; no train problems left")
        problem = generate_problem(rng, level)
        if problem.question not in test_questions:
            train.append(problem)
    return train, test


def _write_jsonl(path: Path, problems: list[Problem]) -> None:
    from megagsm.utils.atomic import write_text_atomic

    write_text_atomic(path, "".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                                    for p in problems))


def write_synthetic_dataset(
    out_dir: str | os.PathLike, n_train: int, n_test: int, level: int = 0, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; returns their paths."""
    train, test = generate_splits(n_train, n_test, level, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out / "train.jsonl", out / "test.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(test_path, test)
    return train_path, test_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic GSM8K-format dataset (train.jsonl, test.jsonl).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--level", type=int, default=0, choices=sorted(LEVELS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_path, test_path = write_synthetic_dataset(args.out, args.n_train, args.n_test, args.level, args.seed)
    print(f"wrote {args.n_train} rows to {train_path} and {args.n_test} rows to {test_path}")


if __name__ == "__main__":
    main()
