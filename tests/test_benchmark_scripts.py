"""The pure helpers of benchmarks/ (the CamVid comparison's scheduling and its diagnostic)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import camvid  # noqa: E402
import camvid_diagnostics as diag  # noqa: E402
import camvid_figures as figs  # noqa: E402


def test_stage1_cells_come_from_main_runs_where_they_exist_else_from_checks():
    main = [0, 1, 2]
    assert camvid.stage1_source("suponly", 1, main) == "st"  # SupOnly = stage 1 of ST
    assert camvid.stage1_source("suponly", 4, main) == "stage1_suponly"
    assert camvid.stage1_source("paper", 0, main) == "ciscr"
    assert camvid.stage1_source("paper", 5, main) == "stage1_paper"
    assert camvid.stage1_source("random_pairs", 0, main) == "stage1_random_pairs"
    assert camvid.stage1_source("double_ce", 2, main) == "stage1_double_ce"
    assert camvid.stage1_source("double_ce", 3, main) is None  # shared-view rows: main seeds only
    for row in camvid.STAGE1_ROWS:  # every cell is a run the benchmark knows how to make
        for seed in range(6):
            src = camvid.stage1_source(row, seed, main)
            assert src is None or src in camvid.CHECKS or src in camvid.METHODS


def test_chains_keep_shared_runs_after_their_source_and_go_seed_by_seed():
    plan = [(m, f, s) for f, seeds in (("0.125", (0, 1)), ("0.25", (0,)))
            for s in seeds for m in camvid.METHODS]  # fmt: skip
    chains = camvid.chains(plan)
    flat = [r for c in chains for r in c]
    assert len(flat) == len(set(flat)) == 15  # suponly is the st run: 5 runs x 3 (f, s)
    assert ("suponly", "0.125", 0) not in flat
    for c in chains:
        if any(m == "ciscr_bank" for m, _, _ in c):
            assert [m for m, _, _ in c] == ["ciscr", "ciscr_bank"] and len({r[1:] for r in c}) == 1
        if any(m == "ciscr_bank_sup1" for m, _, _ in c):  # after the ST run it copies from
            assert [m for m, _, _ in c] == ["st", "ciscr_bank_sup1"] and len({r[1:] for r in c}) == 1
    seeds = [c[0][2] for c in chains]
    assert seeds == sorted(seeds)  # every method of seed 0 before any of seed 1
    assert chains[0][0][0] == "ciscr"  # the longest chain of a seed first


def test_auroc_from_histograms_by_hand():
    # positives in bins 2, 3; negatives in bins 0, 2: pairs (2>0) (2=2: 1/2) (3>0) (3>2) -> 3.5/4
    pos, neg = np.array([0, 0, 1, 1]), np.array([1, 0, 1, 0])
    assert diag.auroc_from_hist(pos, neg) == pytest.approx(3.5 / 4)
    assert diag.auroc_from_hist(neg, pos) == pytest.approx(0.5 / 4)
    assert diag.auroc_from_hist(pos, pos) == pytest.approx(0.5)
    assert np.isnan(diag.auroc_from_hist(pos, np.zeros(4)))


def test_tally_separates_a_perfect_signal():
    t = diag.Tally()
    score = torch.tensor([0.9, 0.8, 0.1, 0.2])
    t.add(score, torch.tensor([True, True, False, False]))
    s = t.summary()
    assert s["auroc"] == pytest.approx(1.0)
    assert s["pixels_correct"] == 2 and s["pixels_wrong"] == 2
    assert s["mean_correct"] == pytest.approx(0.85, abs=0.01)


def test_own_class_map_uses_each_pixels_class():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # left e0, right e1
    y = torch.tensor([[0, 1]])
    protos = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([1.0, 0.0])}
    w = diag.own_class_map(feats, y, protos)
    assert w[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-3)  # left matches, right orthogonal


def test_figure_helpers():
    assert figs.spread(list(range(10)), 3) == [0, 4, 9]  # round(4.5) == 4
    assert figs.spread([1, 2], 5) == [1, 2]
    lab = np.array([[0, 0, 0, 0, 1, 1, 2, 255]] * 4, np.uint8)  # class 2: 1/7 of valid pixels
    assert figs.smallest_class(lab, 3, 0.1) == 2
    assert figs.smallest_class(lab, 3, 0.2) == 1
    assert figs.smallest_class(np.full((2, 2), 255, np.uint8), 3, 0.0) == -1


def test_half_quality_pools_the_confusion_of_each_half():
    # 2 classes; images a, b perfect, c, d all wrong.
    right = torch.tensor([[5, 0], [0, 5]])
    wrong = torch.tensor([[0, 5], [5, 0]])
    conf = {"a": right, "b": right, "c": wrong, "d": wrong}
    q = diag.half_quality((["a", "c"], ["b", "d"]), conf, 2)
    # each half pools one right and one wrong image: per class 5 / (10 + 10 - 5) = 1/3
    assert q["reliable"] == pytest.approx(1 / 3) and q["unreliable"] == pytest.approx(1 / 3)
    q = diag.half_quality((["a", "b"], ["c", "d"]), conf, 2)
    assert q == {"reliable": pytest.approx(1.0), "unreliable": pytest.approx(0.0)}


def test_paired_difference_uses_seeds_both_rows_have():
    xs, ref = [0.30, 0.32, None, 0.28], [0.31, 0.30, 0.35, 0.29]
    # differences in points: -1, +2, (skipped), -1 -> mean 0, sd sqrt(3), se 1
    assert camvid.paired_difference(xs, ref) == "+0.00 ± 1.00 (n=3)"
    assert camvid.paired_difference([0.3, None], [0.3, 0.2]) == "n/a"
