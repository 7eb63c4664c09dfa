"""Crash and resume (issue 5, section 2).

A tiny CISC-R run is SIGKILLed at several points (while a checkpoint is being written, between
checkpoints, while pseudo-labelling, during selection, in stage 2), the same command is rerun
each time, and the finished run must equal an uninterrupted one: metrics, pseudo-label PNGs,
selection files, training logs and every stage's model tensors. A tampered checkpoint and a
NaN loss stop with one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciscr.cli import main
from ciscr.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# 6 iterations per stage over 2 epochs, a checkpoint every 2: kills between checkpoints make
# the rerun redo iterations, and the epoch-end evaluation is exercised too. lr 0.02: at 0.05
# these 6 steps mostly end predicting one class everywhere (seeds 0-2), which would leave the
# pseudo labels compared below trivial (test_reference_run_is_nontrivial).
ARGS = [
    "train.epochs=2", "train.unlabeled_epochs=0", "train.iters_per_epoch=3", "train.batch_size=4", "train.crop_size=32",
    "train.lr=0.02", "train.ckpt_every=2", "train.log_every=1", "train.eval_every_epochs=1",
    "train.progress=false", "data.synthetic.num_train=24", "data.synthetic.num_val=4",
    "data.synthetic.size=32", "data.labeled=8", "model.backbone=mobilenet_v2", "report=false",
    "method.tta_scales=[1.0]", "device=cpu",
    # The paper's recipe on the harder 4-class scenes (the demo config trains otherwise).
    "data.synthetic.num_classes=4", "data.synthetic.max_distractors=3",
    "method.stage1_cisc_loss=true", "method.init=fresh", "method.confidence_threshold=0",
]  # fmt: skip
STAGES = ("stage1", "stage2", "stage3")


def run_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ciscr", "run", "synthetic", "--out", str(out), *ARGS,
            f"data.root={data}", *extra]  # fmt: skip


def done(stage: Path) -> bool:
    return (stage / "done.json").is_file()


def logged(stage: Path) -> int:
    """Highest iteration in a stage's train.jsonl (0 if none)."""
    path = stage / "train.jsonl"
    if not path.is_file():
        return 0
    its = []
    for line in path.read_text().splitlines():
        try:
            its.append(json.loads(line)["iteration"])
        except (ValueError, KeyError):
            continue
    return max(its, default=0)


def kill_when(cmd: list[str], when: Callable[[], bool], timeout: float = 240) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``when()`` holds (it must not finish first)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            if time.monotonic() > deadline:
                pytest.fail("the run neither reached the kill point nor finished in time")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pytest.fail(f"the run ended (status {proc.returncode}) before the kill point: "
                f"{proc.stderr.read()[-2000:]}")  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """An uninterrupted run (also generates the synthetic data)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = subprocess.run(run_cmd(out, data_root), cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _without_paths(obj: object) -> object:
    """done.json / results.json name their own run directory and time: drop those entries."""
    if isinstance(obj, dict):
        drop = ("checkpoint", "run_dir")  # paths and timings (*_seconds) differ by nature
        return {k: _without_paths(v) for k, v in obj.items()
                if k not in drop and not k.endswith("_seconds")}
    return obj


def _files(run: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(run)): _content(p) for p in sorted(run.glob(pattern))}


def _content(p: Path) -> bytes:
    """The file's bytes; done.json and train.jsonl without their timings (*_seconds)."""
    if p.name == "train.jsonl":
        return json.dumps(log_records(p), sort_keys=True).encode()
    if p.name != "done.json":
        return p.read_bytes()
    return json.dumps(_without_paths(json.loads(p.read_text())), sort_keys=True).encode()


def log_records(path: Path) -> list[object]:
    """A train.jsonl's records without ``step_seconds`` (wall time, which differs by nature)."""
    return [_without_paths(json.loads(line)) for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Every artefact of run ``b`` equals run ``a``'s (byte for byte where it is a file)."""
    ra, rb = (
        json.loads((a / "results.json").read_text()),
        json.loads((b / "results.json").read_text()),
    )
    assert _without_paths(ra) == _without_paths(rb)
    for pattern in ("pseudo*/labels/*.png", "pseudo*/quality.json", "selection/*.json",
                    "stage*/metrics.json", "stage*/train.jsonl", "data_check.json"):  # fmt: skip
        fa, fb = _files(a, pattern), _files(b, pattern)
        assert fa.keys() == fb.keys(), pattern
        assert fa, pattern
        for name in fa:
            assert fa[name] == fb[name], f"{name} differs"
    for stage in STAGES:
        ma = load_checkpoint(a / stage / "checkpoint.pt")["model"]
        mb = load_checkpoint(b / stage / "checkpoint.pt")["model"]
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), f"{stage}: {k} differs"
        assert (
            json.loads((a / stage / "done.json").read_text())["val_miou"]
            == json.loads((b / stage / "done.json").read_text())["val_miou"]
        )


def test_reference_run_is_nontrivial(reference: Path) -> None:
    # Guards the comparisons below against comparing empty or degenerate artefacts.
    pngs = list((reference / "pseudo0" / "labels").glob("*.png"))
    assert len(pngs) == 16  # 24 pool images, 8 labeled
    labels = [set(np.unique(np.asarray(Image.open(p))).tolist()) for p in pngs]
    assert any(len(found) > 1 for found in labels)  # not a constant prediction
    sel = json.loads((reference / "selection" / "unlabeled_split.json").read_text())
    assert len(sel["reliable"]) == 8 and len(sel["unreliable"]) == 8
    scores = [e["score"] for e in sel["reliable"] + sel["unreliable"]]
    assert len(set(scores)) == 16  # real, distinct CISC scores
    assert logged(reference / "stage2") == 6


def test_sigkilled_run_resumes_to_identical_artefacts(
    reference: Path, data_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cmd = run_cmd(run, data_root)
    s1, s2 = run / "stage1", run / "stage2"
    # Selection takes a while: kill it halfway through, as measured on the reference run.
    sel_time = (reference / "selection" / "done.json").stat().st_mtime - (
        reference / "pseudo0" / "done.json"
    ).stat().st_mtime
    t_sel: list[float] = []

    def mid_selection() -> bool:
        if not done(run / "pseudo0"):
            return False
        t_sel.append(time.monotonic())
        return time.monotonic() - t_sel[0] >= sel_time / 2 or done(run / "selection")

    kill_points = [
        lambda: any(s1.glob(".checkpoint.pt.*.tmp")) or done(s1),  # writing a checkpoint
        lambda: logged(s1) >= 3 or done(s1),  # between checkpoints (redoes iteration 3)
        lambda: (run / "pseudo0" / ".labels.tmp").is_dir() or done(run / "pseudo0"),
        mid_selection,
        lambda: logged(s2) >= 5 or done(s2),  # stage 2, after its checkpoint at 4
    ]
    for when in kill_points:
        kill_when(cmd, when)
    assert not done(s2), "the kills did not happen before stage 2 finished"
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(reference, run)
    # Nothing half-written survives: killed writes left temp files, the rerun removed them.
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_truncated_checkpoint_is_a_clear_error(
    reference: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run whose stage 1 was interrupted after a checkpoint, which was then cut short by
    # something outside ciscr (ciscr itself never leaves a truncated file: atomic rename).
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((reference / "config.yaml").read_bytes())
    (run / "stage1").mkdir()
    ckpt = run / "stage1" / "checkpoint.pt"
    whole = (reference / "stage1" / "checkpoint.pt").read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2])
    rc = main(["run", "synthetic", "--out", str(run), *ARGS, f"data.root={data_root}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"error: {ckpt}: checkpoint is corrupt or truncated")
    assert "Traceback" not in "\n".join(err)
    assert ckpt.stat().st_size == len(whole) // 2  # left alone for the user to inspect
    assert not (run / "stage1" / "done.json").exists()


def test_nan_loss_stops_with_stage_and_iteration_and_keeps_last_checkpoint(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr=1e30: the first step is finite, its update blows the weights up, iteration 2 is NaN.
    out = tmp_path / "run"
    args = [*ARGS, f"data.root={data_root}", "train.lr=1e30", "train.ckpt_every=1"]
    rc = main(["train", "synthetic", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = out / "stage1" / "checkpoint.pt"
    assert rc == 2
    assert err[-1] == (
        f"error: stage1: loss became nan at iteration 2; the last good checkpoint is kept at "
        f"{ckpt}; check the data or lower train.lr (with a new --out directory)"
    )
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 1  # the checkpoint of the last finite step, still loadable
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "stage1" / "done.json").exists()


# UniMatch's own resume is covered by unimatch_cisc: the same UniMatch step, plus the CISC
# state (prototype memory and bank) whose resume this test checks too.
@pytest.mark.parametrize("method", ["fixmatch", "unimatch_cisc"])
def test_online_method_sigkilled_between_checkpoints_resumes_identically(
    method: str, data_root: Path, tmp_path: Path
) -> None:
    """2-iteration checkpoints of a 6-iteration online run: kill after iteration 3, rerun; the
    model (and, for + CISC, the prototype memory in the checkpoint) must end as uninterrupted."""
    # + CISC: the bank is recomputed at iterations 0 and 4, around the kill and the resume.
    extra = [f"method.name={method}", "method.score_final_pseudo=false",
             "method.confidence_threshold=0.5", "method.prototype_refresh=4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    # The uninterrupted reference trains beside the killed run (1 thread each, 2 cores in CI):
    # the runs share nothing but the data folder, which they only read.
    # Its output goes to a file: a pipe nobody reads until the end could fill and stall it.
    with open(tmp_path / "ref.log", "w") as ref_log, subprocess.Popen(
            run_cmd(ref, data_root, *extra), cwd=REPO, env=ENV, stdout=ref_log,
            stderr=subprocess.STDOUT) as ref_proc:  # fmt: skip
        try:
            kill_when(run_cmd(run, data_root, *extra), lambda: logged(run / "online") >= 3)
            res = subprocess.run(run_cmd(run, data_root, *extra), cwd=REPO, env=ENV,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            ref_proc.wait(timeout=300)
        finally:  # a failure above must not leave the reference training behind the test
            if ref_proc.poll() is None:
                ref_proc.kill()
    assert res.returncode == 0, res.stderr[-3000:]
    assert ref_proc.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert logged(ref / "online") == 6
    a, b = load_checkpoint(ref / "online" / "checkpoint.pt"), load_checkpoint(
        run / "online" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if method == "unimatch_cisc":
        assert torch.equal(a["step_state"]["memory"]["protos"], b["step_state"]["memory"]["protos"])
        assert torch.equal(a["step_state"]["bank"]["protos"], b["step_state"]["bank"]["protos"])
    assert log_records(ref / "online" / "train.jsonl") == log_records(run / "online" / "train.jsonl")
