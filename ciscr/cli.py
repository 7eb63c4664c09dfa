"""The ``ciscr`` command: train | run | eval | predict | demo | compare | bench | report | visualize
| info (and export, profile).

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

from ciscr.commands import COMMANDS, command
from ciscr.errors import CiscrError

_TRAIN_EXAMPLES = """examples:
  ciscr {cmd} synthetic --out runs/synth
  ciscr {cmd} camvid --out runs/mine data.root=my_data data.labeled=0.1 model.pretrained=imagenet
  ciscr {cmd} pascal --out runs/voc data.root=/data/VOC2012 data.split=1_8 threads=8
Rerun the same command to resume an interrupted run."""

_EVAL_EXAMPLES = """examples:
  ciscr eval runs/synth/stage3/checkpoint.pt
  ciscr eval runs/synth/stage3/checkpoint.pt eval.mode=sliding data.root=/elsewhere"""

# Examples of the commands defined outside this module, kept here so that every `--help` shows
# some (README: "ciscr COMMAND --help shows examples"); tests/test_everyday_friction.py parses
# each.
_MORE_EXAMPLES = {
    "predict": """examples:
  ciscr predict runs/synth/stage3/checkpoint.pt photos/ --out preds
  ciscr predict runs/synth/stage3/checkpoint.pt 'photos/*.jpg' --out preds --mode sliding --flip
  ciscr predict synth.onnx photos/ --out preds --overlay none""",
    "demo": """examples:
  ciscr demo
  ciscr demo --out my-demo --methods suponly,ciscr_bank,unimatch
  ciscr demo --out quick-demo train.epochs=20 threads=1""",
    "compare": """examples:
  ciscr compare runs/suponly runs/unimatch
  ciscr compare runs/suponly runs/unimatch runs/ciscr --out comparison""",
    "report": """examples:
  ciscr report runs/synth
  ciscr report runs/synth --max-gallery 0""",
    "visualize": """examples:
  ciscr visualize runs/synth/stage1/checkpoint.pt --image my_data/images/train/0007.png \\
      --labeled my_data/images/train/0001.png --mask my_data/masks/train/0001.png \\
      --cls car --out cisc_car.png""",
    "info": """examples:
  ciscr info
  ciscr info -v""",
    "bench": """examples:
  ciscr bench --quick
  ciscr bench --only train,pseudo --threads 2 --out bench-results""",
    "profile": """examples:
  ciscr profile --methods st,ciscr train.epochs=2
  ciscr profile camvid --methods suponly,ciscr --out prof --name profile_camvid""",
}


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps an ``examples:`` epilog's lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_examples(sub: argparse._SubParsersAction) -> None:
    for name, p in sub.choices.items():
        if name in _MORE_EXAMPLES and not p.epilog:
            p.epilog = _MORE_EXAMPLES[name]
        if (p.epilog or "").startswith("examples:") and p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = _HelpFormatter


def _add_verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """Accept -v after the sub-command too (``ciscr run cfg --out d -v``).

    The sub-parsers' flag defaults to SUPPRESS, so leaving it out there does not reset a -v
    given before the command.
    """
    for p in sub.choices.values():
        try:
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug logging of ciscr (other libraries: warnings only)")
        except argparse.ArgumentError:  # the command defines its own -v
            pass


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

    raw = argparse.RawDescriptionHelpFormatter  # keeps the examples' line breaks
    p = sub.add_parser("train", help="supervised training on the labeled split (SupOnly)",
                       epilog=_TRAIN_EXAMPLES.format(cmd="train"), formatter_class=raw)
    _config_args(p)
    p = sub.add_parser("run", help="the whole CISC-R pipeline (or a baseline) in stages",
                       epilog=_TRAIN_EXAMPLES.format(cmd="run"), formatter_class=raw)
    _config_args(p)
    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation split",
                       epilog=_EVAL_EXAMPLES, formatter_class=raw)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="checkpoint.pt written by ciscr train/run (it carries its config, so "
                   "no config file is needed)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the checkpoint's config, e.g. data.root=/elsewhere "
                   "eval.mode=sliding")
    p.add_argument("--out", type=Path, help="JSON file (default: next to the checkpoint, "
                   "<stem>_eval_<mode>[-<hash of other eval settings>][_<other data root>].json)")
    p = sub.add_parser("demo", help="SupOnly vs CISC-R (and more) on the built-in synthetic data")
    p.add_argument("--out", type=Path, default=Path("ciscr-demo"),
                   help="run directory, one sub-folder per method (default: ciscr-demo in the "
                        "current folder; rerun the same command to resume)")
    p.add_argument("--methods", default="suponly,ciscr_bank",
                   help="comma list of rows, e.g. suponly,ciscr_bank,unimatch (default: "
                        "suponly,ciscr_bank)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the demo's config (the packaged 'synthetic' one) for every "
                        "row, e.g. train.epochs=20 threads=1")
    p = sub.add_parser("info", help="versions, device, threads, bf16/CUDA/DDP availability")
    for extra in _EXTRA_PARSERS:
        extra(sub)
    _add_examples(sub)
    _add_verbose_everywhere(sub)
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

    run_demo(args.out, list(args.overrides),
             tuple(m.strip() for m in args.methods.split(",") if m.strip()))
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
    setup_logging(getattr(args, "verbose", False))
    try:
        if args.command in _AUTO_THREADS:
            _auto_threads(getattr(args, "device", None))
        return COMMANDS[args.command](args)
    except CiscrError as err:
        # Under torchrun every rank raises the same error: one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        _close_progress_bars()
        # A training stage says what a rerun will do (resume from which iteration, or restart).
        print(f"interrupted: {err}" if str(err) else
              "interrupted: rerun the same command to resume (finished stages are kept)",
              file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """Close the progress bars a Ctrl-C left open (pseudo-labelling, data check) now, so that
    none prints its last line after the 'interrupted' message at interpreter exit."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# Commands that run a model without a config of their own (train/run/eval/demo apply the
# config's `threads` setting): they start threads=auto, one thread per free core.
_AUTO_THREADS = ("predict", "report", "visualize", "export")


def _auto_threads(device: str | None) -> None:
    """threads=auto and the busy-machine warning, as train/run/eval do (device: --device)."""
    import torch

    from ciscr.runner import _set_threads, warn_if_busy

    _set_threads("auto")
    if device in (None, "cpu") or (device == "auto" and not torch.cuda.is_available()):
        warn_if_busy("cpu")


def setup_logging(verbose: bool) -> None:
    """ciscr logs INFO (DEBUG with -v); every other library only WARNING and above.

    The root logger stays at WARNING, so -v never floods the output with PIL's or
    matplotlib's debug lines; ciscr's own records pass through the same handler.
    """
    logging.basicConfig(
        level=logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    logging.getLogger("ciscr").setLevel(logging.DEBUG if verbose else logging.INFO)


def _register_optional_commands() -> None:
    """Import modules that add commands (each calls ``register_cli`` at import)."""
    import importlib

    for mod in ("ciscr.predict", "ciscr.export", "ciscr.report", "ciscr.compare",
                "ciscr.timing.bench",
                "ciscr.timing.profiling", "ciscr.visualize"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
            continue
        if hasattr(m, "register_cli") and m.register_cli not in _EXTRA_PARSERS:
            _EXTRA_PARSERS.append(m.register_cli)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
