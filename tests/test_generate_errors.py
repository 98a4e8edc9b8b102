"""launch/generate.py input errors (one line naming the file:line, the id or the flag; exit 2) and
the prompt template / truncation rules; under torchrun the error line is shown once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megagsm.errors import UserError
from megagsm.testing.tiny_hf import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import generate as cli  # noqa: E402  (launch/generate.py)


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("generr")
    make_tiny_hf_model("qwen2", root / "hf")  # vocab 300, max_position_embeddings 256
    done = subprocess.run([sys.executable, "-m", "checkpoints_tools", "hf-to-mcore", "--hf-dir", root / "hf",
                           "--out", root / "mcore", "--no-progress"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "mcore"


def _prompts(tmp_path, *records, raw: bytes | None = None) -> Path:
    path = tmp_path / "in.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("ids, message", [
    ([5, 300], "prompt_token_ids[1] = 300 is out of range: the model's vocabulary is 0..299"),
    ([-1, 5], "prompt_token_ids[0] = -1 is out of range"),
    ([5, 2.5], "prompt_token_ids[1] = 2.5 is not an integer token id"),
    ([5, "7"], "prompt_token_ids[1] = '7' is not an integer token id"),
    ([True], "prompt_token_ids[0] = True is not an integer token id"),
    ([], "'prompt_token_ids' is empty"),
])
def test_bad_token_ids_name_the_line_and_id(ckpt, tmp_path, ids, message):
    path = _prompts(tmp_path, {"prompt_token_ids": [1, 2]}, {"prompt_token_ids": ids})
    with pytest.raises(UserError) as info:
        cli.main(["--load", str(ckpt), "--prompts", str(path)])
    assert str(info.value).startswith(f"{path}:2: {message}")


def test_non_utf8_prompts_file_is_named(ckpt, tmp_path):
    # 17 bytes for line 1, then 15 before the byte: offset 32
    path = _prompts(tmp_path, raw='{"prompt": "ok"}\n{"prompt": "caf'.encode() + b"\xe9" + b'"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: not UTF-8 text \(byte 0xe9 at offset 32\)"):
        cli.main(["--load", str(ckpt), "--prompts", str(path)])


def test_exit_status_and_one_line(ckpt, tmp_path):
    path = _prompts(tmp_path, {"prompt_token_ids": [5, 999]})
    done = subprocess.run([sys.executable, ROOT / "launch" / "generate.py", "--load", ckpt, "--prompts", path],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {path}:1: prompt_token_ids[1] = 999 is out of range: the model's "
                                   "vocabulary is 0..299")


def test_fit_context_refuses_or_cuts():
    where = ["in.jsonl:1", "in.jsonl:2"]
    hf = {"max_position_embeddings": 10}
    ids = [list(range(12)), [1, 2]]
    # room = 10 - 4 = 6 tokens
    assert cli.fit_context(ids, where, hf, 4, "left") == [[6, 7, 8, 9, 10, 11], [1, 2]]
    assert cli.fit_context(ids, where, hf, 4, "right") == [[0, 1, 2, 3, 4, 5], [1, 2]]
    with pytest.raises(UserError, match=r"^in.jsonl:1: the prompt has 12 tokens, the context allows 6 "
                                        r"\(max_position_embeddings 10 - --max-new-tokens 4\)"):
        cli.fit_context(ids, where, hf, 4, "error")
    with pytest.raises(UserError, match="--max-new-tokens 10 leaves no room"):
        cli.fit_context(ids, where, hf, 10, "left")


def test_long_prompt_refused_by_default(ckpt, tmp_path):
    path = _prompts(tmp_path, {"prompt_token_ids": [5] * 250})
    with pytest.raises(UserError, match=r"in.jsonl:1: the prompt has 250 tokens, the context allows 128"):
        cli.main(["--load", str(ckpt), "--prompts", str(path), "--max-new-tokens", "128"])


def _args(load, template=None):
    return cli.build_parser().parse_args(["--load", str(load), "--prompt", "x"]
                                         + (["--template", template] if template else []))


def test_template_defaults_to_the_trainers_record(ckpt, tmp_path):
    run = tmp_path / "run"
    iter_dir = run / "checkpoints" / "iter_0000010"
    shutil.copytree(ckpt, iter_dir)
    assert cli.resolve_template(_args(iter_dir)) == "gsm8k_step_by_step"  # no config.yaml: data default
    (run / "config.yaml").write_text("data:\n  prompt_template: bare\n")
    assert cli.resolve_template(_args(iter_dir)) == "bare"
    assert cli.resolve_template(_args(run / "checkpoints")) == "bare"
    assert cli.resolve_template(_args(iter_dir, "question_answer")) == "question_answer"
    assert cli.resolve_template(_args(iter_dir, "none")) == "none"
    with pytest.raises(UserError, match="--template: unknown prompt template 'nope'"):
        cli.resolve_template(_args(iter_dir, "nope"))
    (run / "config.yaml").write_text("data:\n  prompt_template: gone\n")
    with pytest.raises(UserError, match=r"config.yaml \(data.prompt_template\): unknown prompt template 'gone'"):
        cli.resolve_template(_args(iter_dir))


def test_template_is_applied_to_text_prompts(tmp_path):
    """Text goes through the template exactly as the trainers encode it; 'none' leaves it alone."""
    from megagsm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["What is 2 + 3? Let's think step by step #### 5"] * 5, 120, tmp_path / "tok")
    records, where = [{"prompt": "What is 2 + 3?"}], ["--prompt 1"]
    templated = cli.tokenize(records, where, tok, "bare", False, 1000)
    assert templated == [tok("What is 2 + 3?\n")["input_ids"]]  # bare: the question, then a newline
    raw = cli.tokenize(records, where, tok, "none", False, 1000)
    assert raw == [tok("What is 2 + 3?")["input_ids"]]


@pytest.mark.slow
def test_torchrun_shows_the_error_once(ckpt, tmp_path):
    path = _prompts(tmp_path, {"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5, 6000]})
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--nproc-per-node", "2", str(ROOT / "launch" / "generate.py"), "--load",
                           str(ckpt), "--prompts", str(path), "--max-new-tokens", "2"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    line = f"error: {path}:2: prompt_token_ids[1] = 6000 is out of range: the model's vocabulary is 0..299"
    assert done.stderr.count(line) == 1, done.stderr[-3000:]
    assert "launch/generate.py\", line" not in done.stderr  # no worker traceback (torchrun adds its summary)
