"""What a new user meets first: run-start summary and warnings, resume messages, threads,
eval records, -v anywhere, help examples (issue #14, section 3)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from ciscr import runner
from ciscr.cli import main
from ciscr.config import load_config

TINY = [
    "data.synthetic.num_train=12", "data.synthetic.num_val=3", "data.synthetic.size=32",
    "data.labeled=4", "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=2", "train.batch_size=4",
    "train.crop_size=32", "train.progress=false", "model.channels=16",
    "model.backbone=mobilenet_v2", "report=false",
]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="ciscr")
    return caplog


@pytest.fixture
def quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (0.0, 0.0, 0.0))


def test_start_summary_then_resume_messages(tmp_path, logs, quiet_machine):
    out = tmp_path / "run"
    args = ["train", "synthetic", "--out", str(out), *TINY, "train.ckpt_every=1", "threads=1"]
    assert main(args) == 0
    text = logs.text
    assert f"run: {out} (new)" in text
    assert "data: 4 labeled / 8 unlabeled / 3 val images, 3 classes (background, disc, square)" in text
    assert "device cpu, 1 thread(s) x 1 process(es) (threads=1), precision " in text
    assert "(train.amp=auto)" in text  # auto is resolved and named
    assert "resuming" not in text
    logs.clear()
    (out / "stage1" / "done.json").unlink()  # as if killed after the last checkpoint
    assert main(args) == 0
    assert f"run: {out} (resumed)" in logs.text
    assert "stage1: resuming at iteration 2/2" in logs.text
    logs.clear()
    assert main(args) == 0
    assert "resuming: stage1 already done (skipped)" in logs.text


def test_random_init_warning_is_loud_and_names_the_setting():
    cfg = load_config("camvid", ["model.pretrained="])
    text = runner.random_init_warning(cfg)
    assert text.startswith("WARNING: model.pretrained is empty") and "RANDOM" in text
    assert "model.pretrained=imagenet" in text and "mobilenet_v2" in text
    assert runner.random_init_warning(load_config("synthetic")) is None  # documented there
    assert runner.random_init_warning(load_config("pascal")) is None  # imagenet


def test_oversubscription_warning(monkeypatch):
    from ciscr import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_running_now", lambda: 2.0)  # the other job's 2 threads
    monkeypatch.setattr(threads, "_own_share", lambda: 0.0)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (1.9, 1.5, 1.0))
    text = runner.oversubscription_warning(threads=2)
    assert "load average 1.9 on 2 core(s)" in text and "threads=1" in text
    assert "OMP_NUM_THREADS=1" in text
    assert runner.oversubscription_warning(threads=1) is None  # nothing left to lower
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert runner.oversubscription_warning(threads=2) is None


def test_threads_setting_is_applied_and_may_change_on_resume(tmp_path, quiet_machine):
    import torch

    before = torch.get_num_threads()
    try:
        out = tmp_path / "r"
        assert main(["train", "synthetic", "--out", str(out), *TINY, "threads=2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["train", "synthetic", "--out", str(out), *TINY, "threads=1"]) == 0
    finally:
        torch.set_num_threads(before)


def test_eval_records_its_settings_and_another_root_gets_its_own_file(tmp_path, logs,
                                                                      quiet_machine):
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY]) == 0
    ckpt = out / "stage1" / "checkpoint.pt"
    logs.clear()
    assert main(["eval", str(ckpt), "eval.mode=multiscale", "eval.scales=[1.0]"]) == 0
    assert "eval.mode=multiscale with eval.scales=[1.0] is single-scale" in logs.text
    # scales other than the checkpoint's own: the file name carries a hash of the settings
    (first,) = (out / "stage1").glob("checkpoint_eval_multiscale-*.json")
    rec = json.loads(first.read_text())
    assert rec["eval"] == {"mode": "multiscale", "scales": [1.0], "window": 32,
                           "stride_ratio": pytest.approx(2 / 3), "flip": True}
    assert rec["data"]["format"] == "synthetic" and rec["data"]["root"] == ""
    other = tmp_path / "elsewhere"
    assert main(["eval", str(ckpt), "eval.mode=multiscale", f"data.root={other}"]) == 0
    written = sorted(p.name for p in (out / "stage1").glob("checkpoint_eval_*.json"))
    assert len(written) == 2 and written[0] == first.name
    assert written[1].startswith("checkpoint_eval_multiscale_elsewhere-")
    assert json.loads(first.read_text()) == rec  # the first result is untouched
    again = json.loads((out / "stage1" / written[1]).read_text())
    assert again["data"]["root"] == str(other) and again["eval"]["scales"] != [1.0]


def test_verbose_is_accepted_after_the_command(capsys):
    assert main(["info", "-v"]) == 0
    assert logging.getLogger("ciscr").level == logging.DEBUG
    assert main(["-v", "info"]) == 0
    assert main(["info"]) == 0
    assert logging.getLogger("ciscr").level == logging.INFO


def test_verbose_keeps_third_party_debug_lines_out(tmp_path):
    # A fresh interpreter: logging is configured by ciscr alone (pytest installs its own).
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    code = (
        "import logging, sys; from ciscr.cli import setup_logging; setup_logging(True);"
        "from PIL import Image; Image.open(sys.argv[1]).load();"
        "logging.getLogger('ciscr').debug('ciscr debug line')"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")],
                         capture_output=True, text=True, check=True)
    assert "ciscr debug line" in res.stderr
    assert "PIL" not in res.stderr and "STREAM" not in res.stderr


@pytest.mark.parametrize("command", ["train", "run"])
def test_train_and_run_help_show_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"ciscr {command} synthetic --out runs/synth" in out


def test_eval_help_explains_the_checkpoint(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "checkpoint.pt written by ciscr train/run" in capsys.readouterr().out


def test_precision_follows_the_machine_and_explicit_emulated_bf16_warns(tmp_path, logs,
                                                                        quiet_machine,
                                                                        monkeypatch):
    """Issue 33: on a CPU without native bf16 the packaged camvid config trains in fp32, and an
    explicit train.amp=bf16 runs as asked with one warning naming train.amp=auto."""
    from ciscr.utils import misc

    monkeypatch.setattr(misc, "_this_cpu_fast_bf16", lambda: False)  # an AVX2-only CPU
    cfg = load_config("camvid")
    assert cfg.train.amp == "auto" and misc.resolve_amp(cfg.train.amp, "cpu") == "none"
    for name in ("synthetic", "camvid", "pascal", "cityscapes", "coco"):
        assert load_config(name).train.amp == "auto", name
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY, "threads=1",
                 "train.amp=bf16"]) == 0
    warned = [r.getMessage() for r in logs.records if "no native bf16" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("warning: train.amp=bf16")
    assert "train.amp=auto" in warned[0] and "precision bf16 autocast" in logs.text
    logs.clear()
    assert main(["train", "synthetic", "--out", str(tmp_path / "auto"), *TINY, "threads=1"]) == 0
    assert "no native bf16" not in logs.text and "precision fp32 (train.amp=auto)" in logs.text
    monkeypatch.setattr(misc, "_this_cpu_fast_bf16", lambda: True)
    assert "native" in runner._bf16_cpu() and "picks bf16" in runner._bf16_cpu()
    monkeypatch.setattr(misc, "_this_cpu_fast_bf16", lambda: False)
    assert "emulated" in runner._bf16_cpu() and "picks fp32" in runner._bf16_cpu()


def test_demo_help_gives_the_out_default_and_what_key_value_does():
    import os

    out = subprocess.run([sys.executable, "-m", "ciscr", "demo", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "300"}).stdout
    flat = " ".join(out.split())
    assert "default: ciscr-demo" in flat and "changes to the demo's config" in flat


def test_eval_of_a_snapshot_uses_its_run_config(tmp_path, capsys, quiet_machine):
    """Issue 33: a stage's snapshot_*.pt is evaluable (its meta, or for a snapshot written
    before snapshots carried one, the config of the checkpoint.pt beside it)."""
    from ciscr.engine.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY, "threads=1",
                 "train.epochs=2"]) == 0
    snap = sorted((out / "stage1").glob("snapshot_*.pt"))[0]
    assert main(["eval", str(snap)]) == 0
    first = json.loads(snap.with_name(f"{snap.stem}_eval_whole.json").read_text())
    assert first["iteration"] == load_checkpoint(snap)["iteration"]
    old = tmp_path / "old" / "stage1"
    old.mkdir(parents=True)
    ckpt = load_checkpoint(snap)
    save_checkpoint(old / snap.name, {"model": ckpt["model"], "iteration": ckpt["iteration"]})
    assert main(["eval", str(old / snap.name)]) == 2
    err = capsys.readouterr().err
    assert "a training snapshot (model weights at iteration" in err
    assert "evaluate the stage's checkpoint.pt" in err
    (old / "checkpoint.pt").write_bytes((out / "stage1" / "checkpoint.pt").read_bytes())
    assert main(["eval", str(old / snap.name)]) == 0
    again = json.loads((old / f"{snap.stem}_eval_whole.json").read_text())
    assert again["miou"] == pytest.approx(first["miou"], abs=1e-6)


def test_interrupt_message_comes_from_the_stage(monkeypatch, capsys):
    from ciscr.errors import Interrupted

    def stopped(cfg, out):
        raise Interrupted("stage1 stopped at iteration 3/9 before its first checkpoint")

    monkeypatch.setattr(runner, "run_training", stopped)
    assert main(["train", "synthetic", "--out", "unused"]) == 130
    assert capsys.readouterr().err == ("interrupted: stage1 stopped at iteration 3/9 before its "
                                       "first checkpoint\n")


def test_final_pseudo_labelling_says_why_and_how_to_skip(tmp_path, logs, quiet_machine):
    out = tmp_path / "run"
    assert main(["run", "synthetic", "--out", str(out), *TINY, "threads=1",
                 "method.name=suponly", "method.score_final_pseudo=true"]) == 0
    line = next(r.getMessage() for r in logs.records if r.getMessage().startswith("pseudo_final:"))
    assert "labelling the 8 unlabeled images with the final model" in line
    assert "method.score_final_pseudo=false skips it" in line
    res = json.loads((out / "results.json").read_text())
    assert res["stages"]["pseudo_final"]["cpu_seconds"] > 0


def test_ctrl_c_prints_nothing_after_the_interrupted_line(tmp_path, monkeypatch, capsys,
                                                         quiet_machine):
    """Issue 33: the progress bar's last line comes before 'interrupted: ...', never after."""
    from ciscr.engine import train

    real = train._one_step

    def ctrl_c_at_second_step(model, st, step_fn, batches, t, cfg, device):
        if t == 1:
            raise KeyboardInterrupt
        return real(model, st, step_fn, batches, t, cfg, device)

    monkeypatch.setattr(train, "_one_step", ctrl_c_at_second_step)
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY, "threads=1",
                 "train.progress=true", "train.ckpt_every=50"]) == 130
    err = capsys.readouterr().err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("interrupted: stage1 stopped at iteration 1/2 before its first "
                           "checkpoint") and "\r" not in last
    assert "stage1:" in err  # the bar was drawn, before the message
