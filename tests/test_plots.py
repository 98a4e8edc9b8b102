"""megagsm.utils.plots: labelled panels, identical series drawn once, EMA against its closed form,
log loss axis, PNG written with the umask's mode."""
import json
import os
import stat

from megagsm.utils.plots import Label, ema, panels, plot_metrics


def _rows(n=30):
    rows = []
    for s in range(1, n + 1):
        r = 1.0 if s % 2 else 0.0  # 0/1 rewards: reward_mean equals rollout_accuracy
        rows.append({"phase": "gspo", "step": s, "loss": 5.0 / s, "reward_mean": r, "rollout_accuracy": r,
                     "response_length": 10 + s})
    rows.append({"phase": "gspo", "step": n, "accuracy": 0.5, "eval_examples": 200})
    return rows


def test_identical_series_share_one_panel_and_labels_carry_units():
    out = panels(_rows(), ["reward_mean", "accuracy", "rollout_accuracy", "response_length", "loss"])
    assert [keys for keys, _, _ in out] == [["reward_mean", "rollout_accuracy"], ["accuracy"],
                                            ["response_length"], ["loss"]]
    titles = [t for _, t, _ in out]
    assert titles[0].endswith("(identical)") and "rollout accuracy" in titles[0]
    assert titles[1] == "held-out greedy accuracy (200 problems)"
    assert [lab.unit for _, _, lab in out] == ["reward", "%", "tokens", "nats/token"]
    assert out[3][2].log and out[1][2].percent


def test_counts_and_labels_given_by_the_caller():
    rows = [{"phase": "sft", "step": 1, "accuracy": 0.2}]
    assert panels(rows, ["accuracy"])[0][1] == "held-out greedy accuracy"  # N unknown: not invented
    assert panels(rows, ["accuracy"], counts={"accuracy": 100})[0][1] == "held-out greedy accuracy (100 problems)"
    [(_, title, label)] = panels(rows, ["my_metric"], labels={"my_metric": Label("widgets", "count")})
    assert title == "widgets" and label.unit == "count"


def test_ema_matches_the_closed_form():
    # bias-corrected EMA: sum_i (1-a) a^(t-i) x_i / (1 - a^(t+1))
    xs, a = [1.0, 3.0, -2.0, 4.0], 0.5
    expected = [sum((1 - a) * a ** (t - i) * xs[i] for i in range(t + 1)) / (1 - a ** (t + 1)) for t in range(4)]
    assert all(abs(x - y) < 1e-12 for x, y in zip(ema(xs, a), expected))
    assert ema([2.0, 2.0, 2.0], 0.9) == [2.0, 2.0, 2.0]


def test_plot_reads_title_from_the_run_config_and_keeps_umask(tmp_path):
    import matplotlib.image

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (tmp_path / "config.yaml").write_text("model:\n  hf_dir: /m/Qwen2.5-0.5B\nparallel:\n  tp: 2\n  world_size: 8\n"
                                          "algorithm:\n  name: gspo\n")
    old = os.umask(0o022)
    try:
        png = plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path / "p.png"),
                           ["reward_mean", "rollout_accuracy", "loss"], phase="gspo")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(png).st_mode) == 0o644
    assert matplotlib.image.imread(png).shape[0] > 300
    from megagsm.utils.plots import run_title

    assert run_title(str(tmp_path / "metrics.jsonl")) == f"{tmp_path.name} - GSPO - Qwen2.5-0.5B - TP2 on 8 processes"
