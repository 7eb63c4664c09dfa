"""The interleaved pass of ``ciscr profile``: the stages of a finished run planned again are
the stages the run trained, and their steps are timed in turn, round after round."""

import json

import pytest
import torch

from ciscr.config import load_config
from ciscr.engine.train import iters_per_epoch
from ciscr.run_setup import setup_run
from ciscr.runner import run_training
from ciscr.timing.steptime import finished_plans, paired_ratio, time_steps

SMALL = [
    "data.synthetic.num_train=20", "data.synthetic.num_val=2", "data.synthetic.size=32",
    "data.labeled=4", "train.epochs=2", "train.unlabeled_epochs=1", "train.batch_size=4",
    "train.crop_size=32", "train.progress=false", "method.tta_scales=[1.0]",
    "method.tta_flip=false", "model.channels=16", "method.score_final_pseudo=false",
    "model.backbone=mobilenet_v2", "report=false", "method.name=ciscr",
    "method.stage1_cisc_loss=true",
]  # fmt: skip


def test_finished_plans_are_the_stages_the_run_trained(tmp_path):
    cfg = load_config("synthetic", SMALL)
    run_training(cfg, tmp_path / "run")
    ctx = setup_run(cfg, tmp_path / "run", torch.device("cpu"))
    plans = finished_plans(ctx)
    assert list(plans) == ["stage1", "stage2", "stage3"]
    for name, plan in plans.items():
        trained = torch.load(tmp_path / "run" / name / "checkpoint.pt", weights_only=True)
        planned = iters_per_epoch(plan.streams[plan.epoch_stream], plan.cfg) * plan.cfg.epochs
        assert planned == trained["total_iters"], name
    assert "pairs" in plans["stage1"].streams  # the paper's stage 1: L_CISC on pairs
    sel = json.loads((tmp_path / "run" / "selection" / "unlabeled_split.json").read_text())
    assert len(plans["stage2"].streams["unlabeled"].dataset) == len(sel["reliable"]) == 8
    assert len(plans["stage3"].streams["unlabeled"].dataset) == 16  # both halves


class _Fake:
    def __init__(self, seconds):
        self.seconds, self.calls = list(seconds), []

    def steps(self, n):
        self.calls.append(n)
        return self.seconds.pop(0)


def test_time_steps_runs_blocks_in_turn_and_drops_the_warmup():
    a, b = _Fake([9.0, 1.0, 2.0]), _Fake([9.0, 3.0, 4.0])
    times = time_steps({"a": a, "b": b}, rounds=2, block=5, warmup=1)
    assert times == {"a": [1.0, 2.0], "b": [3.0, 4.0]}
    assert a.calls == b.calls == [5, 5, 5]


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    assert paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 2.0]) == pytest.approx(2.0)
    # a round where the machine slowed down hits both stages: the ratio does not move
    assert paired_ratio([1.1, 2.2], [1.0, 2.0]) == pytest.approx(1.1)
    assert paired_ratio([], []) is None
