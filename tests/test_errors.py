"""megagsm.errors: one line per launch under torchrun, and a new launch is never silenced by an old one."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what a torchrun worker does on a user error (run through `sh -c` so every "launch" has its own
# parent process, as every torchrun agent does)
SNIPPET = ("from megagsm.errors import UserError, report_user_error; "
           "report_user_error(UserError('bad value in line 3'))")


def _launch(tmp_path, n_workers: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "TORCHELASTIC_RUN_ID": "none",
           "MASTER_PORT": "29500", "WORLD_SIZE": str(n_workers)}
    worker = f"{sys.executable} -c \"{SNIPPET}\""
    done = subprocess.run(["sh", "-c", " ; ".join([worker] * n_workers)], env=env, capture_output=True,
                          text=True, timeout=120)
    return done.stderr.strip().splitlines()


def test_one_line_per_launch_and_every_launch_reports(tmp_path):
    # torchrun's defaults (run id "none", port 29500) are the same for every launch: the first
    # launch's marker must not silence the second one
    assert _launch(tmp_path, 2) == ["error: bad value in line 3"]
    assert _launch(tmp_path, 2) == ["error: bad value in line 3"]


def test_peer_failure_is_not_reported_by_the_waiting_rank(capsys, monkeypatch):
    from megagsm.errors import EXIT_USER_ERROR, PeerFailedError, report_user_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report_user_error(PeerFailedError("another rank failed while writing /x")) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")
    report_user_error(PeerFailedError("another rank failed"))
    assert capsys.readouterr().err == "error: another rank failed\n"


def test_message_is_one_line(capsys):
    from megagsm.errors import UserError, report_user_error

    report_user_error(UserError("first\nsecond  part"), prefix=lambda e: "config error")
    assert capsys.readouterr().err == "config error: first second part\n"
