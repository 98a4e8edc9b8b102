"""Bad data files and rows: one UserError line naming the file, the row and the field (issue 13)."""

import json

import pytest

from megagsm.config.data import DataConfig
from megagsm.data.from_config import load_config_examples
from megagsm.data.gsm8k import BadRowError, load_gsm8k, load_gsm8k_with_report
from megagsm.data.sources import DataFileError, DataFileNotFoundError
from megagsm.errors import UserError

GOOD = {"question": "Tom has 2 apples. He gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"}


def _jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return path


def _error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message, "a user error is one line"
    return message


def test_malformed_jsonl_line_names_file_row_and_line(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, b'{"question": "Q", "answer": ', GOOD])
    message = _error(BadRowError, load_gsm8k, path, on_bad_row="error")
    assert f"1 bad row(s) in {path}: {path} row 1: line 2: invalid JSON" in message
    assert "data.on_bad_row=skip" in message
    assert len(load_gsm8k(path, on_bad_row="skip")) == 2


def test_row_without_answer_column_names_the_field(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, {"question": "Q"}])
    message = _error(BadRowError, load_gsm8k, path, on_bad_row="error")
    assert f"{path} row 1: line 2: missing 'answer'" in message


def test_answer_without_final_line(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"question": "Q", "answer": "it is five"}, GOOD])
    message = _error(BadRowError, load_gsm8k, path, on_bad_row="error")
    assert f"{path} row 0: line 1: 'answer' has no '#### <number>' final answer" in message


def test_parquet_with_other_columns_names_found_and_expected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "Q", "solution": "#### 1"}]), path)
    message = _error(UserError, load_gsm8k, path, on_bad_row="skip")  # refused even when skipping rows
    assert f"{path}: columns found ['problem', 'solution']; expected ['question', 'answer'] (openai/gsm8k)" in message
    assert "verl's RL layout" in message and "data.prompt_key" in message
    keyed = _error(UserError, load_gsm8k, path, prompt_key="problem", answer_key="answer")
    assert "expected 'problem' (data.prompt_key) and 'answer' (data.answer_key)" in keyed
    assert [e.final_answer for e in load_gsm8k(path, prompt_key="problem", answer_key="solution")] == ["1"]


@pytest.mark.parametrize("kind", ["jsonl", "blank_jsonl", "parquet"])
def test_empty_file_says_no_examples(tmp_path, kind):
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    else:
        path = tmp_path / "empty.jsonl"
        path.write_text("" if kind == "jsonl" else "\n  \n")
    message = _error(DataFileError, load_gsm8k, path)
    assert message == f"no examples in {path}: it has no rows"


def test_every_row_bad_under_skip_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"question": "Q"}, {"question": "R"}])
    message = _error(DataFileError, load_gsm8k, path, on_bad_row="skip")
    assert message.startswith(f"no examples in {path}: every row is bad; 2 bad row(s) in {path}: ")
    assert "missing 'answer'" in message


def test_non_utf8_line_names_file_row_and_line_and_can_be_skipped(tmp_path):
    bad = b'{"question": "caf\xe9?", "answer": "#### 1"}'
    path = _jsonl(tmp_path / "latin1.jsonl", [GOOD, GOOD, bad, GOOD])
    message = _error(BadRowError, load_gsm8k, path, on_bad_row="error")
    assert f"{path} row 2: line 3: not UTF-8 text (byte 0xe9 at column 18)" in message
    rows, report = load_gsm8k_with_report(path, on_bad_row="skip")
    assert len(rows) == 3 and report.count == 1


def test_non_utf8_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n{"question": "Q", "answer": "#### 1"},\n{"question": "\xff", "answer": "#### 2"}\n]')
    message = _error(DataFileError, load_gsm8k, path)
    assert message.startswith(f"{path}: line 3: not UTF-8 text (byte 0xff)")


def test_missing_file_names_path_and_field(tmp_path):
    path = tmp_path / "nope.parquet"
    message = _error(DataFileNotFoundError, load_gsm8k, path, field="data.eval_path")
    assert message == f"data.eval_path: data file not found: {path}"
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers that catch that
        load_gsm8k(path)


def test_garbage_parquet(tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all" * 3)
    message = _error(DataFileError, load_gsm8k, path)
    assert message.startswith(f"{path}: not a readable parquet file (")


@pytest.mark.parametrize("kind, suffix, found", [("parquet", ".jsonl", "jsonl"), ("jsonl", ".parquet", "parquet")])
def test_source_kind_must_match_the_file(tmp_path, kind, suffix, found):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        _jsonl(path, [GOOD])
    else:
        pq.write_table(pa.Table.from_pylist([GOOD]), path)
    message = _error(DataFileError, load_gsm8k, path, kind=kind, field="data.train_path")
    assert message == (f"data.source={kind} but data.train_path={path} is a {suffix} file; set data.source={found} "
                       f"(or point data.train_path at a {kind} file)")
    assert len(load_gsm8k(path, kind="hf")) == 1  # hf reads any file kind


def test_unknown_split_of_a_saved_dataset(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    message = _error(DataFileError, load_gsm8k, tmp_path / "dd", split="test")
    assert message == f"{tmp_path / 'dd'}: split 'test' not found; available: ['train']"


def test_config_loader_names_the_config_field(tmp_path):
    good = _jsonl(tmp_path / "a.jsonl", [GOOD])
    cfg = DataConfig(source="parquet", train_path=[str(good)])
    message = _error(DataFileError, load_config_examples, cfg, "train")
    assert f"data.source=parquet but data.train_path={good}" in message
    missing = DataConfig(source="jsonl", train_path=str(good), eval_path=str(tmp_path / "b.jsonl"))
    assert len(load_config_examples(missing, "train")) == 1
    message = _error(DataFileNotFoundError, load_config_examples, missing, "eval")
    assert message == f"data.eval_path: data file not found: {tmp_path / 'b.jsonl'}"
    assert load_config_examples(DataConfig(source="jsonl", train_path=str(good)), "eval") == []


def test_bad_on_bad_row_value(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [GOOD])
    message = _error(UserError, load_gsm8k, path, on_bad_row="ignore")
    assert message == "data.on_bad_row must be 'skip' or 'error', got 'ignore'"


def test_on_bad_row_default_is_error_as_its_comment_says():
    import inspect

    from megagsm.config import data as data_module

    assert DataConfig().on_bad_row == "error"
    line = next(x for x in inspect.getsource(data_module).splitlines() if "on_bad_row:" in x)
    assert "error (default)" in line
