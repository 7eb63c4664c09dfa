"""benchmarks/camvid.py (protocol 3): rows, chains, which finished runs count, the report."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import archive  # noqa: E402
import camvid  # noqa: E402
import camvid_report as rep  # noqa: E402

from ciscr.methods import RECIPES  # noqa: E402


def args_for(tmp_path: Path, *extra: str):
    return camvid.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"),
                              "--data", str(tmp_path / "no-data"), *extra])


def test_every_row_is_a_method_and_the_chains_run_each_main_row_once():
    for label, preset, _ in camvid.ROWS.values():
        assert preset in RECIPES and label
    flat = [r for c in camvid.CHAINS for r in c]
    assert sorted(flat) == sorted(camvid.MAIN) and len(camvid.CHAINS) == 2
    for row, (source, _) in camvid.SHARED_WITH.items():
        chain = next((c for c in camvid.CHAINS if row in c), None)
        if chain is not None and source in chain:  # a row copying all of a source's early
            assert chain.index(source) < chain.index(row)  # stages runs after it


def test_rows_start_from_their_seeds_base_and_the_base_from_imagenet(tmp_path):
    a = args_for(tmp_path)
    base = camvid.row_overrides(a, camvid.BASE_ROW, 1)
    assert not any(o.startswith("model.init=") for o in base) and "seed=1" in base
    row = camvid.row_overrides(a, "unimatch", 1)
    assert f"model.init={camvid.base_checkpoint(a, 1)}" in row


def _fake_run(rd: Path, cfg_overrides: list[str], miou: float, its: int = 12) -> None:
    from ciscr.config import load_config, save_config

    rd.mkdir(parents=True, exist_ok=True)
    save_config(load_config("camvid", cfg_overrides), rd / "config.yaml")
    stage = rd / "online"
    stage.mkdir()
    stage.joinpath("train.jsonl").write_text("".join(
        json.dumps({"iteration": i, "step_seconds": s, "mask_ratio": 0.5, "pseudo_acc": 0.8}) + "\n"
        for i, s in ((its // 2, 4.0), (its, 5.0))))
    (stage / "done.json").write_text(json.dumps({"val_miou": miou}))
    (rd / "results.json").write_text(json.dumps({
        "final_metrics": {"miou": miou, "iou": [miou], "class_names": ["a"]},
        "stages": {"online": {"val_miou": miou}}, "final_stage": "online"}))
    (rd / "wall.json").write_text(json.dumps({"seconds": 60.0, "cpu_seconds": 50.0}))


def test_a_row_counts_only_from_its_seeds_current_base_and_survives_the_machine(tmp_path):
    from ciscr.warmstart import warm_config  # noqa: F401  (the check resolves warm settings)

    a = args_for(tmp_path)
    base = camvid.run_dir(a, camvid.BASE_ROW, 0)
    base.mkdir(parents=True)
    (base / camvid.BASE_SHA).write_text("a" * 64 + "\n")
    rd = camvid.run_dir(a, "unimatch", 0)
    over = camvid.row_overrides(a, "unimatch", 0)
    warm = ["train.epochs=30", "train.lr=0.0027", "train.warm_epochs=0", "train.warm_lr=0"]
    _fake_run(rd, over + warm + [f"model.init_sha256={'a' * 64}"], 0.55)
    assert camvid.finished_dir(a, "unimatch", 0) == rd
    (base / camvid.BASE_SHA).write_text("b" * 64 + "\n")  # the base was retrained
    assert camvid.finished_dir(a, "unimatch", 0) is None
    (base / camvid.BASE_SHA).write_text("a" * 64 + "\n")
    (base / "stage1").mkdir()
    (base / "stage1" / "done.json").write_text("{}")  # archived once a stage has finished
    archive.mirror(Path(a.runs), camvid.archive_root(a))
    shutil.rmtree(a.runs)  # the machine is gone: the archive still counts, nothing reruns
    assert camvid.finished_dir(a, "unimatch", 0) == camvid.archive_root(a) / rd.name
    camvid.run_one(a, "unimatch", 0, 1)  # would start `ciscr run` (and fail) if not skipped
    assert not rd.exists()
    got = rep.collect(camvid.finished_dir(a, "unimatch", 0), "unimatch", 0)
    assert (got["iterations"], got["s_per_iteration"], got["labeled"]) == (12, 4.5, 0.125)
    shutil.rmtree(camvid.archive_root(a) / rd.name)
    _fake_run(rd, over + warm + [f"model.init_sha256={'a' * 64}", "train.crop_size=160"], 0.6)
    assert camvid.finished_dir(a, "unimatch", 0) is None  # another protocol: not counted


def test_a_finished_base_without_its_checkpoint_is_not_silently_retrained(tmp_path):
    a = args_for(tmp_path)
    base = camvid.run_dir(a, camvid.BASE_ROW, 0)
    base.mkdir(parents=True)
    (base / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="checkpoint is gone"):
        camvid.ensure_base(a, 0, ["unimatch"])


def test_paired_differences_and_targets_by_hand():
    xs, ref = [0.30, 0.32, None, 0.28], [0.31, 0.30, 0.35, 0.29]
    # differences in points: -1, +2, (skipped), -1 -> mean 0, sd sqrt(3), se 1
    assert rep.paired(xs, ref)[1] == "+0.00 ± 1.00 (n=3)"
    assert rep.paired([0.3, None], [0.3, 0.2])[1] == "+0.00 (n=1)"
    assert rep.paired([None], [0.3]) == (None, "n/a")
    runs = {(r, s): {"val_miou": v} for r, s, v in [
        ("suponly_continued", 0, 0.50), ("unimatch", 0, 0.53), ("unimatch_cisc", 0, 0.55),
        ("ciscr", 0, 0.51), ("ciscr_bank", 0, 0.53)]}
    lines = rep.targets(runs, [0], judged=True)
    assert lines[0] == ("- the better of UniMatch / UniMatch + CISC >= control + 4: MET "
                        "(+5.00 (n=1); 1 of 3 seeds, not final)")
    assert lines[1].startswith("- CISC-R (the better of query / bank) >= control + 2: MET (+3.00")
    assert lines[2].endswith("not measured yet")  # no ST++
    assert rep.targets(runs, [0], judged=False)[0].startswith(
        "- the better of UniMatch / UniMatch + CISC >= control + 4: not judged")
    worse = {**runs, ("unimatch_cisc", 0): {"val_miou": 0.52}}
    assert "MISSED" in rep.targets(worse, [0], judged=True)[3]


def test_the_report_writes_each_run_record_and_every_table(tmp_path):
    a = args_for(tmp_path)
    rd = tmp_path / "u"
    _fake_run(rd, ["seed=0"], 0.55)
    runs = {("unimatch", 0): rep.collect(rd, "unimatch", 0)}
    spec = {"labels": {r: v[0] for r, v in camvid.ROWS.items()}, "main": camvid.MAIN,
            "options": camvid.OPTIONS, "base": camvid.BASE_ROW, "control": camvid.CONTROL}
    md = rep.write(a, runs, [0], [], ["--seeds", "0"], spec).read_text()
    assert "| UniMatch | 55.00 (n=1) | 55.00 | n/a | n/a |" in md
    assert "| UniMatch | 12 | 4.50 | 1.0 | 0.8 |" in md  # iterations, s/it, wall and CPU min
    assert "| SupOnly, continued (the control) | not finished |" in md
    rec = json.loads((tmp_path / "o" / "camvid.json").read_text())["runs"][0]
    assert {k: rec[k] for k in ("row", "seed", "labeled", "val_miou")} == {
        "row": "unimatch", "seed": 0, "labeled": 0.125, "val_miou": 0.55}


def test_pool_label_summary_counts_shares_recall_and_what_a_threshold_keeps():
    import camvid_pool_labels as pool
    import numpy as np

    # rows = truth: class a 8 right + 2 labelled b; class b 1 labelled a + 9 right
    full = np.array([[8, 2], [1, 9]])
    kept = np.array([[6, 0], [0, 4]])  # the confident pixels: all right
    res = pool.summarise(["a", "b"], {0.0: full, 0.9: kept, 0.95: kept})
    a, b = res["classes"]
    assert a["gt_share"] == pytest.approx(0.5) and a["label_over_gt"] == pytest.approx(0.9)
    assert (a["recall"], a["precision"]) == pytest.approx((0.8, 8 / 9))
    assert (a["missed_to"], a["missed_to_share"]) == ("b", pytest.approx(0.2))
    assert b["label_over_gt_095"] == pytest.approx(0.4)
    t0, t95 = res["thresholds"][0], res["thresholds"][2]
    assert t0["miou"] == pytest.approx((8 / 11 + 9 / 12) / 2) and t0["wrong"] == pytest.approx(0.15)
    assert (t95["kept"], t95["wrong"], t95["miou"]) == pytest.approx((0.5, 0.0, 1.0))
    assert any("| b | 50.00% | 1.10 |" in line for line in pool.markdown(res))


def test_the_readme_headline_is_replaced_between_its_marks_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{rep.README_MARK[0]}\nold\n{rep.README_MARK[1]}\nbottom\n")
    rep.update_readme(readme, "new line")
    assert readme.read_text() == (f"top\n{rep.README_MARK[0]}\nnew line\n{rep.README_MARK[1]}"
                                  "\nbottom\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no marks\n")
    rep.update_readme(plain, "x")
    assert plain.read_text() == "no marks\n"
    runs = {("suponly_continued", 0): {"val_miou": 0.5}, ("unimatch", 0): {"val_miou": 0.52}}
    line = rep.headline(runs, [0, 1], {"unimatch": "UniMatch"}, "python benchmarks/camvid.py")
    assert "seed(s) 0 of 3" in line and "UniMatch +2.00" in line


def test_each_option_row_is_compared_with_the_main_row_it_varies():
    assert camvid.varies()["bank_cb"] == "ciscr_bank" and "fixmatch" not in camvid.varies()
    rec = lambda m, iou: {"val_miou": m, "iou": iou, "class_names": ["a", "b"]}  # noqa: E731
    runs = {("bank_cb", 0): rec(0.50, [0.6, 0.4]), ("ciscr_bank", 0): rec(0.52, [0.5, 0.54])}
    lines = rep.table_option_vs_main(runs, {"bank_cb": "ciscr_bank", "bank_thr": "ciscr_bank"},
                                     [0], {"bank_cb": "CB", "ciscr_bank": "Bank"})
    assert lines[2:] == ["| CB | Bank | -2.00 (n=1) | b -14.0, a +10.0 |"]  # unfinished: no row
    assert rep.table_option_vs_main({}, {"bank_cb": "ciscr_bank"}, [0], {}) == []
