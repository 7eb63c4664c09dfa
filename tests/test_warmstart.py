"""model.init: every family from a trained checkpoint, its checks, its budget, resume, and the
verdict against the run's own supervised start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ciscr.cli import main
from ciscr.config import load_config
from ciscr.engine.checkpoint import load_checkpoint
from ciscr.warmstart import start_comparison, warm_config, warm_stage_iterations

# 10 labeled images repeated twice at batch 8: 3 iterations per labeled epoch.
TINY = ["train.epochs=2", "train.warm_epochs=2", "train.unlabeled_epochs=1", "train.batch_size=8",
        "train.crop_size=32", "train.progress=false", "train.ckpt_every=2", "train.log_every=1",
        "data.synthetic.num_train=30", "data.synthetic.num_val=4", "data.synthetic.size=32",
        "report=false", "device=cpu", "threads=1"]  # fmt: skip
T = 6  # train.warm_epochs x 3 iterations


def run(out: Path, *extra: str) -> int:
    return main(["run", "synthetic", "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("warm") / "base"
    assert run(out, "method.name=suponly") == 0
    return out / "stage1" / "checkpoint.pt"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_base_keeps_stpp_snapshots(base):
    assert len(sorted(base.parent.glob("snapshot_*.pt"))) == 2


def test_stagewise_method_takes_the_checkpoint_as_its_stage1(base, tmp_path):
    out = tmp_path / "stpp"
    assert run(out, "method.name=stpp", f"model.init={base}") == 0
    assert same(weights(out / "stage1" / "checkpoint.pt"), weights(base))
    assert not (out / "stage1" / "train.jsonl").exists()  # nothing trained in stage 1
    assert [p.name for p in sorted((out / "stage1").glob("snapshot_*.pt"))] == \
        [p.name for p in sorted(base.parent.glob("snapshot_*.pt"))]
    # The control's T iterations shared by the two retraining stages, which start warm.
    assert [load_checkpoint(out / s / "checkpoint.pt")["total_iters"]
            for s in ("stage2", "stage3")] == [T // 2, T // 2]
    cfg = load_config(out / "config.yaml")
    assert cfg.method.init == "previous" and cfg.model.init_sha256
    res = json.loads((out / "results.json").read_text())
    assert res["start"]["stage"] == "stage1"
    assert res["gain_over_start"] == pytest.approx(
        res["final_metrics"]["miou"] - res["stages"]["stage1"]["val_miou"])


@pytest.mark.parametrize("method", ["fixmatch", "suponly"])
def test_online_and_suponly_train_on_from_the_checkpoint(base, tmp_path, method, capsys,
                                                        caplog):
    out = tmp_path / method
    assert run(out, f"method.name={method}", f"model.init={base}") == 0
    stage = "online" if method == "fixmatch" else "stage1"
    assert load_checkpoint(out / stage / "checkpoint.pt")["total_iters"] == T
    start = json.loads((out / "init" / "metrics.json").read_text())["miou"]
    base_miou = json.loads((base.parent / "metrics.json").read_text())["miou"]
    assert start == pytest.approx(base_miou, abs=1e-6)  # the checkpoint itself was evaluated
    res = json.loads((out / "results.json").read_text())
    lr = load_config("synthetic").train.lr
    # The start's budget (what its checkpoint trained) beside this run's, in results.json ...
    assert res["start"] == {"stage": "init", "val_miou": start, "iterations": T, "lr": lr}
    assert res["budget"] == {"iterations": T, "lr": lr}
    # ... in the start summary, and at the end with what the gain over the start is not.
    printed = capsys.readouterr()
    assert f"budget: {T} iterations at lr {lr:g}" in caplog.text
    assert f"on a start whose checkpoint trained {T} iterations at lr {lr:g}" in caplog.text
    assert "vs its supervised start (init)" in printed.out
    assert f"this run: {T} iterations at lr {lr:g}, the start: {T} iterations" in printed.out
    if method == "suponly":
        assert "this SupOnly run is the control" in printed.out
    else:
        assert "a gain over the start is not a gain over a control" in printed.out
        assert "ciscr compare CONTROL_RUN THIS_RUN" in printed.out
    assert load_config(out / "config.yaml").train.lr == lr


def test_warm_settings_replace_epochs_and_lr_only_with_an_init():
    cfg = load_config("synthetic", ["train.warm_epochs=7", "train.warm_lr=0.001"])
    assert warm_config(cfg) is cfg
    warm = warm_config(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"init": "x.pt"})}))
    assert (warm.train.epochs, warm.train.lr) == (7, 0.001)
    assert warm_stage_iterations(600, 2, 41) == (8, 38)  # 8 x 38 = 304 >= 300, epochs ~ natural
    assert warm_stage_iterations(5, 1, 41) == (1, 5)


@pytest.mark.parametrize("override,named", [("model.channels=32", "channels 32"),
                                            ("data.synthetic.num_classes=4", "4 classes")])
def test_a_checkpoint_of_another_model_is_refused_naming_both(base, tmp_path, capsys,
                                                              override, named):
    assert run(tmp_path / "bad", "method.name=fixmatch", f"model.init={base}", override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init" in err[0] and named in err[0] and "channels 64" in err[0]
    assert not (tmp_path / "bad" / "online").exists()


def test_stpp_without_snapshots_says_what_is_missing(base, tmp_path, capsys):
    lone = tmp_path / "lone" / "checkpoint.pt"
    lone.parent.mkdir()
    lone.write_bytes(base.read_bytes())
    assert run(tmp_path / "bad", "method.name=stpp", f"model.init={lone}") == 2
    err = capsys.readouterr().err
    assert "snapshot_*.pt" in err and "method.selection=cisc" in err
    assert run(tmp_path / "ok", "method.name=ciscr_bank", f"model.init={lone}",
               "train.warm_epochs=1") == 0  # CISC-R's selection needs no snapshots


def test_missing_init_file_is_one_line(tmp_path, capsys):
    assert run(tmp_path / "r", "method.name=unimatch", f"model.init={tmp_path / 'no.pt'}") == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_resume_refuses_another_file_at_the_init_path(base, tmp_path, capsys):
    init = tmp_path / "init.pt"
    init.write_bytes(base.read_bytes())
    out = tmp_path / "sup"
    assert run(out, "method.name=suponly", f"model.init={init}", "train.warm_epochs=1") == 0
    sd = weights(init)
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({**torch.load(init, weights_only=True), "model": sd}, init)
    assert run(out, "method.name=suponly", f"model.init={init}", "train.warm_epochs=1") == 2
    assert "model.init_sha256" in capsys.readouterr().err


def test_killed_warm_run_resumes_to_the_uninterrupted_result(base, tmp_path):
    args = ["method.name=fixmatch", f"model.init={base}", "train.ckpt_every=1"]
    assert run(tmp_path / "ref", *args) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ciscr", "run", "synthetic", "--out", str(out), *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = out / "online" / "checkpoint.pt", time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and load_checkpoint(ckpt)["iteration"] >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "results.json").exists(), "the run ended before it could be killed"
    assert run(out, *args) == 0
    assert same(weights(out / "online" / "checkpoint.pt"),
                weights(tmp_path / "ref" / "online" / "checkpoint.pt"))


def test_a_result_below_its_start_warns_with_what_the_run_shows(tmp_path):
    for stage, miou in (("stage1", 0.6), ("stage3", 0.4)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.json").write_text(json.dumps({"miou": miou}))
    (tmp_path / "pseudo0").mkdir()
    (tmp_path / "pseudo0" / "quality.json").write_text(json.dumps({"miou": 0.3}))
    cfg = load_config("synthetic", ["method.name=ciscr", "method.init=fresh"])
    out = start_comparison(tmp_path, cfg, "stage3", 0.4)
    assert out["gain_over_start"] == pytest.approx(-0.2)
    assert "below its own supervised start (stage1: 60.00)" in out["warning"]
    assert "30.0 mIoU" in out["warning"] and "method.init=fresh" in out["warning"]
    assert "warning" not in start_comparison(tmp_path, cfg, "stage3", 0.7)
    assert start_comparison(tmp_path, cfg, "stage1", 0.6) == {}  # SupOnly: no start of its own
