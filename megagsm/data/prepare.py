"""``python -m megagsm.data.prepare gsm8k --input SRC --out DIR``: openai/gsm8k rows -> verl's RL layout.

Writes ``DIR/train.parquet`` and ``DIR/test.parquet`` with the rows verl's
``examples/data_preprocess/gsm8k.py`` writes, so files made here and files made there are
interchangeable (and megagsm reads both with no data option besides the path):

    data_source  "openai/gsm8k"
    prompt       [{"role": "user", "content": question + ' Let\\'s think step by step and output the final answer after "####".'}]
    ability      "math"
    reward_model {"style": "rule", "ground_truth": the number after "#### " (commas removed)}
    extra_info   {"split": "train" | "test", "index": row number in the split, "answer": the worked
                  solution, "question": the question}

Both files are written to temp files in DIR and renamed when both are complete: an error leaves no
partial output. Bad input (a missing file, a bad row, an existing output without --overwrite) ends in
one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from megagsm.data.gsm8k import GSM8KExample, extract_final_answer, load_gsm8k
from megagsm.data.prompts import STEP_BY_STEP
from megagsm.errors import UserError, exit_on_user_error

DATA_SOURCE = "openai/gsm8k"
SPLITS = ("train", "test")
# verl's extract_solution: the first "#### " and the number after it, commas removed
_VERL_SOLUTION = re.compile(r"#### (\-?[0-9\.\,]+)")
_SPLIT_FILE_PATTERNS = ("{split}.parquet", "{split}.jsonl", "{split}.json", "{split}-*.parquet",
                        "main/{split}-*.parquet", "data/{split}-*.parquet")


def verl_ground_truth(answer: str) -> str:
    match = _VERL_SOLUTION.search(answer)
    if match is not None:
        return match.group(1).replace(",", "")
    return extract_final_answer(answer) or ""


def verl_row(example: GSM8KExample, split: str, index: int) -> dict:
    """One row of verl's GSM8K parquet files."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": STEP_BY_STEP.user_text(example.question)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": verl_ground_truth(example.answer)},
        "extra_info": {"split": split, "index": index, "answer": example.answer, "question": example.question},
    }


def verl_schema():
    import pyarrow as pa

    text = pa.string()
    return pa.schema([
        ("data_source", text),
        ("prompt", pa.list_(pa.struct([("role", text), ("content", text)]))),
        ("ability", text),
        ("reward_model", pa.struct([("style", text), ("ground_truth", text)])),
        ("extra_info", pa.struct([("split", text), ("index", pa.int64()), ("answer", text), ("question", text)])),
    ])


def _split_file(directory: Path, split: str) -> Path | None:
    for pattern in _SPLIT_FILE_PATTERNS:
        found = sorted(directory.glob(pattern.format(split=split)))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(f"--input {directory}: several {split} files ({', '.join(p.name for p in found)}); "
                            "merge them or pass one with --input/--test-input")
    return None


def split_sources(source: str, test_source: str | None) -> dict[str, str]:
    """split -> what load_gsm8k reads for it (a file, a datasets dir or name with the split)."""
    path = Path(source).expanduser()
    if test_source is not None:
        return {"train": source, "test": test_source}
    if path.is_file() or (path / "state.json").exists():  # one file, or one saved Dataset: one split
        return {"train": source}
    if path.is_dir() and not (path / "dataset_dict.json").exists():
        files = {split: _split_file(path, split) for split in SPLITS}
        if any(files.values()):
            return {split: str(f) for split, f in files.items() if f is not None}
    return {split: source for split in SPLITS}  # a save_to_disk dir or a datasets name: both splits


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="row", disable=None if len(items) >= 1000 else True, file=sys.stderr)


def write_tables(out: Path, tables: dict[str, object], overwrite: bool) -> list[Path]:
    """Write ``{split: pyarrow table}`` as ``out/<split>.parquet``, all or nothing."""
    import pyarrow.parquet as pq

    targets = {split: out / f"{split}.parquet" for split in tables}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"--out: {', '.join(existing)} already exist(s); pass --overwrite or another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    temps: dict[str, str] = {}
    try:
        for split, table in tables.items():
            fd, temps[split] = tempfile.mkstemp(prefix=f".{split}.parquet.", suffix=".tmp", dir=out)
            os.close(fd)
            pq.write_table(table, temps[split])
            os.chmod(temps[split], 0o666 & ~_umask())
        for split, tmp in temps.items():
            os.replace(tmp, targets[split])
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the parquet files ({e.strerror or e})") from None
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return list(targets.values())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare_gsm8k(source: str, out: str | os.PathLike, *, test_source: str | None = None, overwrite: bool = False,
                  on_bad_row: str = "error", limit: int | None = None) -> dict[str, int]:
    """Convert openai/gsm8k rows to verl's layout under ``out``; returns the row count per split."""
    import pyarrow as pa

    tables, counts = {}, {}
    for split, where in split_sources(source, test_source).items():
        field = "--test-input" if where == test_source else "--input"
        examples = load_gsm8k(where, split, on_bad_row=on_bad_row, limit=limit, field=field)
        rows = [verl_row(e, split, i) for i, e in enumerate(_progress(examples, f"{split} rows"))]
        tables[split] = pa.Table.from_pylist(rows, schema=verl_schema())
        counts[split] = len(rows)
    write_tables(Path(out).expanduser(), tables, overwrite)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megagsm.data.prepare",
        description="Convert a dataset to verl's RL parquet layout (train.parquet, test.parquet), "
                    "the rows verl's examples/data_preprocess scripts write.",
    )
    parser.add_argument("dataset", choices=["gsm8k"], help="which dataset's conversion to run (gsm8k: openai/gsm8k)")
    parser.add_argument("--input", required=True, metavar="SRC",
                        help="openai/gsm8k rows: a datasets name (openai/gsm8k), a save_to_disk directory, a "
                             "directory with train/test .jsonl or .parquet files (the hub's main/*.parquet "
                             "too), or one .jsonl/.parquet file (then only train.parquet, unless --test-input)")
    parser.add_argument("--test-input", metavar="FILE", default=None,
                        help="the test split's file when --input is a single file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR/train.parquet and DIR/test.parquet")
    parser.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                        help="a row without question, answer or '#### N': stop naming it (default), or skip it")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="keep the first N rows of each split")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit={args.limit}: allowed >= 1")
        counts = prepare_gsm8k(args.input, args.out, test_source=args.test_input, overwrite=args.overwrite,
                               on_bad_row=args.on_bad_row, limit=args.limit)
        for split, n in counts.items():
            print(f"wrote {n} rows to {Path(args.out) / f'{split}.parquet'}")
        return 0

    return exit_on_user_error(run, prefix="megagsm.data.prepare")


if __name__ == "__main__":
    sys.exit(main())
