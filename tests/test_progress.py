"""Progress of long work: whole lines where the stream is not a terminal (batch-job logs)."""

from __future__ import annotations

import io

import pytest

from neurox.progress import LineProgress, progress


def test_lines_in_a_log_no_carriage_returns(monkeypatch):
    monkeypatch.setenv("NEUROX_PROGRESS_SECONDS", "0")  # a line at every update
    log = io.StringIO()  # not a terminal
    bar = progress(total=4, desc="train", unit="step", file=log)
    assert isinstance(bar, LineProgress)
    for _ in range(3):
        bar.set_postfix(loss="0.5000")
        bar.update(1)
    bar.write("step 3: validation auroc 0.900")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "train: 0/4 step (starting)"
    assert lines[1].startswith("train: 1/4 (25%) step, ") and "left" in lines[1] and lines[1].endswith("loss 0.5000")
    assert lines[4] == "step 3: validation auroc 0.900"
    assert lines[5].startswith("train: 3/4 (75%)") and lines[5].endswith("(done)")


def test_lines_at_most_every_interval_and_quiet_when_disabled(monkeypatch):
    monkeypatch.setenv("NEUROX_PROGRESS_SECONDS", "3600")
    log = io.StringIO()
    items = list(progress(range(50), desc="prepare", unit="run", file=log))
    assert items == list(range(50))
    assert log.getvalue().splitlines()[0] == "prepare: 0/50 run (starting)"
    assert len(log.getvalue().splitlines()) == 2 and "50/50 (100%)" in log.getvalue()  # start and end only
    quiet = io.StringIO()
    bar = progress(total=2, desc="x", file=quiet, disable=True)
    bar.update(2)
    bar.write("failed: sub-01: not a NIfTI file")  # a failure is shown even without progress
    bar.close()
    assert quiet.getvalue() == "failed: sub-01: not a NIfTI file\n"


def test_mode_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.setenv("NEUROX_PROGRESS", "bar")
    assert not isinstance(progress(total=1, file=io.StringIO()), LineProgress)
    monkeypatch.setenv("NEUROX_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="NEUROX_PROGRESS='fancy'"):
        progress(total=1, file=io.StringIO())


def test_work_cut_short_says_stopped_not_done(monkeypatch):
    monkeypatch.setenv("NEUROX_PROGRESS_SECONDS", "3600")
    log = io.StringIO()
    bar = progress(total=10, desc="prepare", unit="run", file=log)
    bar.update(3)
    bar.close(stopped=True)
    bar.close()  # a later close (a finally after the except) adds nothing
    assert log.getvalue().splitlines()[1].startswith("prepare: 3/10 (30%) run, ")
    assert log.getvalue().splitlines()[1].endswith("(stopped)") and len(log.getvalue().splitlines()) == 2
    cut = io.StringIO()  # a loop over the display, cut by an error: its last line says so too
    with pytest.raises(RuntimeError):
        for i in progress(range(10), desc="embed", unit="participant", file=cut):
            if i == 4:
                raise RuntimeError("a damaged run")
    assert cut.getvalue().splitlines()[-1].startswith("embed: 4/10 (40%) participant, ")
    assert cut.getvalue().splitlines()[-1].endswith("(stopped)")
    whole = io.StringIO()
    assert list(progress(range(3), desc="x", file=whole)) == [0, 1, 2]
    assert whole.getvalue().splitlines()[-1].endswith("(done)")
    tty = io.StringIO()
    monkeypatch.setenv("NEUROX_PROGRESS", "bar")
    progress(total=10, file=tty).close(stopped=True)  # the terminal bar takes the same call
