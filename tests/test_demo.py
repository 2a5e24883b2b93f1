"""``neurox demo`` end to end at a tiny size: every step runs and the report says what it found."""

from __future__ import annotations

import json

from fakes import run_until_step_then_signal

from neurox.cli import main

# 6 training participants x 2 windows: two epochs of 3 batches of 4
TINY_DEMO = ["demo", "--n_subjects", "10", "--n_frames", "40", "--epochs", "2", "--batch_size", "4"]


def test_demo_end_to_end_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    # stopped during fine-tuning (Ctrl-C or SIGTERM), it says so and stops; the same command continues
    returncode, stdout = run_until_step_then_signal(TINY_DEMO + ["--out", str(out)], out / "runs" / "swift", step=1)
    assert returncode == 0 and "demo stopped during finetune; run the same command again" in stdout, stdout[-2000:]
    assert not (out / "report.md").exists() and not (out / "runs" / "fc_baseline").exists()
    assert main(TINY_DEMO + ["--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for target in ("amplitude_group", "coupling_group", "order_group"):
        assert f"| {target} |" in report
    assert "FC baseline" in report and "voxel_center" in report and "training curve" in report
    assert "model output ~ head motion (r)" in report and "the motion check" in report  # 2 test participants: n/a
    assert "| model - FC baseline [95% CI], p |" in report
    val = json.loads((out / "runs" / "swift" / "metrics.json").read_text())["val"].get("amplitude_group.auroc")
    row = next(line for line in report.splitlines() if line.startswith("| amplitude_group |")).split(" | ")
    assert "| model validation AUROC |" in report and row[3] == ("n/a" if val is None else f"{val:.2f}")
    assert (out / "training_curve.png").stat().st_size > 5_000
    assert (out / "runs" / "swift" / "model" / "config.json").is_file()
    assert (out / "runs" / "fc_baseline" / "metrics.json").is_file()
    shown = capsys.readouterr().out
    assert "resumed" in shown and "# neurox demo report" in shown
    # a second call finds the finished run and does not train again
    assert main(TINY_DEMO + ["--out", str(out)]) == 0
