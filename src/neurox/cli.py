"""The ``neurox`` command: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import json
import sys

from jsonargparse import ArgumentParser


def _convert_swift_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Convert a published SwiFT checkpoint (Lightning .ckpt or safetensors) into a neurox "
        "model directory. The architecture comes from the checkpoint's hyper-parameters where it has "
        "them; flags set or override it; anything else is the paper configuration.",
        epilog="example: neurox convert-swift swift_ukb_sex.ckpt models/swift-ukb-sex",
    )
    p.add_argument("checkpoint", help="published checkpoint (.ckpt, .pt or .safetensors)")
    p.add_argument("out_dir", help="model directory to write")
    p.add_argument("--task", choices=["binary", "multiclass", "regression"], default=None,
                   help="what the head predicts, when the checkpoint does not say")
    for name, kind in (("img_size", "int*4"), ("in_chans", "int"), ("embed_dim", "int"),
                       ("patch_size", "int*4"), ("window_size", "int*4"), ("first_window_size", "int*4"),
                       ("depths", "int+"), ("num_heads", "int+"), ("c_multiplier", "int")):
        nargs = {"int*4": 4, "int+": "+", "int": None}[kind]
        p.add_argument(f"--{name}", type=int, nargs=nargs, default=None)
    p.add_argument("--last_layer_full_msa", type=bool, default=None)
    return p


def _smoke_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Run the SwiFT backbone forward and backward on generated input and report shapes, "
        "parameter count and timing: a check that the installation works.",
        epilog="example: neurox smoke --preset demo --batch 2",
    )
    p.add_argument("--preset", default="demo", help="model preset: demo or swift_paper")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=None, help="also save the (random) model as a model directory here")
    return p


def build_parser() -> ArgumentParser:
    from neurox import __version__

    parser = ArgumentParser(prog="neurox", description="neurox: foundation models of 4D brain fMRI.")
    parser.add_argument("--version", action="version", version=f"neurox {__version__}")
    sub = parser.add_subcommands(dest="command")
    sub.add_subcommand("convert-swift", _convert_swift_parser(), help="published SwiFT checkpoint -> model dir")
    sub.add_subcommand("smoke", _smoke_parser(), help="forward+backward of the backbone on generated input")
    return parser


def cmd_convert_swift(args) -> int:
    from neurox.models.convert import HPARAM_FIELDS, convert_swift

    fields = set(HPARAM_FIELDS.values())
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    out = convert_swift(args.checkpoint, args.out_dir, overrides=overrides, task=args.task)
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


COMMANDS = {"convert-swift": cmd_convert_swift, "smoke": cmd_smoke}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args[args.command])
    except (ValueError, FileNotFoundError) as err:
        print(f"neurox {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
