"""benchmarks/camvid_labels.py (protocol 4, the label curve): the CPU-time rule, the targets by
hand, and the whole queue end to end on tiny data (its own runs and output folders)."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import camvid_labels as cl  # noqa: E402
import camvid_labels_records as records  # noqa: E402
import camvid_labels_report as rep  # noqa: E402
import camvid_labels_tables as tables  # noqa: E402

from ciscr.methods import RECIPES  # noqa: E402


def _tiny_camvid(root: Path, n_train: int = 10, n_val: int = 2) -> Path:
    """A folder-format dataset of 3 classes, 48 x 64 images whose masks follow the colours."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            mask = np.zeros((48, 64), np.uint8)
            mask[:, 20:] = 1
            mask[30:, 40:] = 2
            img = (mask[..., None] * 80 + rng.integers(0, 40, (48, 64, 3))).astype(np.uint8)
            for sub, arr, ext in (("images", img, "jpg"), ("masks", mask, "png")):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / sub / split / f"{split}{i}.{ext}")
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    return root


def test_every_row_is_a_method_and_the_compute_rows_wait_for_what_they_are_given(tmp_path):
    for label, preset, _ in cl.ROWS.values():
        assert preset in RECIPES and label
    assert sorted(cl.ORDER) == sorted(cl.MAIN)
    args = _args(tmp_path)  # no run anywhere: the options at the first seed
    seen: set[str] = set()
    for _, _, rows in cl.queue(args):  # what a row needs is queued before it (or earlier)
        for row in rows:
            assert set(cl.needs(row)) <= seen | set(rows[:rows.index(row)]), row
        seen |= set(rows)
    assert cl.needs("suponly_compute") == ["suponly", "unimatch_cisc", "unimatch"]
    assert cl.needs("ciscr_fresh") == ["ciscr"]
    # The smallest split's seeds, the largest split, options and SupOnly's 8N, 23 labels.
    phases = [(split, seed, rows) for split, seed, rows in cl.queue(args)]
    assert [p[:2] for p in phases] == [(12, 0), (12, 1), (12, 2), (46, 0), (46, 1), (46, 2),
                                       (12, 0), (12, 0), (23, 0), (23, 1), (23, 2)]
    assert phases[6][2] == [*cl.LEVER_ROWS, "fixmatch", "stpp"] == cl.OPTION_ROWS
    assert phases[7][2] == ["suponly_8n"]


def test_the_options_run_at_the_seed_whose_rows_ran_on_this_machine(tmp_path, monkeypatch):
    here = {"machine": "AMD EPYC, 2 cores", "bf16_native": True, "precision": "bf16"}
    other = {"machine": "Intel Xeon, 2 cores", "bf16_native": False, "precision": "none"}
    monkeypatch.setattr(cl, "machine_record", lambda: here)
    dirs = {}
    for seed, rec in ((0, other), (1, other), (2, here)):
        for row in ("suponly", "unimatch_cisc"):
            rd = dirs[(row, seed)] = tmp_path / "runs" / "l12" / f"{row}_s{seed}"
            rd.mkdir(parents=True)
            (rd / cl.MACHINE).write_text(json.dumps(rec) + "\n")
    monkeypatch.setattr(cl, "finished_dir", lambda args, split, row, seed: dirs.get((row, seed)))
    args = _args(tmp_path)
    assert cl.option_seed(args, 12, [0, 1, 2], "fixmatch") == 2
    assert [p for p in cl.queue(args) if p[2][0] == cl.LEVER_ROWS[0]] == [(12, 2, cl.OPTION_ROWS)]
    with open(dirs[("unimatch_cisc", 2)] / cl.MACHINE, "a") as f:  # resumed on another machine
        f.write(json.dumps(other) + "\n")
    assert cl.option_seed(args, 12, [0, 1, 2], "fixmatch") == 0  # no seed ran here: the first
    (tmp_path / "runs" / "l12" / "fixmatch_s1").mkdir()  # started at seed 1: it continues there
    assert cl.option_seed(args, 12, [0, 1, 2], "fixmatch") == 1
    assert cl.option_seed(args, 12, [0, 1, 2], "stpp") == 0


def _args(tmp_path: Path, *extra: str):
    return cl.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra])


def test_the_cpu_time_rule_by_hand(tmp_path, monkeypatch):
    a = _args(tmp_path)
    cpu = {"suponly": 1000.0, "unimatch": 3000.0, "unimatch_cisc": 3200.0, "ciscr": 1500.0}
    monkeypatch.setattr(cl, "cpu_seconds", lambda args, split, row, seed: cpu.get(row))
    plan = cl.compute_plan(a, 12, 0, "suponly_compute")
    # within 10 %: one run given the mean, 480 x 3100 / 1000 = 1488 -> whole passes of 12: 1488
    assert plan["rows"] == ["unimatch_cisc", "unimatch"] and plan["iterations"] == 1488
    assert not cl.compute_plan(a, 12, 0, "suponly_compute_unimatch")["needed"]
    ciscr = cl.compute_plan(a, 12, 0, "suponly_compute_ciscr")
    assert ciscr["needed"] and ciscr["iterations"] == 720  # 480 x 1.5
    cpu["unimatch"] = 2000.0  # not within 10 % of UniMatch + CISC: each gets its own
    assert cl.compute_plan(a, 12, 0, "suponly_compute")["rows"] == ["unimatch_cisc"]
    own = cl.compute_plan(a, 12, 0, "suponly_compute_unimatch")
    assert own["needed"] and own["iterations"] == 960
    cpu["ciscr"] = None
    assert cl.compute_plan(a, 12, 0, "suponly_compute_ciscr") is None  # not finished yet


def test_targets_by_hand():
    def rec(m):
        return {"val_miou": m, "run_dir": "/nowhere"}

    runs = {(12, r, 0): rec(m) for r, m in [("suponly", 0.40), ("unimatch", 0.45),
                                            ("unimatch_cisc", 0.47), ("ciscr", 0.43)]}
    runs[(46, "suponly", 0)], runs[(46, "unimatch", 0)] = rec(0.50), rec(0.52)
    runs[(46, "unimatch_cisc", 0)] = rec(0.51)
    tgt = rep.targets(runs, [12, 46], [0], judged=True)
    assert tgt[0]["verdict"] == "MET (+7.00 (n=1); 1 of 3 seeds, not final)"
    assert tgt[1]["verdict"] == "not measured yet"  # no SupOnly at the CPU time yet
    assert tgt[2]["verdict"].startswith("MISSED (+3.00")  # CISC-R +3 < +4
    assert tgt[3]["verdict"].startswith("MISSED (+2.00")  # 46 labels: +2 < +3
    assert [t["verdict"][:4] for t in tgt[4:]] == ["MET ", "MISS"]  # UniMatch + CISC, 12 / 46
    # Equal CPU time: one best row for every seed, by its mean (CISC-R: 0.52 against UniMatch
    # + CISC's 0.47), although UniMatch + CISC is the best row of seed 0.
    runs.update({(12, r, 1): rec(m) for r, m in [("suponly", 0.40), ("unimatch", 0.45),
                                                 ("unimatch_cisc", 0.47), ("ciscr", 0.61)]})
    runs.update({(12, "suponly_compute_ciscr", s): rec(m) for s, m in [(0, 0.50), (1, 0.55)]})
    runs.update({(12, "suponly_compute_unimatch_cisc", s): rec(0.40) for s in (0, 1)})
    tgt = rep.targets(runs, [12, 46], [0, 1], judged=True)
    # CISC-R against SupOnly at its CPU time: (0.43 - 0.50, 0.61 - 0.55) -> mean -0.5 points.
    assert abs(tgt[1]["difference"] + 0.5) < 1e-9 and tgt[1]["seeds"] == 2
    # Equal steps, the better of UniMatch / UniMatch + CISC: one row by its mean too. UniMatch
    # (mean 0.49 against 0.47) on both seeds, although UniMatch + CISC is seed 0's better one
    # (each seed's better would give (0.47 - 0.40, 0.53 - 0.40): +10).
    runs[(12, "unimatch", 1)] = rec(0.53)
    tgt = rep.targets(runs, [12, 46], [0, 1], judged=True)
    assert abs(tgt[0]["difference"] - 9.0) < 1e-9  # UniMatch: (0.45 - 0.40, 0.53 - 0.40)
    assert (tgt[0]["row"], tgt[0]["chosen"], tgt[1]["row"]) == ("unimatch", True, "ciscr")
    # 46 labels: seed 0 only has both rows, so the row is chosen on it (0.52 against 0.51).
    assert tgt[3]["row"] == "unimatch" and tgt[3]["verdict"].startswith("MISSED (+2.00 (n=1)")
    assert rep.targets({}, [12, 46], [0], judged=True)[0]["row"] is None  # nothing finished


def test_the_advice_sentence_is_written_from_the_paired_figures(tmp_path):
    def rec(m, it=480, rd="/nowhere"):
        return {"val_miou": m, "iterations": it, "cpu_minutes": it / 20, "run_dir": rd}

    runs = {(12, r, 0): rec(m) for r, m in [("suponly", 0.40), ("unimatch", 0.45),
                                            ("unimatch_cisc", 0.47), ("ciscr", 0.43)]}
    labels = {r: r.upper() for r in cl.ROWS}
    first = rep.advice(runs, [12], [0, 1, 2], labels, cl.CURVE)
    assert "(by mean mIoU), UNIMATCH_CISC, gains over SupOnly at N steps (+7.00 (n=1)" in first
    assert "(1 of 3 seeds so far)" in first and "); per CPU hour: not measured yet" in first
    match = tmp_path / "compute"
    match.mkdir()
    (match / cl.MATCH).write_text(json.dumps({"rows": ["unimatch_cisc", "unimatch"]}))
    runs[(12, "suponly_compute", 0)] = rec(0.50, 1440, str(match))
    runs[(12, "suponly_2n", 0)] = rec(0.46, 960)
    later = rep.advice(runs, [12], [0, 1, 2], labels, cl.CURVE)
    line = rep.headline(runs, [12], [0, 1, 2], "cmd", labels)
    assert "UNIMATCH_CISC +7.00 (n=1) at equal steps, -3.00 (n=1) at equal CPU time" in line
    assert "(n = the seeds, of 3, finished for both rows)" in line
    assert "CISCR +3.00 (n=1) at equal steps" in line  # rec() gives every row 480 iterations
    runs[(12, "ciscr", 0)] = rec(0.49, 1440)  # the best now, with 3 stages of N
    assert "CISCR +9.00 (n=1) at N steps per stage (1440 in all)" in rep.headline(
        runs, [12], [0, 1, 2], "cmd", labels)
    assert "CISCR (N per training stage, 1440 in all), gains over SupOnly at N steps (+9.00" in \
        rep.advice(runs, [12], [0, 1, 2], labels, cl.CURVE)
    assert "SupOnly trained for the same CPU time is ahead of every semi-supervised row " \
        "measured (UNIMATCH -5.00 (n=1); UNIMATCH_CISC -3.00 (n=1) (CISCR: not measured yet))" \
        in later
    # SupOnly's curve: its two longest runs, 960 (46) and 1440 (the compute row, 50) iterations:
    # +4 points over log2(1.5) doublings = +6.84 per doubling.
    assert "train SupOnly longer" in later and "(SupOnly's two longest runs, seed 0: at 12 " \
        "labels, 960 and 1440 iterations, +6.84 points per doubling of steps)" in later
    # CISC-R's 1440 steps against the SupOnly run nearest them (the compute row's 1440: 0.50).
    assert "; it trains 1440 iterations in all, and against the SupOnly run nearest that many " \
        "steps (within 1.5x) at each seed (1440 / n/a / n/a iterations) it is -1.00 (n=1))" in \
        rep.advice(runs, [12], [0, 1, 2], labels, cl.CURVE)
    assert later.endswith("whether the unlabeled images pay once more steps stop paying is not "
                          "measured here.")
    assert rep.gain_per_doubling([(480, 0.4, 1.0)]) is None
    pts = [(480, 0.4, 1.0), (960, 0.46, 2.0)]
    assert rep.curve_end(pts, [(12, 0, "suponly_8n")]).endswith(
        "a doubling still gains +6.00 points; SupOnly at 8N is queued (after the 46-label seeds).")
    assert rep.curve_end(pts, []).endswith("no longer run is queued: the budget stopped it here.")
    assert rep.curve_end([(480, 0.4, 1.0), (960, 0.405, 2.0)], []).startswith(
        "The curve has reached the issue's end")
    assert rep.curve_end(pts[:1], []).startswith("Where the curve ends: fewer than two")
    gain, short, long = rep.gain_per_doubling([(240, 0.3, 0.5), (480, 0.4, 1.0), (1920, 0.5, 4.0)])
    assert (short, long) == (480, 1920) and abs(gain - 0.05) < 1e-12  # +10 over 2 doublings
    # A seed without every semi-supervised row finished is not used to pick the best row.
    runs[(12, "suponly", 1)], runs[(12, "unimatch", 1)] = rec(0.30), rec(0.60)
    assert "(1 of 3 seeds so far)" in rep.advice(runs, [12], [0, 1, 2], labels, cl.CURVE)
    assert rep.advice({}, [12], [0], labels, cl.CURVE).startswith("Not written yet")
    # A second split: its own clause per step, its per-CPU figures named by split, and where a
    # row leads SupOnly at its CPU time there, the sentence says so for that split only.
    for r, m in [("suponly", 0.50), ("unimatch", 0.53), ("unimatch_cisc", 0.52), ("ciscr", 0.51),
                 ("suponly_compute", 0.52)]:
        runs[(46, r, 0)] = rec(m, 1440 if r == "suponly_compute" else 480,
                               str(match) if r == "suponly_compute" else "/nowhere")
    two = rep.advice(runs, [12, 46], [0, 1, 2], labels, cl.CURVE)
    assert "; with 46 labeled images (1 of 3 seeds so far), the best row, UNIMATCH, gains over " \
        "SupOnly at N steps (+3.00 (n=1) mIoU points)" in two
    assert "a semi-supervised row still leads SupOnly trained for the same CPU time at 46 " \
        "labeled images (46 labels: UNIMATCH +1.00 (n=1); UNIMATCH_CISC +0.00 (n=1) (CISCR: " \
        "not measured yet)): there the unlabeled images pay per CPU hour too; at 12, SupOnly " \
        "trained for the same CPU time is ahead of every semi-supervised row measured (12 " \
        "labels: UNIMATCH -5.00 (n=1)" in two
    assert "there, train SupOnly longer before paying for an unlabeled branch (SupOnly's two " \
        "longest runs, seed 0: at 12 labels, 960 and 1440 iterations, +6.84 points per doubling "\
        "of steps); whether" in two  # 46 labels' curve is not cited: there the rows pay
    assert "finished for both rows). 12 labeled images: UNIMATCH +" in rep.headline(
        runs, [12, 46], [0, 1, 2], "cmd", labels)
    assert ". 46 labeled images: UNIMATCH +3.00 (n=1) at equal steps, +1.00 (n=1) at equal " \
        "CPU time;" in rep.headline(runs, [12, 46], [0, 1, 2], "cmd", labels)
    runs[(46, "suponly", 0)] = rec(0.30)  # a row leads SupOnly at its CPU time at both splits
    for k in (12, 46):
        runs[(k, "suponly_compute", 0)] = rec(0.30, 1440, str(match))
    both = rep.advice(runs, [12, 46], [0, 1, 2], labels, cl.CURVE)
    assert "still leads SupOnly trained for the same CPU time at 12, 46 labeled images (12 " \
        "labels: UNIMATCH +15.00 (n=1)" in both and "train SupOnly longer" not in both
    assert both.endswith("; 46 labels: UNIMATCH +23.00 (n=1); UNIMATCH_CISC +22.00 (n=1) (CISCR: "
                         "not measured yet)): there the unlabeled images pay per CPU hour too.")


def test_the_cpu_time_partner_is_read_seed_by_seed(tmp_path):
    # Seed 0's shared SupOnly run covers UniMatch (the two online rows' CPU within 10 %);
    # seed 1's does not (UniMatch got its own): each seed pairs UniMatch with its own partner.
    def rec(m, rd="/nowhere", partner=None):
        return {"val_miou": m, "run_dir": rd, **({"compute_partner": partner} if partner else {})}

    plans = {}
    for s, rows in ((0, ["unimatch_cisc", "unimatch"]), (1, ["unimatch_cisc"])):
        plans[s] = tmp_path / f"plan{s}"
        plans[s].mkdir()
        (plans[s] / cl.MATCH).write_text(json.dumps({"rows": rows}))
    runs = {(12, "unimatch", 0): rec(0.45), (12, "unimatch", 1): rec(0.46),
            (12, "suponly_compute", 0): rec(0.50, str(plans[0])),
            (12, "suponly_compute", 1): rec(0.51, str(plans[1])),
            (12, "suponly_compute_unimatch", 1): rec(0.55)}
    assert records.compute_vals(runs, 12, "unimatch", [0, 1]) == [0.50, 0.55]
    # The queue's record of the rule's partner wins over the plans (here: CISC-R's own run
    # not needed, so the shared one).
    runs[(12, "ciscr", 0)] = rec(0.52, partner="suponly_compute")
    assert records.compute_vals(runs, 12, "ciscr", [0, 1]) == [0.50, None]


def test_the_stage_start_line_says_which_start_won():
    runs = {(12, "ciscr", 0): {"val_miou": 0.47, "iterations": 1440}}
    assert "not measured yet" in rep.stage_start(runs, 12, 0)
    runs[(12, "ciscr_fresh", 0)] = {"val_miou": 0.45, "iterations": 1440}
    line = rep.stage_start(runs, 12, 0)
    assert "47.00, from ImageNet (the paper) 45.00, +2.00 points" in line and "stands" in line
    runs[(12, "ciscr_fresh", 0)]["val_miou"] = 0.48
    assert "should switch" in rep.stage_start(runs, 12, 0)


def test_the_whole_queue_on_tiny_data_and_its_report(tmp_path):
    data = _tiny_camvid(tmp_path / "data")
    tiny = ["train.crop_size=32", "train.batch_size=2", "train.unlabeled_batch_size=2",
            "model.channels=16", "train.ckpt_every=6", "report=false"]
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--data", str(data),
            "--weights", "", "--splits", "2", "--seeds", "0", "--iters", "12", "--no-options",
            *[x for t in tiny for x in ("--set", t)]]
    assert cl.main(argv) == 0
    md = (tmp_path / "out" / "camvid_labels.md").read_text()
    assert "(NOT the protocol)" in md and "not judged (not the protocol)" in md
    better = next(ln for ln in md.splitlines() if ln.startswith("- 2 labels, equal steps: the "
                                                                 "better of"))
    assert better.endswith(("; judged on UniMatch", "; judged on UniMatch + CISC (ours)"))
    assert md.split("## Queued, not started")[1].split("\n")[2] == "(nothing)"  # all ran
    rec = json.loads((tmp_path / "out" / "camvid_labels.json").read_text())
    runs = {(r["labeled"], r["row"]): r for r in rec["runs"]}
    for split in (2,):
        for row in ("suponly", "unimatch", "unimatch_cisc", "ciscr", "suponly_compute"):
            r = runs[(split, row)]
            assert r["seed"] == 0 and 0.0 <= r["val_miou"] <= 1.0 and r["cpu_minutes"] > 0
        assert runs[(split, "ciscr")]["iterations"] == 3 * 12  # stage 1 shared + 2 stages
    plan = json.loads((tmp_path / "runs" / "l2" / "suponly_compute_s0" / cl.MATCH).read_text())
    assert runs[(2, "suponly_compute")]["iterations"] == plan["iterations"] > 12
    assert (tmp_path / "out" / "camvid_labels.png").stat().st_size > 0
    diag = json.loads((tmp_path / "runs" / "l2" / "unimatch_s0" / "label_diagnostics.json")
                      .read_text())  # the queue diagnosed the run, over its whole pool (8)
    assert diag["images"] == 8 and diag["stage"] == "online" and 0 <= diag["taught"] <= 1
    assert runs[(2, "unimatch")]["diagnostics"] == diag
    assert "| UniMatch (1) |" in md.split("## Diagnostics")[1]
    taught = next(ln for ln in md.splitlines() if ln.startswith("| class | share of the pool"))
    assert "| UniMatch: IoU / taught / right where passed |" in taught
    assert all(len(r["evals_cpu_minutes"]) == len(r["evals"]) for r in rec["runs"]
               if r["row"] in ("ciscr", "unimatch"))  # placed stage by stage
    assert (tmp_path / "out" / "camvid_labels-runs" / "l2" / "suponly_s0" / "results.json").exists()
    # The JSON points at the archived (committed) copy, not at runs/.
    assert runs[(2, "suponly")]["archive"] == str(tmp_path / "out" / "camvid_labels-runs" / "l2"
                                                  / "suponly_s0")
    assert "run_dir" not in runs[(2, "suponly")]  # this machine's path, not in the JSON
    plans = md.split("## SupOnly given a row's CPU time")[1].split("\n\n")[1].splitlines()
    assert plans[2].startswith("| 2 | 0 | suponly_compute |") and plans[2].endswith("| one | the same |")
    assert cl.shown_path(cl.REPO / "docs" / "x") == str(Path("docs") / "x")
    # Rerun: everything is finished (live or archived), nothing trains again.
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("results.json")}
    assert cl.main(argv) == 0
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("results.json")}


def test_diagnostic_counts_and_figures_by_hand():
    import camvid_labels_diagnostics as diag
    import torch

    label = torch.tensor([[0, 0, 1], [1, 2, 2]])
    gt = torch.tensor([[0, 1, 1], [1, 2, 255]])  # one void pixel, left out
    passed = torch.tensor([[True, True, False], [True, True, True]])
    c = diag.count_pixels(label, passed, gt, 3, 255)
    assert {k: v.tolist() for k, v in c.items()} == {
        "gt": [1, 3, 1], "pred": [2, 2, 1], "hit": [1, 2, 1], "passed": [2, 1, 1],
        "passed_hit": [1, 1, 1]}
    s = diag.summarize(c, ["a", "b", "c"])
    pc = s["per_class"]
    assert pc["pseudo_iou"] == [0.5, 2 / 3, 1.0] and pc["mask_ratio"] == [1.0, 0.5, 1.0]
    assert pc["precision"] == [0.5, 1.0, 1.0] and pc["recall"] == [1.0, 2 / 3, 1.0]
    assert pc["mask_precision"] == [0.5, 1.0, 1.0] and pc["taught"] == [1.0, 1 / 3, 1.0]
    assert s["pseudo_acc"] == 4 / 5 and s["mask_ratio"] == 4 / 5 and s["taught"] == 3 / 5
    assert abs(s["pseudo_miou"] - (0.5 + 2 / 3 + 1.0) / 3) < 1e-12


def test_a_row_named_twice_is_diagnosed_once():
    classes = ["a", "b"]
    d = {"pseudo_miou": 0.5, "pseudo_acc": 0.8, "mask_ratio": 0.6, "mask_precision": 0.9,
         "taught": 0.54, "auroc": {"confidence": 0.8, "cisc": 0.7}, "classes": classes,
         "per_class": {"gt_share": [0.5, 0.5], "pseudo_iou": [0.4, 0.6], "taught": [0.5, 0.58]}}
    runs = {(12, "ciscr", 0): {"diagnostics": d}}
    md = tables.md_diagnostics(runs, [12], [0], ["ciscr", "suponly", "ciscr"], {"ciscr": "CISC-R"})
    rows = [line for line in md if line.startswith("| CISC-R (1) |")]
    assert rows == ["| CISC-R (1) | 50.0 | 80.0 | 60.0 | 90.0 | 54.0 | 0.800 | 0.700 |  |"]
    # A per-class table for each split with a diagnosed run, none for a split without.
    runs[(46, "ciscr", 0)] = {"diagnostics": d}
    md = tables.md_diagnostics(runs, [12, 46, 23], [0], ["ciscr"], {"ciscr": "CISC-R"})
    assert [line.split(" (")[0] for line in md if line.startswith("Per class at")] == [
        "Per class at 12 labels", "Per class at 46 labels"]
    assert md.count("| b | 50.0 | 60.0 / 58.0 / n/a |") == 2


def test_the_diagnostic_findings_by_hand():
    def diag(taught, iou, right, passed, conf, cisc):
        return {"classes": ["road", "pole", "car"], "mask_precision": right,
                "mask_ratio": passed, "auroc": {"confidence": conf, "cisc": cisc},
                "per_class": {"gt_share": [0.9, 0.04, 0.06], "taught": taught, "pseudo_iou": iou}}

    runs = {(12, "unimatch", 0): {"diagnostics": diag([0.9, 0.0, 0.2], [0.9, 0.10, 0.5],
                                                      0.96, 0.6, 0.88, 0.80)},
            (12, "unimatch", 1): {"diagnostics": diag([0.9, 0.002, 0.004], [0.9, 0.14, 0.5],
                                                      0.98, 0.7, 0.86, 0.80)},
            (12, "ciscr", 0): {"diagnostics": diag([0.9, 0.005, 0.3], [0.9, 0.2, 0.6],
                                                   0.97, 0.8, 0.80, 0.85)}}
    lines = tables.diagnostic_findings(runs, 12, ["unimatch", "unimatch_cisc", "ciscr"], [0, 1])
    # pole: under 1 % in both rows (unimatch's mean 0.001); car: ciscr teaches 30 %.
    assert lines[0].endswith("in every row): pole, 4.0 % of the pool's pixels; their "
                             "pseudo-label IoU is at most 20.0 in any row.")
    assert "right 97.0-97.0 % of the time; 65.0-80.0 % of the pool's pixels pass" in lines[1]
    assert lines[1].endswith("pass (the range over the rows).")  # no per-class record: no more
    for k, mp in zip([(12, "unimatch", 0), (12, "unimatch", 1), (12, "ciscr", 0)],
                     [[0.99, None, 0.9], [0.97, None, 0.5], [0.98, 0.6, 0.95]], strict=True):
        runs[k]["diagnostics"]["per_class"]["mask_precision"] = mp
    # unimatch's car: mean of 0.9 and 0.5 = 0.7 (pole: none passed there, left out); ciscr's
    # pole 0.6 is the worst of any row's class means.
    assert tables.diagnostic_findings(runs, 12, ["unimatch", "ciscr"], [0, 1])[1].endswith(
        "per class (the pixels labelled as it that pass) it falls to 60.0 % (pole) in the worst "
        "row.")
    for k in runs:
        del runs[k]["diagnostics"]["per_class"]["mask_precision"]
    assert lines[2].endswith("the confidence 0.800-0.870, the CISC weight 0.800-0.850; the "
                             "CISC weight separates less well than the confidence in 1 of 2 rows.")
    assert tables.diagnostic_findings(runs, 46, ["unimatch"], [0]) == []
    # Where every diagnosis splits IoU into precision and recall, the line gives their maxima.
    for k, (p, r) in zip([(12, "unimatch", 0), (12, "unimatch", 1), (12, "ciscr", 0)],
                         [([1, 0.3, 1], [1, 0.2, 1]), ([1, 0.1, 1], [1, 0.4, 1]),
                          ([1, 0.2, 1], [1, 0.3, 1])], strict=True):
        runs[k]["diagnostics"]["per_class"].update(precision=p, recall=r)
    lines = tables.diagnostic_findings(runs, 12, ["unimatch", "unimatch_cisc", "ciscr"], [0, 1])
    # pole: unimatch's means 0.2 / 0.3, ciscr's 0.2 / 0.3 -> 20.0 / 30.0.
    assert lines[0].endswith("at most 20.0 in any row (precision / recall of their pseudo "
                             "labels, mean over the rows: pole 20.0 / 30.0).")
    # A class never labelled has no precision: left out of the means, n/a when none has one.
    for k in runs:
        runs[k]["diagnostics"]["per_class"]["precision"][1] = None
    lines = tables.diagnostic_findings(runs, 12, ["unimatch", "unimatch_cisc", "ciscr"], [0, 1])
    assert lines[0].endswith("labels, mean over the rows: pole n/a / 30.0).")


def test_a_table_whose_runs_differ_in_precision_or_cpu_says_which_ran_where():
    intel, amd = "Intel Xeon (bf16 native)", "AMD EPYC (bf16 emulated)"
    runs = {(12, "suponly", 0): {"precision": ["bf16"], "machines": [intel]},
            (12, "suponly", 1): {"precision": ["fp32"], "machines": [amd]},
            (12, "unimatch", 0): {"precision": ["bf16"], "machines": [intel]}}
    labels = {"suponly": "SupOnly", "unimatch": "UniMatch"}
    lines = tables.mixed_lines(runs, 12, ["suponly", "unimatch"], [0, 1, 2], labels)
    assert lines == [
        "- Not one precision for this table's runs (bf16: SupOnly s0, UniMatch s0; fp32: SupOnly "
        "s1): compare CPU minutes and mIoU within one precision only.",
        f"- Not one CPU for this table's runs ({amd}: SupOnly s1; {intel}: SupOnly s0, UniMatch "
        "s0): compare CPU minutes within one CPU only."]
    del runs[(12, "suponly", 1)]
    assert tables.mixed_lines(runs, 12, ["suponly", "unimatch"], [0, 1, 2], labels) == []


def test_a_compute_plan_resting_on_runs_of_two_cpus_is_marked(tmp_path):
    (tmp_path / "compute_match.json").write_text(json.dumps({
        "rows": ["unimatch_cisc"], "cpu_seconds": 3600, "suponly_cpu_seconds": 1200,
        "iterations": 1440}))
    a, b = {"machines": ["A"], "precision": ["fp32"]}, {"machines": ["B"], "precision": ["fp32"]}
    runs = {(12, "suponly_compute", 0): {"run_dir": str(tmp_path), **a},
            (12, "suponly", 0): dict(a), (12, "unimatch_cisc", 0): dict(b)}

    def row() -> str:
        return tables.table_plans(runs, [12], [0], {"suponly_compute": None})[2]

    assert row() == ("| 12 | 0 | suponly_compute | unimatch_cisc | 60.0 | 20.0 | 1440 | n/a "
                     "| MIXED (not matched): A, fp32; B, fp32 | A, fp32 |")
    runs[(12, "suponly_compute", 0)]["cpu_minutes"] = 57.25  # what the run then used
    assert "| 1440 | 57.2 | MIXED" in row()
    runs[(12, "unimatch_cisc", 0)] = dict(a)
    assert row().endswith("| one | the same |")
    # The compute run itself elsewhere (a later session's machine): its steps still hold.
    runs[(12, "suponly_compute", 0)].update(machines=["B"], precision=["bf16"])
    assert row().endswith("| one | B, bf16 |")
    runs[(12, "suponly", 0)]["precision"] = ["bf16"]  # one CPU, two precisions: not matched
    assert "| MIXED (not matched): A, bf16; A, fp32 |" in row()
    del runs[(12, "suponly", 0)]["machines"]
    assert "| not recorded |" in row()


def test_the_per_class_gaps_to_supOnly_at_the_same_cpu_time_by_hand():
    def rec(iou, partner=None):
        return {"iou": iou, "class_names": ["road", "pole", "car"], "val_miou": 0.5,
                **({"compute_partner": partner} if partner else {})}

    runs = {(12, "ciscr", 0): rec([0.90, 0.10, 0.60], "suponly_compute_ciscr"),
            (12, "ciscr", 1): rec([0.92, 0.00, 0.50], "suponly_compute_ciscr"),
            (12, "suponly_compute_ciscr", 0): rec([0.91, 0.20, 0.40]),
            (12, "suponly_compute_ciscr", 1): rec([0.93, 0.10, 0.50]),
            (12, "ciscr", 2): rec([0.99, 0.99, 0.99], "suponly_compute_ciscr")}  # no partner run
    lines = tables.class_gap_lines(runs, 12, [0, 1, 2], {"ciscr": "CISC-R"})
    # road -1.0 (both seeds), pole -10.0, car (+20, 0) -> +10.0; seed 2 has no pair.
    assert lines == ["- CISC-R (n=2): ahead on 1 of 3 classes (car +10.0); behind on 2 "
                     "(pole -10.0, road -1.0)"]


def test_a_split_with_no_finished_run_says_so_instead_of_empty_tables():
    runs = {(12, "suponly", 0): {"val_miou": 0.4}}  # another split's run
    md = rep.md_splits(runs, [46], [0], ["suponly"], {"suponly": "SupOnly"})
    assert md[0] == "## 46 labeled images" and len(md) == 4
    assert md[2].startswith("No run finished at this split yet")


def test_a_runs_cpu_time_comes_from_ciscrs_record_else_complete_wait4_else_unknown(tmp_path):
    def run(name: str, results: dict, wall: dict | None, starts: int) -> Path:
        rd = tmp_path / name
        rd.mkdir()
        (rd / "results.json").write_text(json.dumps(results))
        if wall is not None:
            (rd / "wall.json").write_text(json.dumps(wall))
        (rd / "machine.jsonl").write_text("{}\n" * starts)
        return rd

    own = run("own", {"cpu_seconds": 100.0, "wall_seconds": 120.0}, {"cpu_seconds": 5.0}, 3)
    assert records.run_cost(own)["cpu_seconds"] == 100.0 and records.run_cost(own)["includes_shared"]
    whole = run("whole", {}, {"cpu_seconds": 50.0, "seconds": 60.0, "invocations": 2}, 2)
    assert records.run_cost(whole)["cpu_seconds"] == 50.0
    # A session ended during the first of two invocations: wall.json lacks its CPU time.
    killed = run("killed", {}, {"cpu_seconds": 50.0, "seconds": 60.0}, 2)
    cost = records.run_cost(killed)
    assert cost["cpu_seconds"] is None and cost["cpu_source"].startswith("unknown")
    runs = {(12, "suponly", 0): {"cpu_seconds": 10.0, "wall_seconds": 20.0},
            (12, "ciscr", 0): {"cpu_seconds": 30.0, "wall_seconds": 40.0, "includes_shared": True}}
    records.add_totals(runs)  # ciscr's own record already holds its copied stage 1
    assert runs[(12, "ciscr", 0)]["cpu_minutes"] == 0.5
    # An older ciscr record without its copied stage 1: the suponly run's time is added once.
    older = {"cpu_seconds": 30.0, "wall_seconds": 40.0, "includes_shared": False}
    assert records.with_stage1("ciscr", older, runs[(12, "suponly", 0)]) == \
        {"cpu_seconds": 40.0, "wall_seconds": 60.0}
    assert records.with_stage1("ciscr", older, None)["cpu_seconds"] is None
    assert records.with_stage1("unimatch", older, runs[(12, "suponly", 0)])["cpu_seconds"] == 30.0


def test_a_seeds_cost_against_the_budget_counts_the_shared_stage_1_once():
    runs = {(12, "suponly", 0): {"cpu_minutes": 20.0, "wall_minutes": 30.0},
            (12, "unimatch", 0): {"cpu_minutes": 60.0, "wall_minutes": 80.0},
            (12, "ciscr", 0): {"cpu_minutes": 90.0, "wall_minutes": 110.0},  # 20 of it SupOnly's
            (12, "unimatch", 1): {"cpu_minutes": None, "wall_minutes": None}}  # unknown: skipped
    (line,) = tables.budget_lines(runs, 12, [0, 1], ["suponly", "unimatch", "ciscr"])
    # (20 + 60 + 90 - 20) = 150 CPU min -> 75 min on 2 cores; wall (30 + 80 + 110 - 30) / 2 = 95
    assert line.startswith("- seed 0 (suponly, unimatch, ciscr): 150 CPU min, 75 min")
    assert "measured wall / 2: 95 min" in line and line.endswith("(the issue's budget: 150; "
                                                                 "within it)")
    runs[(12, "unimatch", 0)]["cpu_minutes"] = 300.0  # 390 CPU min: 195 min at best
    (line,) = tables.budget_lines(runs, 12, [0, 1], ["suponly", "unimatch", "ciscr"])
    assert line.endswith("(the issue's budget: 150; OVER it by 45 min even at best)")


def test_the_queued_runs_are_estimated_from_the_measured_ones():
    runs = {(12, "suponly", 0): {"cpu_minutes": 20.0}, (12, "suponly", 1): {"cpu_minutes": 24.0},
            (12, "ciscr", 0): {"cpu_minutes": 90.0},  # 70 of its own + SupOnly's stage 1
            (12, "unimatch", 0): {"cpu_minutes": 60.0}}
    spec = {"curve": {"suponly_4n": 4}, "labels": {r: r for r in cl.ROWS},
            "compute": {"suponly_compute_ciscr": ["ciscr"], "suponly_compute_unimatch": ["unimatch"]}}
    assert tables.estimate_cpu(runs, 46, "ciscr", spec) == (70.0, "ciscr: 1 run(s) at another split")
    assert tables.estimate_cpu(runs, 12, "suponly_4n", spec)[0] == 4 * 22.0
    assert tables.estimate_cpu(runs, 12, "suponly_compute_ciscr", spec)[0] == 90.0  # its total
    assert tables.estimate_cpu(runs, 12, "fixmatch", spec)[0] is None
    lines = tables.queued_lines(runs, [(12, 1, "ciscr"), (12, 2, "ciscr"), (12, 1, "fixmatch"),
                                    (12, 1, "suponly_compute_unimatch")], spec)
    assert "| 12 | ciscr | 1, 2 | 70 |" in lines[2]
    # 2 x 70 (suponly_compute_unimatch listed, not counted: the rule usually shares it)
    assert lines[-1].startswith("In all about 140 CPU min, 1.2 h on 2 cores")
    assert "plus 1 run(s) not estimated" in lines[-1]


def test_break_even_reads_the_cpu_time_off_supOnlys_curve_by_hand():
    pts = [(480, 0.40, 20.0), (960, 0.50, 40.0), (1920, 0.55, 80.0)]  # iterations, mIoU, CPU
    assert tables.break_even(pts, 0.45) == (30.0, "linear between its runs of 480 and 960 iterations")
    assert tables.break_even(pts, 0.35)[0] == 20.0  # at most its smallest run's
    assert tables.break_even(pts, 0.60) == (None, "beyond its longest measured run (1920 iterations)")
    runs = {(12, "suponly", 0): {"iterations": 480, "val_miou": 0.40, "cpu_minutes": 20.0},
            (12, "suponly_2n", 0): {"iterations": 960, "val_miou": 0.50, "cpu_minutes": 40.0},
            (12, "unimatch", 0): {"val_miou": 0.45, "cpu_minutes": 60.0}}
    (line,) = tables.break_even_lines(runs, 12, 0, {"suponly_2n": 2}, {"unimatch": "UniMatch"})
    assert "about 30.0 CPU min" in line and "would have to cost 0.50 x its measured CPU time or less (<= 30.0 CPU min)" in line
    runs[(12, "unimatch", 0)]["precision"] = ["bf16"]  # another precision: minutes do not compare
    (line,) = tables.break_even_lines(runs, 12, 0, {"suponly_2n": 2}, {"unimatch": "UniMatch"})
    assert line == ("- UniMatch: not read off the curve (it ran on another CPU or in another "
                    "precision than SupOnly's run at N)")


def test_the_lever_costs_line_reads_the_levers_benchmark(tmp_path):
    rec = {"mean_step_seconds": {"unimatch_cisc": 8.0, "half": 4.0, "memory": 9.0, "suponly": 2.0},
           "overrides": {"unimatch_cisc": [], "half": ["train.unlabeled_resolution=0.5"],
                         "memory": ["method.prototype_source=memory"], "suponly": []}}
    (tmp_path / "levers.json").write_text(json.dumps(rec))
    line = tables.lever_costs_line(tmp_path / "levers.json", [["train.unlabeled_resolution=0.5"]])
    assert "`train.unlabeled_resolution=0.5` 0.50" in line and "memory" not in line
    assert "missing" in tables.lever_costs_line(tmp_path / "none.json", [])


def test_bad_paths_stop_the_queue_with_one_line_before_any_run(tmp_path, capsys):
    import pytest

    for flag, value, says in (("--data", str(tmp_path / "none"), "not a directory"),
                              ("--weights", str(tmp_path / "no.pth"), "no such file")):
        with pytest.raises(SystemExit) as exit_:  # --data: a real folder unless it is tested
            cl.main(["--data", str(tmp_path), flag, value, "--runs", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "o")])
        assert exit_.value.code == 2
        assert f"{flag} {value}: {says}" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_the_supOnly_run_nearest_a_rows_steps_is_picked_by_steps_alone():
    def rec(m, it):
        return {"val_miou": m, "iterations": it}

    runs = {(12, "ciscr", 0): rec(0.5, 1440), (12, "suponly", 0): rec(0.4, 480),
            (12, "suponly_compute", 0): rec(0.45, 1260),  # |log(1260/1440)| = 0.134
            (12, "suponly_compute_ciscr", 0): rec(0.6, 1680),  # |log(1680/1440)| = 0.154
            (12, "unimatch", 0): rec(0.9, 1440),  # not a SupOnly row: never the reference
            (12, "ciscr", 1): rec(0.5, 1440), (12, "suponly_0.5n", 1): rec(0.3, 1200),
            (12, "suponly_2n", 1): rec(0.35, 1728),  # a tie by ratio (1.2x): the fewer steps
            (12, "ciscr", 2): rec(0.5, 1440)}  # no SupOnly run at seed 2
    assert records.nearest_steps(runs, 12, "ciscr", [0, 1, 2]) == ([0.45, 0.3, None],
                                                                   [1260, 1200, None])
    runs[(12, "suponly", 2)] = rec(0.2, 480)  # 3x fewer steps: not "about equal"
    runs.update({(12, "suponly", s): rec(0.4, 480) for s in (0, 1)})
    assert records.nearest_steps(runs, 12, "ciscr", [2]) == ([None], [None])
    runs[(12, "suponly_compute_ciscr", 2)] = rec(0.55, 2160)  # 1.5x: just near enough
    line = rep.steps_matched(runs, 12, "ciscr", [0, 1, 2])
    assert line.startswith("; it trains 1440 iterations in all, and against the SupOnly run "
                           "nearest that many steps (within 1.5x) at each seed (1260 / 1200 / 2160 iterations)")
    runs[(12, "unimatch", 0)]["iterations"] = 480  # N, as SupOnly: equal steps, no line
    assert rep.steps_matched(runs, 12, "unimatch", [0, 1, 2]) == ""


def test_a_set_aside_run_is_listed_with_its_result(tmp_path):
    rd = tmp_path / "camvid_labels-runs" / "superseded" / "l12" / "suponly_s2"
    rd.mkdir(parents=True)
    (rd / "results.json").write_text(json.dumps({"final_metrics": {"miou": 0.43}}))
    assert rep.superseded_lines(tmp_path / "camvid_labels-runs") == [
        "- set aside, not in the tables: `l12/suponly_s2`, val mIoU 43.00 (why: "
        "camvid_labels-runs/superseded/README.md)"]
    assert rep.superseded_lines(tmp_path / "elsewhere") == []


def test_evaluations_are_placed_at_the_cpu_time_of_their_stage(tmp_path):
    # Stage 1 (copied, 600 CPU s, 4 iterations), pseudo-labelling (120 s), stage 2 (240 s).
    rd = tmp_path / "ciscr_s0"
    for st, its in (("stage1", 4), ("stage2", 4)):
        (rd / st).mkdir(parents=True)
        (rd / st / "train.jsonl").write_text("".join(
            json.dumps({"iteration": i, **({"val_miou": i / 10} if i % 2 == 0 else {})}) + "\n"
            for i in range(1, its + 1)))
    (rd / "results.json").write_text(json.dumps({
        "final_metrics": {"miou": 0.5, "iou": [0.5]}, "cpu_seconds": 960.0,
        "stages": {"stage1": {"cpu_seconds": 600.0}, "pseudo0": {"cpu_seconds": 120.0},
                   "stage2": {"cpu_seconds": 240.0}}}))
    rec = records.collect(rd, 12, "ciscr", 0)
    assert rec["evals"] == [(2, 0.2), (4, 0.4), (6, 0.2), (8, 0.4)]
    # minutes: 300 s, 600 s; then 720 + 120, 720 + 240 s
    assert rec["evals_cpu_minutes"] == [5.0, 10.0, 14.0, 16.0]
    res = json.loads((rd / "results.json").read_text())
    del res["stages"]["pseudo0"]["cpu_seconds"]  # a stage without its CPU: no placement
    (rd / "results.json").write_text(json.dumps(res))
    assert records.collect(rd, 12, "ciscr", 0)["evals_cpu_minutes"] is None


def test_supOnlys_curve_for_the_cpu_figure_keeps_its_seeds_machine_and_precision():
    a = {"machines": ["A (bf16 native)"], "precision": ["bf16"]}
    runs = {(12, "suponly", 1): {"iterations": 480, "val_miou": 0.4, "cpu_minutes": 10.0, **a},
            (12, "suponly_compute", 1): {"iterations": 1332, "val_miou": 0.45,
                                         "cpu_minutes": 28.0, **a},
            (12, "suponly_compute_ciscr", 1): {"iterations": 2112, "val_miou": 0.43,
                                               "cpu_minutes": 90.0, "machines": ["B"],
                                               "precision": ["fp32"]}}
    ref = runs[(12, "suponly", 1)]
    assert [p[0] for p in records.curve_points(runs, 12, 1, cl.CURVE)] == [480, 1332, 2112]
    assert [p[0] for p in records.curve_points(runs, 12, 1, cl.CURVE, like=ref)] == [480, 1332]
    assert records.same_machine(ref, runs[(12, "suponly_compute", 1)])
    assert not records.same_machine(ref, {**a, "precision": ["fp32"]})  # one CPU, two precisions


def test_supOnlys_runs_at_a_larger_split_are_tabled_where_two_lengths_finished():
    def rec(it, m):
        return {"iterations": it, "val_miou": m, "cpu_minutes": it / 40}

    runs = {(12, "suponly", 0): rec(480, 0.4), (46, "suponly", 0): rec(480, 0.45)}
    assert rep.other_curves(runs, [12, 46], 0, cl.CURVE) == []  # one length: no table
    runs[(46, "suponly_compute", 0)] = rec(960, 0.50)
    md = rep.other_curves(runs, [12, 46, 23], 0, cl.CURVE)
    assert md[0].startswith("SupOnly's runs at 46 labels (seed 0")
    assert md[-2] == "| 960 | 50.00 | 24.0 | +5.00 (x2.0 steps) |"


def test_options_are_tabled_at_each_seed_they_ran_with_their_cost_per_cpu_hour():
    def rec(its: int, miou: float, cpu: float) -> dict:
        return {"iterations": its, "val_miou": miou, "cpu_minutes": cpu, "wall_minutes": cpu,
                "precision": ["bf16"], "machines": ["AMD EPYC (bf16 native)"]}
    runs = {(12, "suponly", 0): rec(480, 0.40, 20.0),
            (12, "suponly", 2): rec(480, 0.40, 10.0),
            (12, "suponly_compute", 2): {**rec(1440, 0.50, 30.0), "run_dir": "none"},
            (12, "unimatch_cisc", 2): {**rec(480, 0.42, 30.0), "compute_partner": "suponly_compute"},
            (12, "unimatch_cisc_halfres", 2): rec(480, 0.46, 20.0),   # pays: SupOnly needs 22
            (12, "unimatch_cisc_every2", 2): rec(480, 0.41, 20.0)}    # does not: SupOnly needs 12
    spec = {"levers": ["unimatch_cisc_halfres", "unimatch_cisc_every2"], "curve": {},
            "queued": [(12, 2, "stpp")]}
    labels = {r: v[0] for r, v in cl.ROWS.items()}
    md = "\n".join(rep.md_options(runs, 12, [0, 1, 2], spec, labels))
    assert "## Options (12 labels, seed 0)" in md and "## Options (12 labels, seed 1)" not in md
    seed2 = md.split("## Options (12 labels, seed 2)")[1]
    assert "| UniMatch + CISC, unlabeled views at half resolution | 46.00 | 46.00 | +6.00 (n=1)" in seed2
    assert ("- UniMatch + CISC, unlabeled views at half resolution: 46.00 at 20.0 CPU min; SupOnly's "
            "curve reaches that at about 22.0 CPU min (linear between its runs of 480 and 1440 "
            "iterations): to break even per CPU hour the row would have to cost 1.10 x its measured "
            "CPU time or less (<= 22.0 CPU min) at the same mIoU: it pays per CPU hour already") in seed2
    every2 = next(x for x in seed2.splitlines() if x.startswith("- UniMatch + CISC, unlabeled branch"))
    assert "0.60 x" in every2 and "already" not in every2
    assert "Per CPU hour at seed 0" not in md  # no option finished at seed 0
