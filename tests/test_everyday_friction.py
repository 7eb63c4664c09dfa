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


def _yaml(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_paths_resolve_against_the_yaml_folder_command_line_ones_against_cwd(
        tmp_path, monkeypatch):
    from ciscr.config import load_config

    cfg_file = _yaml(tmp_path / "project" / "cfgs" / "mine.yaml",
                     "data: {format: folder, root: ../data, labeled: ids.txt}\n"
                     "model: {pretrained: w.pth, init: ../runs/a/checkpoint.pt}\n")
    (tmp_path / "project" / "data").mkdir()
    (tmp_path / "project" / "cfgs" / "w.pth").write_bytes(b"")
    (tmp_path / "project" / "cfgs" / "ids.txt").write_text("a\n")
    (tmp_path / "project" / "runs" / "a").mkdir(parents=True)
    (tmp_path / "project" / "runs" / "a" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(str(cfg_file))
    assert cfg.data.root == str(tmp_path / "project" / "data")
    assert cfg.model.pretrained == str(tmp_path / "project" / "cfgs" / "w.pth")
    assert cfg.data.labeled == str(tmp_path / "project" / "cfgs" / "ids.txt")
    assert cfg.model.init == str(tmp_path / "project" / "runs" / "a" / "checkpoint.pt")
    # On the command line a relative path means the current folder, kept as typed.
    assert load_config(str(cfg_file), ["data.root=../data"]).data.root == "../data"
    # Names and numbers are not paths.
    cfg = load_config(str(cfg_file), ["model.pretrained=imagenet", "data.labeled=0.5"])
    assert cfg.model.pretrained == "imagenet" and cfg.data.labeled == 0.5


def test_a_saved_run_config_keeps_its_current_folder_paths(tmp_path, monkeypatch):
    # A run's config.yaml records command-line paths relative to where it ran (the CamVid
    # benchmark reloads its runs' configs from the repo root): they still resolve there.
    from ciscr.config import load_config

    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    saved = _yaml(tmp_path / "repo" / "runs" / "r" / "config.yaml",
                  "data: {format: folder, root: ../shared/data}\n")
    monkeypatch.chdir(tmp_path / "repo")
    assert load_config(str(saved)).data.root == "../shared/data"


def test_a_packaged_config_path_is_a_repo_layout_default_from_any_folder(
        tmp_path, monkeypatch, capsys):
    from ciscr import config

    repo, weights = tmp_path / "repo", tmp_path / "shared" / "weights"
    weights.mkdir(parents=True)
    (weights / "mobilenet_v2_imagenet.pth").write_bytes(b"")
    repo.mkdir()
    far = tmp_path / "far" / "away"  # ../shared from here is not the repo's
    far.mkdir(parents=True)
    monkeypatch.setattr(config, "REPO_ROOT", repo)
    monkeypatch.chdir(far)
    cfg = config.load_config("camvid")
    assert cfg.model.pretrained == str(weights / "mobilenet_v2_imagenet.pth")  # found from far
    # The data is not in this layout: the error says which rule it followed and the key.
    out = far / "run"
    assert main(["train", "camvid", "--out", str(out), "threads=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.root: ../shared/data/camvid is not a directory" in err
    assert "packaged config camvid's default for the repo layout" in err
    assert "override it: data.root=PATH" in err
    assert str(tmp_path / "shared" / "data" / "camvid") in err
    # A relative path typed on the command line: the error says "current folder".
    assert main(["train", "camvid", "--out", str(out), "data.root=mine"]) == 2
    err = capsys.readouterr().err
    assert "data.root: mine is not a directory" in err and "current folder" in err
    assert str(far) in err and not out.exists()


def test_a_missing_yaml_path_names_the_yaml_file(tmp_path, monkeypatch, capsys):
    cfg_file = _yaml(tmp_path / "cfgs" / "mine.yaml",
                     "data: {format: folder, root: ../nowhere}\nmodel: {pretrained: ''}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and f"written in {cfg_file}" in err
    assert "resolves against its folder" in err and str(tmp_path / "nowhere") in err


@pytest.fixture
def machine(monkeypatch):
    """A 2-core machine whose load the test sets: (load average, threads runnable now)."""
    from ciscr import threads

    def set_load(average: float, running_now: float | None, own: float = 0.0) -> None:
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (average, average, average))
        monkeypatch.setattr(threads, "_running_now", lambda: running_now)
        monkeypatch.setattr(threads, "_own_share", lambda: own)

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 2)
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    return set_load


def test_threads_auto_starts_one_thread_per_free_core(machine, monkeypatch):
    from ciscr.threads import auto_threads, oversubscription_warning

    machine(1.9, 2.0)  # another job keeps both cores busy
    assert auto_threads() == 1 and "threads=auto or threads=1" in oversubscription_warning(2)
    assert oversubscription_warning(auto_threads()) is None  # auto never oversubscribes
    machine(0.2, 0.0)
    assert auto_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's (or the benchmark's) choice wins
    machine(1.9, 2.0)
    assert auto_threads() == 2


def test_the_busy_warning_ignores_finished_and_own_work(machine):
    from ciscr.threads import oversubscription_warning

    # The demo's first row at load 1.1-1.6 with nothing else running: the load average still
    # counts work that just ended, but nothing else is runnable now.
    machine(1.6, 0.0)
    assert oversubscription_warning(2) is None
    # Without /proc (not Linux): this process's own earlier work (the demo's previous rows)
    # is subtracted from the load average.
    machine(1.6, None, own=1.2)
    assert oversubscription_warning(2) is None
    machine(1.6, None, own=0.0)
    assert oversubscription_warning(2) is not None


def test_every_command_warns_the_same_way_and_auto_is_the_default(tmp_path, machine, caplog):
    import logging

    import torch

    caplog.set_level(logging.INFO, logger="ciscr")
    before = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        machine(0.0, 0.0)
        assert main(["train", "synthetic", "--out", str(out), *TINY]) == 0
        assert "(threads=auto: 2 of 2 core(s), load from other work 0.0)" in caplog.text
        machine(1.9, 2.0)
        caplog.clear()
        ckpt = str(out / "stage1" / "checkpoint.pt")
        assert main(["eval", ckpt]) == 0  # threads=auto: 1 free core, no warning
        assert torch.get_num_threads() == 1 and "busy" not in caplog.text
        assert main(["eval", ckpt, "threads=2"]) == 0
        assert "WARNING: this machine is busy (load average 1.9 on 2 core(s)" in caplog.text
        caplog.clear()
        img = tmp_path / "x.png"
        from PIL import Image

        Image.new("RGB", (32, 32)).save(img)
        assert main(["predict", ckpt, str(img), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
        assert torch.get_num_threads() == 1 and "busy" not in caplog.text
    finally:
        torch.set_num_threads(before)


def test_info_says_what_the_load_is(machine, capsys):
    machine(1.5, 1.0)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "load average 1.50 on 2 core(s), 1.0 of it other work now" in out
    assert "threads=auto would start 1" in out


def test_verbose_prints_what_really_runs(tmp_path, caplog):
    import logging

    def debug_lines(out: str, *extra: str) -> str:
        caplog.clear()
        caplog.set_level(logging.DEBUG, logger="ciscr")
        args = ["train", "synthetic", "--out", str(tmp_path / out),
                f"data.root={tmp_path / 'data'}", *TINY, "threads=1", *extra]
        assert main(args) == 0
        return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)

    text = debug_lines("r1", "-v")
    # the resolved config: what differs from the method's defaults, overrides included
    assert "config (differs from the defaults of method.name=suponly): " in text
    assert "data.labeled=4" in text and "train.iters_per_epoch=2" in text
    assert "threads: 1 (threads=1)" in text  # how the threads were chosen
    assert "synthetic data: not cached, generating" in text
    assert "data: pool 12 images = 4 labeled + 8 unlabeled (8 of them with a mask" in text
    assert "synthetic data: cache hit" in debug_lines("r2", "-v")  # the same data again
    # Without -v, ciscr's logger stays at INFO: no debug line at all.
    caplog.clear()
    main(["info"])
    assert logging.getLogger("ciscr").level == logging.INFO
