"""verl's RL layout, dotted prompt/answer keys, multi-turn rows, several files, and prompt encoding."""

import json

import pytest
import torch

from megagsm.config.data import DataConfig
from megagsm.config.loader import load_config
from megagsm.data.from_config import load_config_examples
from megagsm.data.gsm8k import BadRowError, data_paths, load_gsm8k, load_gsm8k_files
from megagsm.data.layouts import parse_path
from megagsm.data.prompts import (
    build_example_prompt,
    encode_example_prompt,
    encode_prompt,
    get_template,
    truncate_prompt,
)
from megagsm.data.sft_dataset import SequenceTooLongError, SFTDataset, build_conversation_sample
from megagsm.data.tokenizer import load_tokenizer, train_tokenizer
from megagsm.errors import UserError

INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
QUESTION = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?"
SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
# A row as verl's examples/data_preprocess/gsm8k.py writes it (written out by hand).
VERL_GSM8K = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "user", "content": QUESTION + INSTRUCTION}],
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "72"},
    "extra_info": {"split": "train", "index": 0, "answer": SOLUTION, "question": QUESTION},
}
# A DAPO-Math-17k-style row: no worked solution, a LaTeX ground truth.
DAPO = {
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": "Solve x^2 = 1/4 for x > 0.\n\nRemember to put your answer on its own line "
                                           "after \"Answer:\"."}],
    "ability": "MATH",
    "reward_model": {"style": "rule-lighteval/MATH_v2", "ground_truth": "\\frac{1}{2}"},
    "extra_info": {"index": 3},
}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [QUESTION + INSTRUCTION + SOLUTION, "<user><assistant><system> hi 1 2 3 ok fine\n"] * 20
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = load_tokenizer(tokenizer.name_or_path)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("writer", [_parquet, _jsonl])
def test_verl_rl_layout_is_recognised_by_itself(tmp_path, writer):
    path = writer(tmp_path / ("t.parquet" if writer is _parquet else "t.jsonl"), [VERL_GSM8K, DAPO])
    gsm, dapo = load_gsm8k(path, on_bad_row="error")
    assert gsm.question == QUESTION and gsm.answer == SOLUTION
    assert gsm.final_answer == gsm.ground_truth == "72" and gsm.data_source == "openai/gsm8k"
    assert gsm.messages == ({"role": "user", "content": QUESTION + INSTRUCTION},) and gsm.conversation is None
    assert dapo.data_source == "math_dapo" and dapo.ground_truth == "\\frac{1}{2}"
    assert dapo.answer == "" and dapo.question == DAPO["prompt"][0]["content"]


def test_verl_gsm8k_ground_truth_must_be_a_number(tmp_path):
    for truth in ["seventy-two", "72abc", "7 2"]:
        row = {**VERL_GSM8K, "reward_model": {"style": "rule", "ground_truth": truth}}
        path = _parquet(tmp_path / "t.parquet", [VERL_GSM8K, row])
        with pytest.raises(BadRowError, match=rf"row 1: 'reward_model.ground_truth' '{truth}' is not a number"):
            load_gsm8k(path, on_bad_row="error")
    for truth in ["-3", "1,234", "2.5"]:
        row = {**VERL_GSM8K, "reward_model": {"style": "rule", "ground_truth": truth}}
        assert load_gsm8k(_parquet(tmp_path / "t.parquet", [row]))[0].ground_truth == truth


def test_verl_sft_spelling_through_dotted_keys(tmp_path):
    path = _parquet(tmp_path / "t.parquet", [VERL_GSM8K])
    for prompt_key, answer_key in [("extra_info.question", "extra_info.answer"),
                                   ("extra_info['question']", 'extra_info["answer"]')]:
        (row,) = load_gsm8k(path, prompt_key=prompt_key, answer_key=answer_key, on_bad_row="error")
        assert row.question == QUESTION and row.messages is None  # a text prompt: the template applies
        assert row.answer == SOLUTION and row.final_answer == "72"
    (row,) = load_gsm8k(path, prompt_key="prompt")
    assert row.messages == tuple(VERL_GSM8K["prompt"])
    (row,) = load_gsm8k(path, prompt_key="prompt[0].content", answer_key="extra_info.answer")
    assert row.question == QUESTION + INSTRUCTION and row.messages is None


def test_nested_key_missing_in_a_row(tmp_path):
    row = {**VERL_GSM8K, "extra_info": {"split": "train"}}
    path = _parquet(tmp_path / "t.parquet", [VERL_GSM8K, row])
    with pytest.raises(BadRowError, match=r"t.parquet row 1: missing 'extra_info.question'"):
        load_gsm8k(path, prompt_key="extra_info.question", answer_key="extra_info.answer", on_bad_row="error")


def test_parse_path():
    assert parse_path("extra_info.question") == ["extra_info", "question"]
    assert parse_path("a['b c'][2].d") == ["a", "b c", 2, "d"]
    for bad in ["", ".a", "a..b", "a[", "a.b]"]:
        with pytest.raises(UserError, match=r"data\.prompt_key="):
            parse_path(bad, "data.prompt_key")
    with pytest.raises(UserError, match=r"data\.answer_key='x\.\.y'"):
        load_gsm8k("unused.jsonl", answer_key="x..y")


def test_messages_key_multi_turn_rows(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4\n#### 4"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": conv}, {"messages": conv[:2]},
                                            {"messages": [conv[2], conv[1], conv[2]]}])
    with pytest.raises(BadRowError) as info:
        load_gsm8k(path, messages_key="messages", on_bad_row="error")
    assert "row 1: line 2: 'messages' has no assistant turn to train on" in str(info.value)
    assert "row 2: line 3: 'messages' starts with an assistant turn" in str(info.value)
    (row,) = load_gsm8k(path, messages_key="messages")
    assert row.conversation == tuple(conv) and row.messages == tuple(conv[:4])
    assert row.question == "and 2 + 2?" and row.answer == conv[-1]["content"] and row.final_answer == "4"


def test_several_files_and_list_spellings(tmp_path):
    a = _parquet(tmp_path / "a.parquet", [VERL_GSM8K])
    b = _parquet(tmp_path / "b.parquet", [DAPO, DAPO])
    assert data_paths(None) == [] and data_paths(str(a)) == [str(a)]
    assert data_paths([str(a), str(b)]) == data_paths(f"['{a}', '{b}']") == [str(a), str(b)]
    assert data_paths("[a.parquet, b.parquet]") == ["a.parquet", "b.parquet"]
    with pytest.raises(UserError, match="must be non-empty strings"):
        data_paths("[1, 2]")
    rows = load_gsm8k_files(f"['{a}', '{b}']")
    assert [r.data_source for r in rows] == ["openai/gsm8k", "math_dapo", "math_dapo"]
    cfg = load_config(None, [f"data.train_path=[{a},{b}]", f"data.eval_path={a}", "data.source=parquet"])
    assert cfg.data.train_path == [str(a), str(b)] and cfg.data.eval_path == str(a)
    assert len(load_config_examples(cfg.data, "train")) == 3 and len(load_config_examples(cfg.data, "eval")) == 1
    keyed = DataConfig(source="parquet", train_path=[str(a)], prompt_key="extra_info.question",
                       answer_key="extra_info.answer")
    assert load_config_examples(keyed, "train")[0].messages is None


def test_train_path_type_is_checked_by_the_config_loader():
    from megagsm.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.train_path"):
        load_config(None, ["data.train_path=[1,2]"])


# ----------------------------------------------------------------------------------------- prompts


def test_example_prompt_plain_and_chat(tokenizer, chat_tokenizer):
    (gsm,) = load_gsm8k_rows([VERL_GSM8K])
    # no chat template: the single user turn and a newline, exactly the text-template prompt
    assert build_example_prompt(gsm, tokenizer) == QUESTION + INSTRUCTION + "\n"
    assert encode_example_prompt(gsm, tokenizer) == encode_prompt(QUESTION, tokenizer, "gsm8k_step_by_step")
    ids = encode_example_prompt(gsm, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == QUESTION + INSTRUCTION + "\n"
    # chat template: the messages as they are (the "bare" template would not add the instruction)
    assert build_example_prompt(gsm, chat_tokenizer, "bare") == f"<s><user>{QUESTION}{INSTRUCTION}\n<assistant>"
    chat_ids = encode_example_prompt(gsm, chat_tokenizer)
    assert chat_ids.count(chat_tokenizer.bos_token_id) == 1
    # a text example goes through the template
    text = load_gsm8k_rows([{"question": "2 + 2?", "answer": "#### 4"}])[0]
    assert build_example_prompt(text, chat_tokenizer, "bare") == "<s><user>2 + 2?\n<assistant>"


def load_gsm8k_rows(rows, **kwargs):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return load_gsm8k(_jsonl(Path(d) / "rows.jsonl", rows), on_bad_row="error", **kwargs)


def test_default_template_name():
    assert get_template("default") is get_template("gsm8k_step_by_step")


def test_truncate_prompt():
    ids = [1, 2, 3, 4, 5]
    assert truncate_prompt(ids, 5, "error", "x") == ids
    assert truncate_prompt(ids, 3, "left", "x") == [3, 4, 5]
    assert truncate_prompt(ids, 3, "right", "x") == [1, 2, 3]
    with pytest.raises(UserError) as info:
        truncate_prompt(ids, 3, "error", "train.parquet row 7")
    assert str(info.value).startswith("train.parquet row 7: the prompt has 5 tokens, more than data.max_prompt_len=3")
    with pytest.raises(UserError, match="data.truncation='middle'"):
        truncate_prompt(ids, 3, "middle", "x")
    with pytest.raises(UserError, match="data.max_prompt_len=0"):
        truncate_prompt(ids, 0, "left", "x")


# ----------------------------------------------------------------------------------------- SFT


def test_sft_on_verl_rows(tokenizer):
    (gsm,) = load_gsm8k_rows([VERL_GSM8K])
    (sample,) = SFTDataset([gsm], tokenizer, 512)
    prompt = tokenizer(QUESTION + INSTRUCTION + "\n")["input_ids"]  # plain rendering, BOS from the tokenizer
    response = tokenizer(SOLUTION, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sample["input_ids"].tolist() == (prompt + response)[:-1]
    assert sample["labels"][sample["loss_mask"].bool()].tolist() == response
    (dapo,) = load_gsm8k_rows([DAPO])
    with pytest.raises(UserError, match=r"examples row 0: no response to train on"):
        SFTDataset([dapo], tokenizer, 512)


def _conversation():
    return [{"role": "user", "content": "hi 1"}, {"role": "assistant", "content": "ok 2"},
            {"role": "user", "content": "hi 3"}, {"role": "assistant", "content": "fine"}]


def test_conversation_sample_plain(tokenizer):
    sample = build_conversation_sample(_conversation(), tokenizer, 512)
    enc = lambda text, special=False: tokenizer(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    pieces = [(enc("hi 1\n", True), 0), (enc("ok 2") + [eos], 1), (enc("hi 3\n"), 0), (enc("fine") + [eos], 1)]
    ids = [t for p, _ in pieces for t in p]
    mask = [m for p, m in pieces for _ in p]
    assert sample["input_ids"].tolist() == ids[:-1] and sample["labels"].tolist() == ids[1:]
    assert sample["loss_mask"].tolist() == [float(m) for m in mask[1:]]
    assert sample["position_ids"].tolist() == list(range(len(ids) - 1))


def test_conversation_sample_chat_template(chat_tokenizer):
    tok = chat_tokenizer
    sample = build_conversation_sample(_conversation(), tok, 512)
    labels, mask = sample["labels"], sample["loss_mask"].bool()
    assert tok.decode(labels[mask].tolist()) == "ok 2\nfine\n"  # assistant turns, end-of-turn newline included
    everything = [sample["input_ids"][0].item()] + labels.tolist()
    assert tok.decode(everything) == "<s><user>hi 1\n<assistant>ok 2\n<user>hi 3\n<assistant>fine\n"
    # an example with a conversation goes through SFTDataset the same way
    (row,) = load_gsm8k_rows([{"messages": _conversation()}], messages_key="messages")
    (from_dataset,) = SFTDataset([row], tok, 512)
    assert all(torch.equal(from_dataset[k], sample[k]) for k in sample)


def test_conversation_truncation(tokenizer):
    full = build_conversation_sample(_conversation(), tokenizer, 512)
    n = len(full["input_ids"])
    left = build_conversation_sample(_conversation(), tokenizer, n - 3, truncation="left")
    assert left["input_ids"][0].item() == tokenizer.bos_token_id
    assert left["labels"].tolist() == full["labels"].tolist()[3:]
    assert left["loss_mask"].tolist() == full["loss_mask"].tolist()[3:]
    right = build_conversation_sample(_conversation(), tokenizer, n - 3, truncation="right")
    assert right["labels"].tolist() == full["labels"].tolist()[:-3]
    with pytest.raises(SequenceTooLongError, match=f"row: {n + 1} tokens exceed seq_length"):
        build_conversation_sample(_conversation(), tokenizer, n - 1, truncation="error")
    with pytest.raises(SequenceTooLongError, match="no assistant token is left"):
        build_conversation_sample(_conversation(), tokenizer, 3, truncation="right")


def test_verl_layout_from_a_saved_datasets_dir(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([VERL_GSM8K]),
                          "test": datasets.Dataset.from_list([VERL_GSM8K, VERL_GSM8K])}).save_to_disk(str(tmp_path / "d"))
    cfg = DataConfig(source="hf", train_path=str(tmp_path / "d"), eval_path=str(tmp_path / "d"))
    (train,) = load_config_examples(cfg, "train")
    assert train.messages == tuple(VERL_GSM8K["prompt"]) and train.ground_truth == "72"
    assert len(load_config_examples(cfg, "eval")) == 2


def test_load_run_examples(tmp_path):
    from megagsm.data.from_config import load_run_examples

    train, test = load_run_examples(DataConfig(n_train=6, n_test=2, difficulty=1, seed=4))
    assert len(train) == 6 and len(test) == 2
    assert all(e.final_answer == e.answer.rsplit("#### ", 1)[1] and e.messages is None for e in train + test)
    path = _parquet(tmp_path / "t.parquet", [VERL_GSM8K, DAPO])
    train, test = load_run_examples(DataConfig(source="parquet", train_path=str(path)))
    assert [e.data_source for e in train] == ["openai/gsm8k", "math_dapo"] and test == []
