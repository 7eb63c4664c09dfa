"""The ``ciscr`` command: train | run | eval | predict | demo | bench | report | visualize | info.

User errors (:class:`ciscr.errors.CiscrError`) print one ``error: ...`` line and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ciscr.errors import CiscrError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def _config_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("config", help="YAML file or packaged config name (synthetic, camvid, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.epochs=5 data.root=/data/voc")
    p.add_argument("--out", required=out_required, type=Path, help="run directory")


def build_parser() -> argparse.ArgumentParser:
    from ciscr import __version__

    parser = argparse.ArgumentParser(
        prog="ciscr", description="Semi-supervised semantic segmentation with CISC-R."
    )
    parser.add_argument("--version", action="version", version=f"ciscr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="supervised training on the labeled split (SupOnly)")
    _config_args(p)
    p = sub.add_parser("run", help="the whole CISC-R pipeline (or a baseline) in stages")
    _config_args(p)
    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data.root=/elsewhere eval.mode=sliding")
    p.add_argument("--out", type=Path, help="JSON file (default: next to the checkpoint)")
    p = sub.add_parser("demo", help="SupOnly vs ST vs CISC-R on the built-in synthetic data")
    p.add_argument("--out", type=Path, default=Path("ciscr-demo"), help="run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("info", help="versions, device, threads, bf16/CUDA/DDP availability")
    for extra in _EXTRA_PARSERS:
        extra(sub)
    return parser


# Other modules (predict, report, bench, visualize) register their sub-parsers here.
_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    from ciscr.config import load_config

    return load_config(args.config, list(args.overrides) + (extra or []))


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from ciscr.runner import run_training

    # `train` is stage 1 alone: SupOnly unless the config asks for SupOnly + L_CISC. The
    # unlabeled pool is not re-labelled for scoring (that is part of `run`'s reporting).
    cfg = _load(args)
    preset = "suponly_cisc" if cfg.method.name == "suponly_cisc" else "suponly"
    cfg = _load(args, [f"method.name={preset}", f"method.stage1_cisc_loss={preset != 'suponly'}",
                       "method.retrain=none", "method.rectify=none",
                       "method.score_final_pseudo=false"])
    run_training(cfg, args.out)
    return 0


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    from ciscr.runner import run_training

    run_training(_load(args), args.out)
    return 0


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    from ciscr.runner import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, list(args.overrides), args.out)
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from ciscr.demo import run_demo

    run_demo(args.out, list(args.overrides))
    return 0


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    from ciscr.runner import print_info

    print_info()
    return 0


def main(argv: list[str] | None = None) -> int:
    _register_optional_commands()
    parser = build_parser()
    # Overrides may come before or after options (`run cfg --out d a=1 b=2`): argparse stops
    # collecting a positional list at the first option, so the rest arrive as "unknown".
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s" if not args.verbose else "%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except CiscrError as err:
        # Under torchrun every rank raises the same error: one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def _register_optional_commands() -> None:
    """Import modules that add commands (each calls ``register_cli`` at import)."""
    import importlib

    for mod in ("ciscr.predict", "ciscr.report", "ciscr.bench", "ciscr.profiling",
                "ciscr.visualize"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
            continue
        if hasattr(m, "register_cli") and m.register_cli not in _EXTRA_PARSERS:
            _EXTRA_PARSERS.append(m.register_cli)


if __name__ == "__main__":  # pragma: no cover
    # Re-import so commands registered by optional modules land in the same module object.
    from ciscr.cli import main as _main

    sys.exit(_main())
