"""The Python API mirrors the command line: same option names, same defaults, same results."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from fakes import bids_run, bold

import neurox
from neurox import api, cli_options
from neurox.models.convert import HPARAM_FIELDS

# options a command has that are not the function's: a YAML file of options (the dataclass-configured
# commands take every field by keyword), the convert command's architecture settings (keywords too)
NOT_KEYWORDS = {"config"} | set(HPARAM_FIELDS.values())


def command_defaults(name: str) -> dict:
    parser = getattr(cli_options, f"_{name.replace('-', '_')}_parser")()
    return {k: v for k, v in vars(parser.get_defaults()).items() if not k.startswith("__")}


def same(a, b) -> bool:
    as_list = (list, tuple)
    return list(a) == list(b) if isinstance(a, as_list) and isinstance(b, as_list) else a == b


@pytest.mark.parametrize("name", sorted(api.COMMANDS))
def test_every_function_takes_its_commands_options_with_the_same_defaults(name):
    function = api.COMMANDS[name]
    defaults = command_defaults(name)
    parameters = {p.name: p for p in inspect.signature(function).parameters.values() if p.kind != p.VAR_KEYWORD}
    # **options: the fields of a dataclass that the command's parser is built from, the same by construction;
    # what the function names besides (quiet) must still be an option with the same default
    if len(parameters) == len(inspect.signature(function).parameters):
        assert set(defaults) - NOT_KEYWORDS <= set(parameters), f"neurox {name}: options the function lacks"
    for p in parameters.values():
        assert p.name in defaults, f"neurox.{function.__name__}({p.name}=...) is no option of neurox {name}"
        if p.default is not p.empty:
            assert same(defaults[p.name], p.default), f"{name} --{p.name}: {defaults[p.name]!r} vs {p.default!r}"


@pytest.mark.parametrize("name", [*sorted(api.COMMANDS), "smoke"])
def test_every_option_of_every_command_says_what_it_is(name):
    parser = cli_options.build_parser()._subcommands_action.choices[name]
    undescribed = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
    assert not undescribed, f"neurox {name} --help says nothing of {undescribed}"
    text = " ".join(parser.format_help().split())
    assert "example: neurox" in text
    twice = re.findall(r"\(default: [^)]*\) \((?:type: [^)]*, )?default: [^)]*\)", text)
    assert not twice, f"neurox {name} --help gives a default twice: {twice}"


def test_top_level_names_are_the_api():
    for name in neurox._COMMANDS:
        assert getattr(neurox, name) is getattr(api, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        neurox.nope  # noqa: B018


def test_python_api_runs_prepare_finetune_evaluate_predict(tmp_path: Path, capsys):
    root = tmp_path / "cohort"
    rows = ["participant_id\tgroup"]
    for i in range(8):
        data = bold(n_frames=24, seed=i)
        data[10:20, 20:30, 15:25] *= 1.0 + 0.05 * (i % 2)
        bids_run(root, f"{i:02d}", data=data)
        rows.append(f"sub-{i:02d}\t{i % 2}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")

    report = neurox.prepare(root, out=tmp_path / "store", voxel_size=4, min_frames=8, quiet=True)
    assert report.ok and len(report.done) == 8
    again = neurox.prepare(root, out=tmp_path / "store", voxel_size=4, min_frames=8, quiet=True)
    assert len(again.skipped) == 8 and not again.done  # resumable: nothing redone

    run = neurox.finetune(store=str(tmp_path / "store"), target="group", out=str(tmp_path / "run"), epochs=1,
                          batch_size=2, n_boot=20, loader_workers=0, split_fractions=[0.5, 0.25, 0.25])
    assert (run / "model" / "config.json").is_file()
    log = capsys.readouterr().err  # a batch job's log: whole lines, each validation with its intervals
    assert "\r" not in log and "train: 0/" in log and "(done)" in log
    assert "step 2: validation balanced_accuracy " in log and "auroc " in log and "n 2" in log
    assert "validation accuracy" not in log  # the log's line shows the headline metrics; metrics.jsonl has all
    results = neurox.evaluate(run, tmp_path / "store", out=tmp_path / "metrics.json")
    assert results["model"]["test"]["n_subjects"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    table = neurox.predict(run, tmp_path / "store", tmp_path / "predictions.tsv")
    lines = table.read_text().splitlines()
    assert lines[0].startswith("participant_id\tsplit") and len(lines) == 9


def test_unknown_architecture_setting_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown architecture setting.*emb_dim"):
        neurox.convert_swift(tmp_path / "x.ckpt", tmp_path / "out", emb_dim=48)
