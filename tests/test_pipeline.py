"""The stage-wise pipeline: every method switch runs, stages are skipped and resumed, and the
query / pair rules hold on real (tiny) runs."""

import json

import numpy as np
import pytest
import torch

from ciscr.config import load_config
from ciscr.data.pairs import class_presence, pick_partner
from ciscr.errors import ConfigError
from ciscr.runner import run_training

TINY = [
    "data.synthetic.num_train=16", "data.synthetic.num_val=3", "data.synthetic.size=32",
    "data.labeled=6", "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=2", "train.batch_size=4",
    "train.crop_size=32", "train.progress=false", "method.tta_scales=[1.0]",
    "method.tta_flip=false", "model.channels=16", "method.score_final_pseudo=false",
    "method.min_class_ratio=0.0",
    # The smallest backbone and no report.html: a tiny run's time and disk go to what is tested.
    "model.backbone=mobilenet_v2", "report=false",
]


def tiny_run(tmp_path, *overrides, name="run"):
    cfg = load_config("synthetic", TINY + list(overrides))
    return run_training(cfg, tmp_path / name), tmp_path / name


def read(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "overrides, stages",
    [
        (["method.name=suponly"], ["stage1"]),
        (["method.name=suponly_cisc"], ["stage1"]),
        (["method.name=suponly_cisc", "method.pair_partner=random"], ["stage1"]),
        (["method.name=st"], ["stage1", "pseudo0", "stage2"]),
        (["method.name=stpp", "method.stpp_snapshots=1"],
         ["stage1", "pseudo0", "selection", "stage2", "pseudo1", "stage3"]),
        (["method.name=ciscr_bank"], ["stage1", "pseudo0", "selection", "stage2", "stage3"]),
        (["method.name=ciscr", "method.rectify=anchor"], ["stage3"]),
        (["method.name=ciscr", "method.query_selection=rs", "method.selection=random"], ["stage3"]),
        (["method.name=ciscr", "method.query_selection=as"], ["stage3"]),
        (["method.name=ciscr", "method.num_prototypes=2"], ["stage3"]),
        # Two independent switches in one run (each alone costs a run and adds no code path).
        (["method.name=ciscr", "method.distance=balanced", "method.crop_selection=16"],
         ["stage3"]),
        (["method.name=ciscr", "method.retrain=one"], ["stage2"]),
        (["method.name=ciscr", "method.selection=stpp", "method.stpp_snapshots=1"], ["stage3"]),
        (["method.name=ciscr_bank", "method.rectify_classes=one", "method.bank_views=2"],
         ["stage3"]),
    ],
    # readable test ids: "name=ciscr distance=balanced" rather than "overrides14-stages14"
    ids=lambda v: " ".join(o.removeprefix("method.") for o in v) if "=" in v[0] else "",
)
def test_every_switch_runs(tmp_path, overrides, stages):
    results, rd = tiny_run(tmp_path, *overrides)
    for s in stages:
        assert (rd / s / "done.json").exists(), s
    final = results["final_stage"]
    assert (rd / final / "checkpoint.pt").exists()
    assert 0.0 <= results["final_metrics"]["miou"] <= 1.0
    assert read(rd / "results.json")["final_stage"] == final


def test_imagenet_cisc_features_need_and_use_a_weight_file(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        tiny_run(tmp_path, "method.name=ciscr", "method.cisc_features=imagenet", name="a")
    from ciscr.models import build_backbone

    weights = tmp_path / "mnv2.pth"
    torch.save(build_backbone("mobilenet_v2", 16).state_dict(), weights)
    results, rd = tiny_run(tmp_path, "method.name=ciscr", "method.cisc_features=imagenet",
                           f"model.pretrained={weights}", name="b")
    assert (rd / "stage3" / "done.json").exists()


def test_invalid_switch_combinations_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="rectify_classes=all"):
        tiny_run(tmp_path, "method.name=ciscr", "method.rectify_classes=all")


def test_queries_only_from_labeled_split_and_halves(tmp_path):
    """Plain CISC-R end to end (its every stage, as test_every_switch_runs checks the other
    switches), then what its selection chose."""
    results, rd = tiny_run(tmp_path, "method.name=ciscr")
    for s in ("stage1", "pseudo0", "selection", "stage2", "pseudo1", "stage3"):
        assert (rd / s / "done.json").exists(), s
    assert results["final_stage"] == "stage3" and (rd / "stage3" / "checkpoint.pt").exists()
    assert 0.0 <= results["final_metrics"]["miou"] <= 1.0
    # Every stage the run did is in its summary, and its CPU total is theirs (selection and
    # pseudo1 were once left out of both).
    done = {p.parent.name: read(p) for p in rd.glob("*/done.json")}
    assert set(results["stages"]) == set(done)
    assert results["cpu_seconds"] == pytest.approx(sum(d["cpu_seconds"] for d in done.values()),
                                                   abs=0.2)
    labeled = set()
    cfg = load_config(rd / "config.yaml")
    from ciscr.data.formats import load_dataset

    _, lab, unl, _ = load_dataset(cfg.data, cfg.seed)
    labeled = {s.id for s in lab}
    unlabeled = {s.id for s in unl}
    assert labeled.isdisjoint(unlabeled)
    queries = read(rd / "selection" / "queries.json")
    queried = {e["id"] for entries in queries.values() for e in entries}
    assert queried <= labeled and not queried & unlabeled
    split = read(rd / "selection" / "unlabeled_split.json")
    rel = [e["id"] for e in split["reliable"]]
    unrel = [e["id"] for e in split["unreliable"]]
    assert set(rel) | set(unrel) == unlabeled and not set(rel) & set(unrel)
    assert len(rel) == (len(unlabeled) + 1) // 2
    assert len(list((rd / "pseudo0" / "labels").glob("*.png"))) == len(unlabeled)
    assert len(list((rd / "pseudo1" / "labels").glob("*.png"))) == len(unrel)


def test_finished_stages_are_skipped_and_a_changed_config_refused(tmp_path):
    _, rd = tiny_run(tmp_path, "method.name=st")
    stamp = {p: p.stat().st_mtime_ns for p in rd.rglob("checkpoint.pt")}
    results, _ = tiny_run(tmp_path, "method.name=st")  # rerun: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in rd.rglob("checkpoint.pt")} == stamp
    assert results["final_stage"] == "stage2"
    with pytest.raises(ConfigError, match="different config"):
        tiny_run(tmp_path, "method.name=st", "train.lr=0.5")


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path):
    # A finished uninterrupted run vs. one whose stage-2 was "killed" after its checkpoint:
    # deleting done.json + metrics makes stage 2 resume (at its last iteration) and finish
    # with the same model.
    _, rd = tiny_run(tmp_path, "method.name=st", "train.iters_per_epoch=3", "train.ckpt_every=2")
    ref = torch.load(rd / "stage2" / "checkpoint.pt", weights_only=True)["model"]
    for f in ("done.json", "metrics.json"):
        (rd / "stage2" / f).unlink()
    (rd / "results.json").unlink()
    tiny_run(tmp_path, "method.name=st", "train.iters_per_epoch=3", "train.ckpt_every=2")
    again = torch.load(rd / "stage2" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(ref[k], again[k]) for k in ref)


def test_pair_partner_shares_a_class_and_is_never_self():
    masks = [np.array([[0, 1]]), np.array([[0, 1, 2]]), np.array([[0, 2]]), np.array([[0, 3]])]
    present = class_presence(masks, 4)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        for i in range(4):
            j, k = pick_partner(i, present, background=0, g=g)
            assert j != i
            if i == 3:  # class 3 is only in image 3: no partner shares a class
                assert k == -1
            else:
                assert k != 0 and present[i, k] and present[j, k]
