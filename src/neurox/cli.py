"""The ``neurox`` command: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import inspect
import json
import sys

from neurox import api
from neurox.cli_options import build_parser


def cmd_convert_swift(args) -> int:
    from neurox.models.convert import HPARAM_FIELDS

    architecture = {k: args[k] for k in HPARAM_FIELDS.values() if args.get(k) is not None}
    out = api.convert_swift(args.checkpoint, args.out_dir, task=args.task, **architecture)
    print(f"wrote {out} (load it with neurox.load_pretrained('{out}'))")
    return 0


def cmd_smoke(args) -> int:
    import time

    import torch

    from neurox.config import InputContract, preset
    from neurox.models import SwiFT, build_head, num_parameters

    config = preset(args.preset)
    model = SwiFT(config, build_head("binary", config.num_features))
    x = torch.randn(args.batch, config.in_chans, *config.img_size)
    start = time.perf_counter()
    features = model.forward_features(x)
    logits = model.forward_head(features)
    logits.sum().backward()
    elapsed = time.perf_counter() - start
    report = {
        "preset": args.preset,
        "parameters_backbone": num_parameters(model) - num_parameters(model.head),
        "input": list(x.shape),
        "features": list(features.shape),
        "logits": list(logits.shape),
        "forward_backward_s": round(elapsed, 3),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        from neurox.hub import save_pretrained

        save_pretrained(model, args.out, contract=InputContract.for_model(config),
                        card={"notes": "random weights from `neurox smoke`; not trained"})
        print(f"wrote {args.out}")
    return 0


def keywords(function, args) -> dict:
    """The parsed options that ``function`` (one of ``neurox.api``) takes, by name."""
    return {name: plain(args[name]) for name in inspect.signature(function).parameters if name in args}


def config_options(cls, args) -> dict:
    """The parsed options that a config dataclass holds (for the commands configured by YAML too)."""
    import dataclasses

    return {f.name: plain(args[f.name]) for f in dataclasses.fields(cls) if f.name in args}


def plain(value):
    """An int for the parser's checked integers (``PositiveInt`` is a subclass the YAML writer refuses)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


def cmd_synth(args) -> int:
    out = api.synth(**keywords(api.synth, args))
    print(f"wrote {out} ({args.n_subjects} subjects; ground truth in {out / 'ground_truth'})")
    return 0


NO_PHENOTYPES = ("no phenotype table (participants.tsv) in the input folder or its BIDS dataset: give one with "
                 "--participants to train on its columns (a re-run adds it and keeps the prepared runs)")


def cmd_prepare(args) -> int:
    from neurox.data.confounds import motion_report, non_steady_report
    from neurox.data.store import Store

    report = api.prepare(**keywords(api.prepare, args))
    kept_table = (report.store / "participants.tsv").is_file()  # from an earlier pass
    phenotypes = report.phenotypes or (None if kept_table else NO_PHENOTYPES)
    if report.survey is not None:
        print("\n".join(report.survey + ([phenotypes] if phenotypes else [])))
        return 0
    print(f"{report.store}: {len(report.done)} prepared, {len(report.skipped)} already done, "
          f"{len(report.failed)} failed" + (f" (see {report.store / 'failures.tsv'})" if report.failed else ""))
    if phenotypes:
        print(phenotypes)
    store = Store(report.store)
    for line in (non_steady_report(store), motion_report(store)):
        if line:
            print(line)
    return 0 if report.ok else 3


def cmd_finetune(args) -> int:
    from neurox.train.distributed import detect
    from neurox.train.finetune import FinetuneConfig

    run_dir = api.finetune(**config_options(FinetuneConfig, args))
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and detect("cpu").is_main:
        print_metrics(json.loads(metrics.read_text()), title=f"{run_dir}", target=args.target)
    return 0


def cmd_pretrain(args) -> int:
    from neurox.train.distributed import detect
    from neurox.train.pretrain import PretrainConfig

    run_dir = api.pretrain(**config_options(PretrainConfig, args))
    if detect("cpu").is_main and (run_dir / "model" / "config.json").is_file():
        print(f"wrote {run_dir / 'model'} (fine-tune it with neurox finetune --init {run_dir / 'model'})")
    return 0


def cmd_evaluate(args) -> int:
    from neurox.train.distributed import detect
    from neurox.train.runs import run_targets

    results = api.evaluate(**keywords(api.evaluate, args))  # checks the run first
    if not detect("cpu").is_main:
        return 0
    targets = run_targets(args.run)
    for name, splits in results.items():
        print_metrics(splits, title=name, target=targets[0].column if len(targets) == 1 else None)
    return 0


def cmd_predict(args) -> int:
    from neurox.train.distributed import detect

    out = api.predict(**keywords(api.predict, args))
    if detect("cpu").is_main:
        print(f"wrote {out}")
    return 0


def print_metrics(splits: dict, title: str, target: str | None = None) -> None:
    from neurox.train.engine import summary
    from neurox.train.metrics import motion_warnings

    print(title)
    for split, metrics in splits.items():
        print(f"  {split}: " + summary(metrics))
    for line in motion_warnings(splits, target):
        print(line)


def cmd_baseline(args) -> int:
    from neurox.analysis.baseline import BaselineConfig

    out = api.baseline(quiet=args.quiet, **config_options(BaselineConfig, args))
    print_metrics(json.loads((out / "metrics.json").read_text()), title=f"{out} (FC baseline)", target=args.target)
    return 0


def cmd_connectivity(args) -> int:
    out = api.connectivity(**keywords(api.connectivity, args))
    print(f"wrote {out / 'connectivity.npz'}, {out / 'parcel_series.npz'} and {out / 'group_mean.png'}")
    if (out / "edges.json").is_file():
        summary = json.loads((out / "edges.json").read_text())
        for level, result, table in (("edgewise", summary, "edges.tsv"),
                                     ("between networks", summary.get("networks"), "network_edges.tsv")):
            if result is None:
                continue
            if "skipped" in result:
                print(f"no statistics {level}: {result['skipped']}")
                continue
            top = "; ".join(f"{'-'.join(str(v) for v in list(e.values())[:2])} t={e['t']:.2f} q={e['q']:.3g}"
                            for e in result["top"][:3])
            harmonized = f"; ComBat across {result['harmonize']}" if "harmonize" in result else ""
            print(f"{level}, {summary['group_by']} ({result['test']}; n={result['n']}; covariates: "
                  f"{', '.join(result['covariates']) or 'none'}{harmonized}): {result['significant']} of "
                  f"{result['edges']} at FDR q < {result['fdr']} ({out / table}); strongest: {top}")
        nbs = summary.get("nbs")
        if nbs:
            largest = "; ".join(f"{c['edges']} edges among {c['parcels']} parcels ({c['sign']}), p {c['p_fwe']:.3g}"
                                for c in nbs["components"][:3])
            print(f"network-based statistic (|t| > {nbs['threshold']:g}, {nbs['permutations']} permutations): "
                  f"{nbs['significant']} component(s) at p_FWE < {nbs['alpha']} ({out / 'nbs.tsv'})"
                  + (f"; largest: {largest}" if largest else ""))
    return 0


def cmd_explain(args) -> int:
    out = api.explain(**keywords(api.explain, args))
    summary = json.loads((out / "explain.json").read_text())
    print(f"wrote maps of {len(summary['participants'])} participant(s) and {len(summary['groups'])} group(s) "
          f"to {out}" + (f"; {len(summary['failed'])} failed" if summary["failed"] else ""))
    if summary.get("top_regions"):
        print(f"regions of highest mean attribution ({out / 'regions.tsv'}):")
    for name, top in summary.get("top_regions", {}).items():
        print(f"  {name}: {', '.join(top)}")
    if summary.get("top_networks"):
        print(f"networks of highest mean attribution ({out / 'networks.tsv'}):")
    for name, top in summary.get("top_networks", {}).items():
        print(f"  {name}: {', '.join(top)}")
    return 0 if not summary["failed"] else 3


def cmd_embed(args) -> int:
    paths = api.embed(**keywords(api.embed, args))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_probe(args) -> int:
    results = api.probe(**keywords(api.probe, args))
    print_metrics(results, title=f"linear probe of {args.model}", target=args.target)
    return 0


def cmd_demo(args) -> int:
    report = api.demo(**keywords(api.demo, args))
    if report is not None:  # else stopped, and said so
        print(report.read_text())
    return 0


COMMANDS = {
    "synth": cmd_synth, "prepare": cmd_prepare, "pretrain": cmd_pretrain, "finetune": cmd_finetune,
    "evaluate": cmd_evaluate, "predict": cmd_predict, "baseline": cmd_baseline, "demo": cmd_demo,
    "connectivity": cmd_connectivity, "explain": cmd_explain, "embed": cmd_embed,
    "probe": cmd_probe, "convert-swift": cmd_convert_swift,
    "smoke": cmd_smoke,
}


def out_of_memory(err: Exception, options) -> str:
    """What ran out (torch's first two sentences: the device and the allocation), and the command's options that
    need less memory."""
    said = ". ".join(str(err).strip().split(". ")[:2]).rstrip(".")
    advice = [text for name, text in (
        ("batch_size", "a lower --batch_size" + (" (--accumulation keeps the global batch)"
                                                  if "accumulation" in options else "")),
        ("grad_checkpointing", "--grad_checkpointing true"),
        ("precision", "--precision bf16")) if name in options]
    resume = "; --resume true goes on from the last checkpoint" if "resume" in options else ""
    return f"{said or 'out of memory'}; " + (f"what needs less: {', '.join(advice)}" if advice else
                                            "run it on a device with more memory") + resume


SHARED_BY_PROCESSES = ("pretrain", "finetune", "evaluate", "predict")  # split their work across processes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from concurrent.futures.process import BrokenProcessPool

    import torch

    from neurox.errors import UserFacingError
    from neurox.train.distributed import detect

    processes = detect("cpu").world_size
    if processes > 1 and args.command not in SHARED_BY_PROCESSES:  # each would do all of it, into the same files
        print(f"neurox {args.command}: error: runs in one process, and the launcher started {processes}; run it "
              f"without torchrun, srun or mpiexec (--workers sets its parallelism where it has one; "
              f"{', '.join(SHARED_BY_PROCESSES)} share their work across processes)", file=sys.stderr)
        return 1
    try:
        return COMMANDS[args.command](args[args.command])
    except (ValueError, OSError, UserFacingError) as err:  # OSError: a folder that cannot be written, a full disk
        print(f"neurox {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C in training, or the first anywhere else: one line, not a traceback
        print(f"neurox {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's status for a command ended by SIGINT
    except torch.OutOfMemoryError as err:  # the accelerator's: one line on what to change, not a traceback
        print(f"neurox {args.command}: error: {out_of_memory(err, args[args.command])}", file=sys.stderr)
        return 1
    except BrokenProcessPool:  # the system killed a --workers process, most often for memory
        print(f"neurox {args.command}: error: a worker process ended abruptly (most often killed by the system for "
              "lack of memory); run the same command again with fewer --workers: what was finished is kept",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
