"""Two-process DDP on CPU (gloo), launched exactly as a user would with torchrun (issue 5, §1).

Pseudo-labelling and selection are sharded over the ranks and merged: given the SAME stage-1
model (copied in, so stage 1 is skipped), a 2-process run writes byte-identical pseudo labels
and selection files to a 1-process run. The DDP training stages must then run to the end, with
rank 0 alone writing and logging.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ciscr.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# batch_size=4: 2 images per rank (BatchNorm needs >= 2); 3 iterations per stage.
ARGS = [
    "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=3", "train.batch_size=4", "train.crop_size=32",
    "train.lr=0.05", "train.ckpt_every=2", "train.log_every=1", "train.progress=false",
    "data.synthetic.num_train=24", "data.synthetic.num_val=5", "data.synthetic.size=32",
    "data.labeled=7", "model.backbone=mobilenet_v2", "method.tta_scales=[1.0]", "device=cpu",
    "report=false",
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def ciscr_run(out: Path, data: Path) -> list[str]:
    return ["-m", "ciscr", "run", "synthetic", "--out", str(out), *ARGS, f"data.root={data}"]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1-process run, stopped (SIGKILL) once its selection is written: (run dir, data root)."""
    data = tmp_path_factory.mktemp("synthetic")
    out = tmp_path_factory.mktemp("single") / "run"
    cmd = [sys.executable, *ciscr_run(out, data)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while proc.poll() is None and not (out / "selection" / "done.json").is_file():
        assert time.monotonic() < deadline, "the 1-process run is too slow"
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)  # stages 2 and 3 are not needed here
    proc.wait()
    assert (out / "selection" / "done.json").is_file(), proc.stderr.read()[-3000:]
    return out, data


@pytest.fixture(scope="module")
def ddp(single: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """The 2-process run, starting from a copy of the 1-process stage 1."""
    src, data = single
    out = tmp_path_factory.mktemp("ddp") / "run"
    out.mkdir()
    shutil.copytree(src / "stage1", out / "stage1")
    res = subprocess.run([*TORCHRUN, *ciscr_run(out, data)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out, res


def _files(run: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(run)): _content(p) for p in sorted(run.glob(pattern))}


def _content(p: Path) -> bytes:
    """The file's bytes; done.json without its timings (*_seconds differ by nature)."""
    if p.name != "done.json":
        return p.read_bytes()
    done = {k: v for k, v in json.loads(p.read_text()).items() if not k.endswith("_seconds")}
    return json.dumps(done, sort_keys=True).encode()


def test_sharded_pseudo_labels_and_selection_equal_single_process(single, ddp) -> None:
    one, two = single[0], ddp[0]
    for pattern in ("pseudo0/labels/*.png", "pseudo0/quality.json", "selection/*.json"):
        a, b = _files(one, pattern), _files(two, pattern)
        assert a, pattern
        assert a.keys() == b.keys(), pattern
        for name in a:
            assert a[name] == b[name], f"{name}: 2-process output differs from 1-process"
    # 17 unlabeled images: uneven shards (9 + 8), so the merge order matters.
    assert len(_files(two, "pseudo0/labels/*.png")) == 17
    split = json.loads((two / "selection" / "unlabeled_split.json").read_text())
    assert len(split["reliable"]) == 9 and len(split["unreliable"]) == 8


def test_ddp_training_stages_complete_and_rank0_alone_writes(ddp) -> None:
    run, res = ddp
    results = json.loads((run / "results.json").read_text())
    assert results["final_stage"] == "stage3"
    assert set(results["stages"]) >= {"stage1", "pseudo0", "stage2", "stage3"}
    assert (run / "pseudo1" / "done.json").is_file()
    for stage in ("stage2", "stage3"):
        ckpt = load_checkpoint(run / stage / "checkpoint.pt")
        assert ckpt["iteration"] == 3
        # Every rank's RNG state is kept, so a resumed run continues each rank's own stream.
        assert len(ckpt["rng_ranks"]) == 2
        assert not any(k.startswith("module.") for k in ckpt["model"])  # DDP unwrapped
        iters = [json.loads(line)["iteration"] for line in
                 (run / stage / "train.jsonl").read_text().splitlines()]  # fmt: skip
        assert iters == [1, 2, 3]  # one writer: no duplicated records
    log = res.stdout + res.stderr
    # Rank 0 alone logs: each stage summary appears once, and the final table once.
    assert log.count("stage2: val mIoU") == 1
    assert log.count("run directory:") == 1
    assert "Traceback" not in log


def test_ddp_validation_equals_single_process_evaluation(single, ddp, tmp_path: Path) -> None:
    # Val has 5 images: shards of 3 + 2 with no padding duplicates, confusion matrix summed.
    import numpy as np
    from PIL import Image

    from ciscr.runner import evaluate_checkpoint

    run = ddp[0]
    masks = sorted(single[1].glob("*/masks/val/*.png"))
    assert len(masks) == 5
    valid = sum(int((np.asarray(Image.open(m)) != 255).sum()) for m in masks)
    metrics = evaluate_checkpoint(run / "stage3" / "checkpoint.pt", [], tmp_path / "eval.json")
    saved = json.loads((run / "stage3" / "metrics.json").read_text())
    assert metrics["miou"] == saved["miou"]
    assert metrics["iou"] == saved["iou"]
    assert metrics["num_pixels"] == saved["num_pixels"] == valid  # each pixel counted once


def test_bad_file_seen_by_one_rank_stops_every_rank(single, tmp_path: Path) -> None:
    # The data check is sharded: only rank 1 reads this image, yet both ranks must stop with
    # the same error (a rank left waiting in a collective would hang the job); rank 0 alone
    # prints it, so the user sees one line.
    src = next(single[1].glob("synthetic-*"))
    data = Path(shutil.copytree(src, tmp_path / "data"))
    # Checked in order labeled (7), unlabeled (17), val: val_00001 is item 25, rank 1's share.
    bad = data / "images" / "val" / "val_00001.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = ["-m", "ciscr", "run", "synthetic", "--out", str(out), *ARGS, "data.format=folder",
            f"data.root={data}"]  # fmt: skip
    res = subprocess.run([*TORCHRUN, *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode != 0
    assert errors == [f"error: {bad}: cannot read image (not a recognised image format)"]
    assert not out.exists()


def test_bf16_autocast_and_channels_last_train_on_cpu(single, tmp_path: Path) -> None:
    from ciscr.cli import main

    out = tmp_path / "run"
    argv = ["train", "synthetic", "--out", str(out), *ARGS, f"data.root={single[1]}",
            "train.amp=bf16", "train.channels_last=true"]  # fmt: skip
    assert main(argv) == 0
    ckpt = load_checkpoint(out / "stage1" / "checkpoint.pt")
    assert ckpt["iteration"] == 3
    # autocast computes in bf16 but the weights (and so the checkpoint) stay float32.
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("method", ["unimatch_cisc"])
def test_online_method_trains_under_two_process_ddp(single, tmp_path: Path, method: str) -> None:
    """UniMatch + CISC (two strong views, FP, the prototype bank computed on rank shards and
    gathered, the all-reduced prototype memory) under torchrun:
    runs to the end, every rank agrees (one checkpoint, rank 0 writes), and the CutMix partners
    come from streams keyed on the seed alone."""
    _, data = single
    out = tmp_path / "run"
    res = subprocess.run([*TORCHRUN, *ciscr_run(out, data), f"method.name={method}",
                          "method.score_final_pseudo=false"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    ckpt = load_checkpoint(out / "online" / "checkpoint.pt")
    assert ckpt["iteration"] == 3 and len(ckpt["rng_ranks"]) == 2
    assert ckpt["step_state"]["memory"]["known"].any()
    assert ckpt["step_state"]["bank"]["known"].any()  # the gathered bank: both ranks' images
    recs = [json.loads(x) for x in (out / "online" / "train.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs if "loss" in r] == [1, 2, 3]
