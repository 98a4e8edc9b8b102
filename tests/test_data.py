"""GSM8K loading, prompts, tokenizer, SFT samples, packing and the resumable sampler."""

import json
import logging

import pytest
import torch

from megagsm.data import gsm8k as gsm8k_mod
from megagsm.data.gsm8k import BadRowError, extract_final_answer, load_gsm8k, load_gsm8k_with_report
from megagsm.data.packing import (
    PackedDataset,
    collate_packed,
    first_fit_bins,
    pack_samples,
)
from megagsm.data.prompts import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    build_prompt,
    encode_prompt,
    get_template,
    list_templates,
    register_template,
)
from megagsm.data.sampler import ResumableShardedSampler
from megagsm.data.sft_dataset import (
    SequenceTooLongError,
    SFTDataset,
    build_sft_sample,
    collate_sft,
    make_sample,
    truncate_prompt_response,
)
from megagsm.data.tokenizer import load_tokenizer, tokenizer_training_texts, train_tokenizer

# The first three rows of openai/gsm8k's train split, written out by hand.
GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
        "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as "
        "her parents. How much more money does Betty need to buy the wallet?",
        "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's parents gave her $15.\n"
        "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
        "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5",
    },
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    texts = tokenizer_training_texts(GSM8K_ROWS * 20) + ["Tom has 12 apples. 3 + 4 = 7\n#### 7"] * 20
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------- loading


def test_extract_final_answer():
    assert [extract_final_answer(r["answer"]) for r in GSM8K_ROWS] == ["72", "10", "5"]
    assert extract_final_answer("x\n#### 1,234") == "1234"
    assert extract_final_answer("#### $-5") == "-5"
    assert extract_final_answer("#### 2.5") == "2.5"
    assert extract_final_answer("#### 3\n#### 4") == "4"
    assert extract_final_answer("no final line") is None
    assert extract_final_answer("#### none") is None
    assert extract_final_answer(None) is None


def test_load_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    rows = load_gsm8k(path)
    assert [r.final_answer for r in rows] == ["72", "10", "5"]
    assert rows[0].question.startswith("Natalia sold clips to 48")
    assert rows[0].answer == GSM8K_ROWS[0]["answer"]
    assert len(load_gsm8k(str(path), limit=2)) == 2


def test_bad_rows_skipped_with_report(tmp_path, caplog):
    bad = [
        {"question": "Q without answer"},
        {"question": "Q", "answer": "no final line"},
        "{not json",
        {"question": "", "answer": "#### 3"},
        {"question": "Q", "answer": 5},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", [GSM8K_ROWS[0], *bad, GSM8K_ROWS[1]])
    with caplog.at_level(logging.WARNING):
        rows, report = load_gsm8k_with_report(path)
    assert [r.final_answer for r in rows] == ["72", "10"]
    assert report.count == 5
    assert len(report.examples) == 3
    assert all(str(path) in e for e in report.examples)
    assert "row 1:" in report.examples[0] and "'answer'" in report.examples[0]
    assert "row 2:" in report.examples[1] and "####" in report.examples[1]
    assert "row 3:" in report.examples[2] and "invalid JSON" in report.examples[2]
    assert "5 bad row(s)" in caplog.text and str(path) in caplog.text

    with pytest.raises(BadRowError, match="mixed.jsonl row 1") as info:
        load_gsm8k(path, on_bad_row="error")
    assert info.value.report.count == 5
    with pytest.raises(ValueError, match="on_bad_row"):
        load_gsm8k(path, on_bad_row="ignore")


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(GSM8K_ROWS))
    assert len(load_gsm8k(path)) == 3


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS + [{"question": "Q", "answer": None}]), path)
    rows, report = load_gsm8k_with_report(path)
    assert [r.final_answer for r in rows] == ["72", "10", "5"]
    assert report.count == 1 and "row 3" in report.examples[0]


def test_load_from_disk_and_datasets_dir(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(GSM8K_ROWS), "test": datasets.Dataset.from_list(GSM8K_ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_gsm8k(tmp_path / "dd", split="test")) == 1
    assert len(load_gsm8k(tmp_path / "dd", split="train")) == 3
    with pytest.raises(ValueError, match="split 'validation' not found"):
        load_gsm8k(tmp_path / "dd", split="validation")
    datasets.Dataset.from_list(GSM8K_ROWS[:2]).save_to_disk(str(tmp_path / "single"))
    assert len(load_gsm8k(tmp_path / "single")) == 2

    # A plain directory of split files goes through datasets.load_dataset (the json builder).
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_jsonl(raw / "train.jsonl", GSM8K_ROWS)
    _write_jsonl(raw / "test.jsonl", GSM8K_ROWS[2:])
    rows = load_gsm8k(raw, split="test", dataset_kwargs={"cache_dir": str(tmp_path / "cache")})
    assert [r.final_answer for r in rows] == ["5"]


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="missing_dir/data"):
        load_gsm8k("./missing_dir/data")
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"rows\.csv: unknown file extension '\.csv'"):
        load_gsm8k(csv)


def test_hub_names_go_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_gsm8k("openai/gsm8k", split="test")) == 3
    assert calls == [("openai/gsm8k", "main", "test")]
    assert gsm8k_mod._looks_like_local_path("org/name.v2") is False


# ----------------------------------------------------------------------------------------- prompts


def test_default_prompt_plain(tokenizer):
    question = GSM8K_ROWS[0]["question"]
    assert tokenizer.chat_template is None
    prompt = build_prompt(question, tokenizer)
    assert prompt == question + ' Let\'s think step by step and output the final answer after "####".\n'
    assert build_prompt(question, None) == prompt
    assert build_prompt(question, tokenizer, "bare") == question + "\n"
    ids = encode_prompt(question, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt


def test_prompt_registry():
    assert DEFAULT_TEMPLATE in list_templates()
    with pytest.raises(KeyError, match="unknown prompt template 'nope'.*gsm8k_step_by_step"):
        get_template("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_template(PromptTemplate(name=DEFAULT_TEMPLATE, user_format="{question}"))
    with pytest.raises(ValueError, match="no {question} field"):
        register_template(PromptTemplate(name="broken", user_format="hello"))
    custom = PromptTemplate(name="unregistered", user_format="Q: {question}", plain_suffix="\nA:")
    assert build_prompt("2+2?", None, custom) == "Q: 2+2?\nA:"


def test_chat_template_path(tokenizer, tmp_path):
    chat_tok = load_tokenizer(tokenizer.name_or_path)
    chat_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt = build_prompt("What is 3 + 4?", chat_tok)
    assert prompt == (
        '<s><user>What is 3 + 4? Let\'s think step by step and output the final answer after "####".\n<assistant>'
    )
    with_system = build_prompt("Q?", chat_tok, "bare", system_prompt="Be brief.")
    assert with_system == "<s><system>Be brief.\n<user>Q?\n<assistant>"
    assert build_prompt("Q?", chat_tok, "bare", use_chat_template="never") == "Q?\n"
    ids = encode_prompt("What is 3 + 4?", chat_tok)
    assert ids.count(chat_tok.bos_token_id) == 1  # the template's BOS, not a second one from encoding
    with pytest.raises(ValueError, match="no chat_template"):
        build_prompt("Q?", tokenizer, use_chat_template="always")


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_and_roundtrip(tokenizer):
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = Path(tokenizer.name_or_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (directory / name).is_file()
    special = json.loads((directory / "special_tokens_map.json").read_text())
    assert special["bos_token"] == "<s>" and special["eos_token"] == "</s>" and special["pad_token"] == "<pad>"
    loaded = AutoTokenizer.from_pretrained(str(directory))
    assert loaded.bos_token_id is not None and loaded.eos_token_id is not None and loaded.pad_token_id is not None
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 3
    assert len(loaded) <= 300
    for text in [r["answer"] for r in GSM8K_ROWS] + ["  x\t12,345.6 = ~{}|\n"]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    tokens = loaded.convert_ids_to_tokens(loaded("paid 1234 dollars", add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "2", "3", "4"]


def test_train_tokenizer_rejects_bad_args(tmp_path):
    with pytest.raises(ValueError, match="no training texts"):
        train_tokenizer([], 100, tmp_path / "t")
    with pytest.raises(ValueError, match="vocab_size=3"):
        train_tokenizer(["abc"], 3, tmp_path / "t")


# ----------------------------------------------------------------------------------------- SFT samples


def test_sft_sample_layout(tokenizer):
    row = GSM8K_ROWS[0]
    sample = build_sft_sample(row["question"], row["answer"], tokenizer, seq_length=512)
    prompt_ids = encode_prompt(row["question"], tokenizer)
    response_ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full = prompt_ids + response_ids
    assert sample["input_ids"].tolist() == full[:-1]
    assert sample["labels"].tolist() == full[1:]  # labels[t] = input_ids[t + 1]
    assert sample["position_ids"].tolist() == list(range(len(full) - 1))
    mask = sample["loss_mask"]
    assert mask.dtype == torch.float32
    assert mask.tolist() == [0.0] * (len(prompt_ids) - 1) + [1.0] * len(response_ids)
    supervised = sample["labels"][mask.bool()].tolist()
    assert supervised == response_ids
    assert tokenizer.decode(supervised, skip_special_tokens=True) == row["answer"]
    no_eos = build_sft_sample(row["question"], row["answer"], tokenizer, 512, add_eos=False)
    assert no_eos["labels"][-1].item() != tokenizer.eos_token_id
    assert len(no_eos["input_ids"]) == len(full) - 2


def test_truncation_policies():
    prompt, response = [1, 10, 11, 12, 13], [20, 21, 22, 2]
    assert truncate_prompt_response(prompt, response, 9, "error") == (prompt, response)
    assert truncate_prompt_response(prompt, response, 7, "left", bos_id=1) == ([1, 12, 13], response)
    assert truncate_prompt_response(prompt, response, 7, "left") == ([11, 12, 13], response)
    assert truncate_prompt_response(prompt, response, 5, "left", bos_id=1) == ([1], response)
    assert truncate_prompt_response(prompt, response, 7, "right") == (prompt, [20, 21])
    with pytest.raises(SequenceTooLongError, match="my row 7: 9 tokens"):
        truncate_prompt_response(prompt, response, 7, "error", row_name="my row 7")
    with pytest.raises(SequenceTooLongError, match="response alone"):
        truncate_prompt_response(prompt, response, 4, "left", bos_id=1)
    with pytest.raises(SequenceTooLongError, match="prompt alone"):
        truncate_prompt_response(prompt, response, 5, "right")
    with pytest.raises(ValueError, match="truncation must be"):
        truncate_prompt_response(prompt, response, 5, "middle")


def test_sft_dataset_truncation_names_row(tokenizer):
    rows = GSM8K_ROWS[:2]  # the third has a response longer than the prompt, see test_truncation_policies
    full = SFTDataset(rows, tokenizer, seq_length=512)
    response_lengths = [int(s["loss_mask"].sum()) for s in full]
    seq = max(response_lengths) + 4  # every response fits with a few prompt tokens
    too_long = [i for i, s in enumerate(full) if len(s["input_ids"]) > seq]
    assert len(too_long) == 2, "the test needs every row to be truncated"
    with pytest.raises(SequenceTooLongError, match="gsm8k.jsonl row 0"):
        SFTDataset(rows, tokenizer, seq_length=seq, truncation="error", source_name="gsm8k.jsonl")
    left = SFTDataset(rows, tokenizer, seq_length=seq, truncation="left")
    right = SFTDataset(rows, tokenizer, seq_length=seq, truncation="right")
    for a, b, c in zip(left, right, full):
        assert len(a["input_ids"]) == seq
        # left keeps the whole response and the BOS, dropping the prompt's start
        assert a["loss_mask"].sum() == c["loss_mask"].sum()
        assert a["labels"][1:].tolist() == c["labels"][len(c["labels"]) - (seq - 1):].tolist()
        assert a["input_ids"][0].item() == tokenizer.bos_token_id
        # right keeps the prompt's start and cuts the response (EOS first)
        n = min(seq, len(c["input_ids"]))
        assert b["input_ids"].tolist() == c["input_ids"][:n].tolist()
        if len(c["input_ids"]) > seq:
            assert b["labels"][-1].item() != tokenizer.eos_token_id


def test_collate_pads_with_zero_loss(tokenizer):
    data = SFTDataset(GSM8K_ROWS, tokenizer, 512, strip_calculator=True)
    assert "<<" not in tokenizer.decode(data[0]["labels"].tolist())
    lengths = [len(s["input_ids"]) for s in data]
    batch = collate_sft([data[i] for i in range(3)], data.pad_id, seq_length=256)
    assert batch["input_ids"].shape == (3, 256)
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == data[i]["input_ids"].tolist()
        assert (batch["input_ids"][i, n:] == data.pad_id).all()
        assert (batch["labels"][i, n:] == data.pad_id).all()
        assert batch["loss_mask"][i, n:].sum() == 0
        assert batch["loss_mask"][i].sum() == data[i]["loss_mask"].sum()
    assert batch["position_ids"][0].tolist() == list(range(256))
    dynamic = collate_sft([data[0], data[1]], data.pad_id, pad_to_multiple_of=64)
    assert dynamic["input_ids"].shape[1] % 64 == 0 and dynamic["input_ids"].shape[1] >= max(lengths[:2])
    with pytest.raises(ValueError, match="seq_length=8"):
        collate_sft([data[0]], data.pad_id, seq_length=8)


# ----------------------------------------------------------------------------------------- packing


def _toy_sample(tokens, prompt_len):
    return make_sample(tokens[:prompt_len], tokens[prompt_len:])


def test_first_fit_bins():
    assert first_fit_bins([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert first_fit_bins([5, 4, 3, 2, 6], 8, "decreasing") == [[4, 3], [0, 2], [1]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        first_fit_bins([1, 9], 8)


def test_pack_samples_layout():
    a = _toy_sample([1, 5, 6, 7, 2], 2)  # 4 inputs
    b = _toy_sample([1, 8, 9, 2], 2)  # 3 inputs
    c = _toy_sample([1, 4, 4, 4, 4, 4, 2], 3)  # 6 inputs
    rows = pack_samples([a, b, c], seq_length=8, pad_id=0)
    assert len(rows) == 2
    first = rows[0]
    assert first["input_ids"].tolist() == [1, 5, 6, 7, 1, 8, 9, 0]
    assert first["labels"].tolist() == [5, 6, 7, 2, 8, 9, 2, 0]  # no label crosses a boundary
    assert first["loss_mask"].tolist() == [0, 1, 1, 1, 0, 1, 1, 0]
    assert first["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert first["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert first["cu_seqlens"].tolist() == [0, 4, 7] and first["cu_seqlens"].dtype == torch.int32
    assert first["max_seqlen"].item() == 4
    assert rows[1]["cu_seqlens"].tolist() == [0, 6]
    batch = collate_packed(rows)
    assert batch["input_ids"].shape == (2, 8) and len(batch["cu_seqlens"]) == 2
    assert batch["max_seqlen"].item() == 6
    packed = PackedDataset([a, b, c], 8, 0)  # first-fit decreasing: c alone, then a + b
    assert len(packed) == 2 and packed[0]["cu_seqlens"].tolist() == [0, 6]


def test_packed_rows_become_one_thd_microbatch():
    """The SFT trainer's packed microbatch: rows joined, each row's padding tail a document of its own."""
    from megagsm.sft.data import packed_microbatch, step_batch

    a, b, c = _toy_sample([1, 5, 6, 7, 2], 2), _toy_sample([1, 8, 9, 2], 2), _toy_sample([1, 4, 4, 4, 4, 4, 2], 3)
    rows = pack_samples([a, b, c], seq_length=8, pad_id=0)
    mb = packed_microbatch(rows)
    params = mb["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 4, 7, 8, 14, 16]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 6
    assert mb["tokens"].tolist() == [torch.cat([r["input_ids"] for r in rows]).tolist()]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 0, 1]]
    assert mb["loss_mask"].sum() == sum(r["loss_mask"].sum() for r in rows) and mb["attention_mask"] is None
    step = step_batch(rows, 0, micro_batch_size=2, max_seq_length=8, multiple=8)
    assert (step.seq_length, step.micro_batch_size, step.num_sequences) == (16, 1, 2)


def test_packed_attention_matches_separate_documents():
    """Attention with the packed mask and reset positions equals running each document alone."""
    from megagsm.testing.dense_document_mask import packed_attention_mask

    torch.manual_seed(0)
    vocab, dim = 16, 8
    embed, pos_embed = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(16, dim)
    proj = torch.nn.Linear(dim, 3 * dim)

    def attend(ids, pos, mask):  # mask: True = masked
        q, k, v = proj(embed(ids) + pos_embed(pos)).chunk(3, -1)
        scores = (q @ k.transpose(-1, -2)) / dim**0.5
        return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v

    docs = [_toy_sample([1, 3, 4, 5, 2], 2), _toy_sample([1, 6, 7, 2], 1), _toy_sample([1, 9, 2], 1)]
    (row,) = pack_samples(docs, seq_length=12, pad_id=0)
    mask = packed_attention_mask(row["document_ids"])
    assert mask.shape == (1, 1, 12, 12)
    packed_out = attend(row["input_ids"], row["position_ids"], mask[0, 0])
    assert torch.isfinite(packed_out).all()
    bounds = row["cu_seqlens"].tolist()
    for doc, start, end in zip(docs, bounds, bounds[1:]):
        n = len(doc["input_ids"])
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        alone = attend(doc["input_ids"], doc["position_ids"], causal)
        torch.testing.assert_close(packed_out[start:end], alone)
    unmasked = attend(row["input_ids"], torch.arange(12), torch.ones(12, 12, dtype=torch.bool).triu(1))
    assert not torch.allclose(unmasked[bounds[1]:bounds[2]], packed_out[bounds[1]:bounds[2]])


# ----------------------------------------------------------------------------------------- sampler


def _take(sampler, n):
    out = []
    for index in sampler:
        out.append(index)
        if len(out) == n:
            break
    return out


def test_sampler_shards_cover_epoch_disjointly():
    shards = [list(ResumableShardedSampler(10, seed=3, dp_rank=r, dp_size=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert list(ResumableShardedSampler(10, seed=3, dp_size=3, dp_rank=1).permutation(0)) == list(
        ResumableShardedSampler(10, seed=3).permutation(0)
    )
    wrapped = [list(ResumableShardedSampler(10, seed=3, dp_rank=r, dp_size=3, drop_last=False)) for r in range(3)]
    assert all(len(s) == 4 for s in wrapped) and set(i for s in wrapped for i in s) == set(range(10))
    ordered = list(ResumableShardedSampler(5, shuffle=False))
    assert ordered == [0, 1, 2, 3, 4]


def test_sampler_epochs_deterministic_and_distinct():
    s1, s2 = ResumableShardedSampler(50, seed=7), ResumableShardedSampler(50, seed=7)
    e0, e1 = list(s1), list(s1)
    assert s1.epoch == 2 and sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    assert list(s2) == e0
    assert list(ResumableShardedSampler(50, seed=8)) != e0


def test_sampler_resume_and_reshard():
    reference = ResumableShardedSampler(20, seed=1)
    full = list(reference) + list(reference)
    run = ResumableShardedSampler(20, seed=1)
    first = _take(run, 7)
    state = run.state_dict()
    assert state == {"epoch": 0, "offset": 7, "seed": 1, "num_samples": 20}
    resumed = ResumableShardedSampler(20, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert len(resumed) == 13
    assert first + list(resumed) + list(resumed) == full
    # resume the same global stream on 2 data-parallel ranks from global offset 8
    ranks = [ResumableShardedSampler(20, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict({"epoch": 0, "offset": 8})
    streams = [list(r) for r in ranks]
    assert [x for pair in zip(*streams) for x in pair] == full[8:20]
    with pytest.raises(ValueError, match="seed=1 but this sampler has seed=2"):
        ResumableShardedSampler(20, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="offset=99"):
        ResumableShardedSampler(20, seed=1).load_state_dict({"epoch": 0, "offset": 99})


def test_sampler_with_dataloader(tokenizer):
    data = SFTDataset(GSM8K_ROWS * 4, tokenizer, 512)
    sampler = ResumableShardedSampler(len(data), seed=0, dp_rank=1, dp_size=2)
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, sampler=sampler, collate_fn=lambda b: collate_sft(b, data.pad_id, pad_to_multiple_of=8)
    )
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["input_ids"].shape[0] == 2
    assert sampler.epoch == 1 and sampler.offset == 0
