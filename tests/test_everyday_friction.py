"""What a new user still tripped on, second pass (issue #26): config paths, failed runs, the
labeled fraction, eval records, threads, -v, help examples."""

from __future__ import annotations

import shlex

import pytest

from ciscr.cli import _register_optional_commands, build_parser, main

TINY = [
    "data.synthetic.num_train=12", "data.synthetic.num_val=3", "data.synthetic.size=32",
    "data.labeled=4", "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=2",
    "train.batch_size=4", "train.crop_size=32", "train.progress=false", "model.channels=16",
    "model.backbone=mobilenet_v2", "report=false",
]


def _examples(help_text: str) -> list[str]:
    """The example command lines of a --help text (continuation lines joined)."""
    block = help_text.split("example", 1)[1].split("\n", 1)[1]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("ciscr ")]


def _all_commands() -> list[str]:
    _register_optional_commands()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _all_commands())
def test_every_help_shows_examples_that_parse(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    examples = _examples(capsys.readouterr().out)
    assert examples, f"ciscr {command} --help shows no example"
    assert any(shlex.split(line)[1] == command for line in examples)
    for line in examples:  # export's example goes on with `&& ciscr predict ...`
        argv = shlex.split(line.split("&&")[0])[1:]
        # argparse exits (code 2) on an example that does not match the command's options.
        args, extra = build_parser().parse_known_args(argv)
        assert args.command == argv[0] and all("=" in e for e in extra), line


def test_a_failed_run_leaves_no_folder_not_even_its_parents(tmp_path, capsys):
    # --out runs/a/b on bad input: neither b nor the runs/a it had to create stay behind.
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "runs" / "a" / "b"
    bad = str(tmp_path / "missing.pth")
    assert main(["train", "synthetic", "--out", str(out), *TINY, f"model.pretrained={bad}"]) == 2
    assert "pretrained weight file not found" in capsys.readouterr().err
    assert not (tmp_path / "kept" / "runs").exists() and (tmp_path / "kept").is_dir()


def test_eval_records_when_and_by_whom_and_never_overwrites_other_settings(tmp_path, capsys):
    import json

    import ciscr

    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY, "threads=1"]) == 0
    ckpt, stage = out / "stage1" / "checkpoint.pt", out / "stage1"
    capsys.readouterr()
    assert main(["eval", str(ckpt), "threads=1"]) == 0
    first = stage / "checkpoint_eval_whole.json"
    rec = json.loads(first.read_text())
    assert rec["ciscr_version"] == ciscr.__version__ and rec["timestamp"].startswith("20")
    assert capsys.readouterr().out.rstrip().endswith(f"written: {first}")  # nothing replaced
    # The same mode with other settings: its own file, the first one untouched.
    assert main(["eval", str(ckpt), "eval.flip=false", "threads=1"]) == 0
    (other,) = stage.glob("checkpoint_eval_whole-*.json")
    assert json.loads(other.read_text())["eval"]["flip"] is False
    assert json.loads(first.read_text()) == rec
    # The same settings again: replaced, and the output says what it replaced.
    capsys.readouterr()
    assert main(["eval", str(ckpt), "threads=1"]) == 0
    line = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert line.startswith(f"written: {first} (replaced the result of {rec['timestamp']}: mIoU ")


def test_a_labeled_fraction_says_what_it_is_a_fraction_of():
    from ciscr.data.partition import labeled_fraction_note, partition_ids

    # The dataset: 40 pool images, 8 of them with masks; a fraction counts the 8.
    lab, _ = partition_ids([f"m{i}" for i in range(8)], 0.5, seed=0)
    line, warning = labeled_fraction_note(0.5, len(lab), 8, 40, 0.125)
    assert line.startswith("labeled: data.labeled=0.5 -> 4 of the 8 images that have masks")
    assert "the pool has 40 images" in line
    assert "other 4 masks only score pseudo labels" in warning and "data.labeled=8" in warning
    assert labeled_fraction_note("1/8", 1, 8, 40, 0.125)[0].startswith(
        "labeled: data.labeled=1/8 -> 1 of the 8")
    assert "(the default)" in labeled_fraction_note(None, 1, 8, 40, 0.125)[0]
    # Every pool image masked (CamVid, the benchmarks): the rule is shown, nothing to warn.
    line, warning = labeled_fraction_note(0.125, 46, 367, 367, 0.125)
    assert "46 of the 367 images that have masks" in line and warning is None
    # A count or a list file says exactly what it does.
    assert labeled_fraction_note(20, 20, 367, 367, 0.125) == (None, None)
    assert labeled_fraction_note("ids.txt", 5, 8, 40, 0.125) == (None, None)


def test_the_run_summary_prints_the_fraction_rule(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="ciscr")
    args = ["train", "synthetic", "--out", str(tmp_path / "r"), *TINY, "data.labeled=0.25",
            "threads=1"]
    assert main(args) == 0
    assert "labeled: data.labeled=0.25 -> 3 of the 12 images that have masks" in caplog.text
    assert "only score pseudo labels" not in caplog.text  # every synthetic image has a mask
