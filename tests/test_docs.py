"""The commands the README, the docs and each command's --help show are ones the parser takes: an option renamed
or removed fails here, not in a user's terminal."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

from neurox import cli_options
from neurox.cli_options import build_parser

ROOT = Path(__file__).resolve().parents[1]


def shown_commands() -> list[tuple[str, str]]:
    """(where, command line) of every ``neurox ...`` line in the bash blocks of the README and docs/ (continuation
    lines joined, comments dropped), of the job scripts in examples/ and of each command's example."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("neurox ") and "..." not in line and "$" not in line:
                    found.append((doc.name, line))
    for script in sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".sbatch", ".pbs")):
        # the job scripts' variables as a first start sets them
        joined = re.sub(r"\\\n\s*", " ", script.read_text()).replace('"$OUT"', "runs/pretrain").replace(
            '"$RESUME"', "false")
        found += [(script.name, "neurox " + re.split(r" &| \|\|", command)[0])
                  for command in re.findall(r"-m neurox\.cli (.*)", joined)]
    for name in dir(cli_options):
        if name.startswith("_") and name.endswith("_parser"):
            epilog = getattr(cli_options, name)().epilog or ""
            found += [(f"{name} example", line.strip()) for line in re.findall(r"neurox [^;]+", epilog)]
    return found


def test_every_command_shown_parses():
    commands = shown_commands()
    assert {where for where, _ in commands} >= {"README.md", "slurm_pretrain.sbatch", "pbs_pretrain.pbs"}
    assert len(commands) > 40 and {line.split()[1] for _, line in commands} >= {
        "prepare", "finetune", "pretrain", "evaluate", "predict", "baseline", "connectivity", "explain", "embed",
        "probe", "demo", "synth", "convert-swift"}
    parser, failed = build_parser(), []
    for where, line in commands:
        argv = shlex.split(line)[1:]
        if "--config" in argv:  # reads the file it names, which the docs show beside it, not here
            continue
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser.parse_args(argv)
            except SystemExit:  # the parser's error, which it wrote to stderr
                failed.append(f"{where}: {line} -> {err.getvalue().strip().splitlines()[-1:]}")
    assert not failed, "\n".join(failed)


def test_every_python_call_shown_takes_its_keywords():
    """``neurox.finetune(store=..., epochs=...)`` in the docs: each keyword is an option of the command of that name
    (the functions take the commands' options by name, neurox.api)."""
    import ast

    import neurox

    calls = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            calls += [(doc.name, node) for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Call)
                      and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "neurox"]
    assert {node.func.attr for _, node in calls} >= {"synth", "prepare", "finetune", "evaluate"}
    for where, node in calls:
        assert hasattr(neurox, node.func.attr), f"{where}: neurox.{node.func.attr}"
        parser = getattr(cli_options, f"_{node.func.attr}_parser", None)
        if parser is not None:
            options = {action.dest for action in parser()._actions}
            unknown = [kw.arg for kw in node.keywords if kw.arg not in options]
            assert not unknown, f"{where}: neurox.{node.func.attr}({', '.join(unknown)}=...)"
