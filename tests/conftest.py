"""Shared test fixtures: tiny configs, and the published-model parity fixtures.

The parity fixtures live in ``../shared/fixtures`` beside the checkout (not in a user's clone);
``NEUROX_SHARED_DIR`` points elsewhere. Where they are absent the tests that need them skip with
the reason, except under ``CI=true``, where a missing fixture is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, as the cores allow
    torch.set_num_threads(1)


def shared_dir() -> Path:
    return Path(os.environ.get("NEUROX_SHARED_DIR", REPO.parent / "shared"))


def require_shared(relative: str) -> Path:
    path = shared_dir() / relative
    if not path.exists():
        message = f"reference data {path} not found (set NEUROX_SHARED_DIR to the folder holding fixtures/)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def swift_fixture_dir() -> Path:
    return require_shared("fixtures/swift_reference")


@pytest.fixture(scope="module")
def one_epoch_run(store, tmp_path_factory) -> Path:
    """A run of one epoch on the module's ``store`` (tests.fakes.cohort_store), for the tests that score a trained
    model. Only read."""
    from fakes import finetune_args

    from neurox.cli import main

    run = tmp_path_factory.mktemp("one-epoch") / "run"
    assert main(finetune_args(store, run, "--epochs", "1")) == 0
    return run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
