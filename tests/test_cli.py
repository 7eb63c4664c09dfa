"""The command line: train / eval / info / demo table, and argument handling."""

import json

import pytest

from ciscr.cli import main
from ciscr.demo import demo_table

# (stage-1 epochs, unlabeled epochs, forced iterations per epoch (0: derived), batch, crop):
# 180 stage-1 iterations; stages 2 / 3 of CISC-R: 8 passes over 95 / 190 images = 96 / 192.
DEMO_BUDGET = (30, 4, 0, 8, 64)

TINY = [
    "data.synthetic.num_train=12", "data.synthetic.num_val=3", "data.synthetic.size=32",
    "data.labeled=4", "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=2", "train.batch_size=4",
    "train.crop_size=32", "train.progress=false", "model.channels=16",
    "model.backbone=mobilenet_v2", "report=false",
]


def test_train_then_eval_reproduces_the_stage_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["stage1"]  # SupOnly only
    assert "method: suponly" in capsys.readouterr().out
    assert not (out / "report.html").exists()  # report=false
    ckpt = out / "stage1" / "checkpoint.pt"
    assert main(["eval", str(ckpt)]) == 0
    written = json.loads((out / "stage1" / "checkpoint_eval_whole.json").read_text())
    stage = json.loads((out / "stage1" / "metrics.json").read_text())
    assert written["miou"] == pytest.approx(stage["miou"])
    assert written["iteration"] == 2
    assert "mIoU" in capsys.readouterr().out


def test_eval_overrides_and_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1


def test_info_reports_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("ciscr", "torch", "cpu threads", "cuda", "bf16 autocast (cpu)", "distributed"):
        assert key in out


def test_stray_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "synthetic", "--out", "x", "--frobnicate"])
    assert err.value.code == 2


def test_overrides_may_follow_options(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "synthetic", *TINY[:4], "--out", str(out), *TINY[4:]]) == 0
    assert (out / "stage1" / "done.json").exists()


def test_demo_table_shows_gains_per_class_ious_and_learned_classes():
    def res(miou, iou):
        return {"final_metrics": {"miou": miou, "iou": iou}}

    rows = [("SupOnly", res(0.30, [0.9, 0.0, 0.0]), 12.0, False),
            ("CISC-R", res(0.45, [0.9, 0.4, 0.04]), 30.0, False),
            ("UniMatch", res(0.50, [0.9, 0.5, 0.1]), 40.0, True)]
    table = demo_table(rows, ["background", "disc", "square"]).splitlines()
    assert table[2].split()[-5:] == ["30.00", "90.00", "0.00", "0.00", "12"]  # no gain column
    assert table[3].split()[1:3] == ["45.00", "+15.00"]
    assert table[4].split()[-2:] == ["40", "(reused)"]
    assert "3 of 3" in table[5]  # square is learned by UniMatch only (10 % >= 5 %)
    assert table[0].split()[-5:] == ["background", "disc", "square", "wall", "s"]  # never cut
    long = demo_table(rows[:1], ["background", "a_very_long_class_name", "x"]).splitlines()
    assert "a_very_long_class_name" in long[0] and long[2].split()[-4:] == ["90.00", "0.00",
                                                                             "0.00", "12"]


def test_demo_budget_is_pinned():
    # The demo's cost is its iterations x images per stage; a change here changes the README's
    # measured demo time, which must then be measured again (docs/results/demo_cpu.md).
    from ciscr.config import load_config
    from ciscr.demo import DEFAULT_METHODS

    cfg = load_config("synthetic", [])
    t, d = cfg.train, cfg.data.synthetic
    assert DEFAULT_METHODS == ("suponly", "ciscr_bank")
    assert (cfg.data.labeled, d.num_train, d.num_val, d.size) == (10, 200, 50, 64)
    assert (t.epochs, t.unlabeled_epochs, t.iters_per_epoch, t.batch_size, t.crop_size) == (
        DEMO_BUDGET)


def test_a_run_directory_is_used_by_one_process_at_a_time(tmp_path, capsys):
    from ciscr.runner import lock_run_dir, unlock_run_dir

    out = tmp_path / "busy"
    out.mkdir()
    held = lock_run_dir(out)  # as if another ciscr process were training here
    try:
        assert main(["train", "synthetic", "--out", str(out), *TINY]) == 2
        assert "another ciscr process is already running" in capsys.readouterr().err
        assert not (out / "stage1").exists()
    finally:
        unlock_run_dir(held)
    assert main(["train", "synthetic", "--out", str(out), *TINY]) == 0
    assert not (out / ".lock").exists()


def test_demo_shares_supOnlys_stage1_and_a_second_demo_reuses_every_row(tmp_path, capsys):
    from ciscr.demo import run_demo

    out = tmp_path / "demo"
    rows = run_demo(out, list(TINY), ("suponly", "ciscr_bank"))
    printed = capsys.readouterr().out
    assert "stage1: the same as suponly's (same config): copied, not retrained" in printed
    sup, bank = (json.loads((out / m / "stage1" / "metrics.json").read_text())
                 for m in ("suponly", "ciscr_bank"))
    assert sup == bank and rows[1][0] == "CISC-R (bank), no stage-1 L_CISC"
    assert (out / "ciscr_bank" / "stage3" / "done.json").exists()
    again = run_demo(out, list(TINY), ("suponly", "ciscr_bank"))
    assert [r[3] for r in again] == [True, True]  # both rows read back, nothing retrained


def test_only_a_plain_supervised_stage1_is_shared():
    from ciscr.config import load_config
    from ciscr.demo import same_stage1

    sup = load_config("synthetic", ["method.name=suponly"])
    assert same_stage1(sup, load_config("synthetic", ["method.name=ciscr_bank"]))
    for other in (["method.name=ciscr_bank", "method.stage1_cisc_loss=true"],  # L_CISC
                  ["method.name=stpp"],  # ST++ keeps snapshots of stage 1
                  ["method.name=ciscr_bank", "seed=1"], ["method.name=unimatch"]):
        assert not same_stage1(sup, load_config("synthetic", other)), other


def test_other_demo_rows_keep_their_own_recipe():
    from ciscr.config import load_config, preset_overrides

    assert preset_overrides("ciscr_bank") == []  # the synthetic config's own method
    uni = load_config("synthetic", ["method.name=unimatch", *preset_overrides("unimatch")])
    st = load_config("synthetic", ["method.name=st", *preset_overrides("st")])
    assert uni.method.confidence_threshold == 0.95 and st.method.init == "fresh"
    assert st.method.confidence_threshold == 0.0


def test_ciscr_presets_train_on_confident_pixels_and_st_keeps_its_published_recipe():
    from ciscr.config import Config

    def threshold(name: str) -> float:
        return Config.model_validate({"method": {"name": name}}).method.confidence_threshold

    assert threshold("ciscr") == threshold("ciscr_bank") == threshold("unimatch") == 0.95
    assert threshold("st") == threshold("stpp") == 0.0


@pytest.mark.parametrize("name", ["pascal_unimatch", "cityscapes_unimatch", "coco_unimatch"])
def test_the_unimatch_reproduction_configs_keep_its_published_loss(name):
    from ciscr.config import load_config

    assert load_config(name, []).method.labeled_weight == 0.5  # (CE_l + L_u) / 2
