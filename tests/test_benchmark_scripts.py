"""The pure helpers of benchmarks/ (the CamVid comparison's scheduling and its diagnostic)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import camvid  # noqa: E402
import camvid_diagnostics as diag  # noqa: E402
import camvid_figures as figs  # noqa: E402

from ciscr.methods import RECIPES  # noqa: E402


def test_chains_run_the_target_rows_seed_by_seed_then_the_others_then_the_options():
    chains = camvid.chains(camvid.MAIN + camvid.OPTIONS, [0, 1])
    flat = [r for c in chains for r in c]
    assert len(flat) == len(set(flat))
    assert ("suponly", 0) not in flat and ("st", 0) in flat  # SupOnly is the ST run's stage 1
    for c in chains:
        if ("ciscr_bank", 0) in c:  # the bank row copies CISC-R's stages: it follows it
            assert c == [("ciscr", 0), ("ciscr_bank", 0)]
        if ("st", 1) in c:  # ST copies ST++'s stage 1 and its pseudo labels
            assert c == [("stpp", 1), ("st", 1)]
    main = [r for r in flat if r[0] not in camvid.OPTIONS and r[0] not in camvid.LATER]
    assert [s for _, s in main] == sorted(s for _, s in main)  # all of seed 0 before seed 1
    # the rows no target needs wait for the target rows of every seed
    assert flat.index(("fixmatch", 0)) > flat.index(("stpp", 1))
    assert flat.index(("fixmatch", 1)) > flat.index(("fixmatch", 0))
    first_option = min(i for i, r in enumerate(flat) if r[0] in camvid.OPTIONS)
    assert all(r[0] in camvid.OPTIONS for r in flat[first_option:])
    for row in camvid.ROWS:  # every row is a registered method, its base row too
        assert camvid.ROWS[row][1] in RECIPES
        assert camvid.BASE.get(row, "suponly") in camvid.ROWS


def test_targets_are_paired_means_and_say_when_unmeasured():
    runs = {(r, s): {"val_miou": v} for r, s, v in [
        ("ciscr", 0, 0.40), ("ciscr", 1, 0.42), ("suponly", 0, 0.36), ("suponly", 1, 0.40),
        ("unimatch", 0, 0.50)]}
    lines = camvid.targets(runs, [0, 1])
    assert lines[0] == "- CISC-R >= SupOnly + 3: MET (+3.00 points, paired mean)"
    assert lines[1] == "- CISC-R >= ST++: not measured yet"
    assert lines[2].startswith("- UniMatch >= SupOnly + 5: MET (+14.00")
    assert camvid.shipped_row() == "ciscr"  # configs/camvid.yaml's method.name
    assert lines[4].startswith("- `ciscr run camvid` (CISC-R (query, one class)")
    assert lines[4].endswith("MET (+3.00 points, paired mean)")
    tie = {**runs, ("ciscr", 0): {"val_miou": 0.36}, ("ciscr", 1): {"val_miou": 0.40}}
    assert camvid.targets(tie, [0, 1])[4].endswith("MISSED (+0.00 points, paired mean)")


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
    assert camvid.paired_difference([0.3, None], [0.3, 0.2]) == "+0.00 (n=1)"
    assert camvid.paired_difference([None], [0.3]) == "n/a"


def test_demo_time_flags_a_machine_whose_speed_moved_during_the_demo():
    import demo_time

    assert demo_time.steadiness(200.0, 220.0) == []  # +10 %: steady
    noisy = demo_time.steadiness(212.0, 408.0)  # the machine slowed to half its speed
    assert noisy[0].startswith("> NOISY: the reference step changed by +92 %")
    assert demo_time.steadiness(400.0, 200.0)[0].startswith("> NOISY: the reference step changed by -50 %")


def test_in_progress_reads_the_checkpoint_and_projects_the_rest_of_the_stage(tmp_path):
    from ciscr.engine.checkpoint import save_checkpoint

    args = camvid.parse_args(["--runs", str(tmp_path)])
    rd = camvid.run_dir(args, "unimatch", 0)
    (rd / "online").mkdir(parents=True)
    save_checkpoint(rd / "online" / "checkpoint.pt", {"iteration": 600, "total_iters": 960})
    (rd / "online" / "train.jsonl").write_text(
        "".join(f'{{"iteration": {i}, "step_seconds": {s}}}\n' for i, s in
                [(580, 9.0), (590, 10.0), (600, 11.0)]))
    bank = camvid.run_dir(args, "ciscr_bank", 0)  # shared stages copied, nothing trained yet
    for stage in ("stage1", "pseudo0"):
        (bank / stage).mkdir(parents=True)
        (bank / stage / "done.json").write_text("{}")
    lines = camvid.in_progress(args, {}, ["unimatch", "ciscr_bank", "ciscr"], [0])
    # 360 iterations left at the median 10 s = 1.0 h; a run not started has no line
    assert lines == [
        "- in progress: UniMatch s0: online at iteration 600/960 (its checkpoint); the rest of "
        "online ~1.0 h at its recent 10.0 s/step",
        "- in progress: CISC-R (bank, all classes) s0: done pseudo0, stage1"]


def test_superseded_runs_are_listed_finished_or_stopped_with_their_reason(tmp_path):
    args = camvid.parse_args(["--runs", str(tmp_path / "p"), "--out", str(tmp_path / "o")])
    root = tmp_path / "p-superseded"
    done, stopped = root / "stpp_e160", root / "unimatch_e160"
    for stage, its in ((done / "stage1", 1920), (done / "stage2", 1936), (stopped / "online", 950)):
        stage.mkdir(parents=True)
        (stage / "train.jsonl").write_text(f'{{"iteration": {its - 10}}}\n{{"iteration": {its}}}\n')
    for stage, miou in ((done / "stage1", 0.5782), (done / "stage2", 0.5119)):
        (stage / "done.json").write_text(f'{{"val_miou": {miou}}}')
    (done / "REASON.txt").write_text("budget too small\n")
    lines = camvid.table_superseded(args)
    assert "| `stpp_e160` | budget too small | stage2: 1936 | 51.19 (stage2) | 57.82 |" in lines
    assert "| `unimatch_e160` | - | online: 950 (not finished) | - |  |" in lines
    # Archived (the stopped stage too: a superseded run never resumes), the machine then lost:
    # the table is the same from the archive, and an earlier snapshot file is linked.
    import archive

    archive.mirror(root, camvid.archive_root(args, superseded=True), unfinished=True)
    shutil.rmtree(root)
    (tmp_path / "o" / "camvid_superseded_2026-01-01.md").write_text("# earlier\n")
    again = camvid.table_superseded(args)
    assert [x for x in again if x.startswith("| `")] == [x for x in lines if x.startswith("| `")]
    assert any("[camvid_superseded_2026-01-01.md]" in x for x in again)


def _finished_stage(stage: Path, miou: float, its: int) -> None:
    import json

    stage.mkdir(parents=True)
    (stage / "train.jsonl").write_text(json.dumps({"iteration": its}) + "\n")
    (stage / "metrics.json").write_text(json.dumps({"miou": miou, "iou": [miou]}))
    (stage / "done.json").write_text(json.dumps({"val_miou": miou, "wall_seconds": 1.0}))
    (stage / "checkpoint.pt").write_bytes(b"x" * 10)  # never archived
    (stage / "tb").mkdir()
    (stage / "tb" / "events.json").write_text("{}")  # TensorBoard's folder: never archived


def test_archive_keeps_the_small_artefacts_of_finished_stages_only(tmp_path):
    import archive

    run = tmp_path / "runs" / "stpp_s0"
    _finished_stage(run / "stage1", 0.5, 100)
    (run / "stage2").mkdir()
    (run / "stage2" / "train.jsonl").write_text('{"iteration": 10}\n')  # unfinished: not kept
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "run.log").write_text("log\n")
    assert [str(p) for p in archive.small_artefacts(run)] == [
        "config.yaml", "stage1/done.json", "stage1/metrics.json", "stage1/train.jsonl"]
    assert "stage2/train.jsonl" in [str(p) for p in archive.small_artefacts(run, True)]
    dst = tmp_path / "archive"
    assert archive.mirror(tmp_path / "runs", dst) == 4
    assert archive.mirror(tmp_path / "runs", dst) == 0  # unchanged files are not rewritten
    assert archive.locate([run], dst, "stage1/metrics.json") == run  # here first
    shutil.rmtree(tmp_path / "runs")
    assert archive.locate([run], dst, "stage1/metrics.json") == dst / "stpp_s0"
    assert archive.locate([run], dst, "results.json") is None


def _saved_config(args, row: str, rd: Path, *changes: str) -> None:
    """The resolved config a run of ``row`` (seed 0) writes, with ``changes``."""
    from ciscr.config import load_config, save_config

    rd.mkdir(parents=True, exist_ok=True)
    save_config(load_config("camvid", camvid.row_overrides(args, row, 0) + list(changes)),
                rd / "config.yaml")


def test_a_run_finished_on_a_lost_machine_is_read_from_the_archive_and_not_rerun(tmp_path):
    import json

    import archive

    args = camvid.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"),
                              "--data", str(tmp_path / "no-data")])  # a run started would fail
    stpp = camvid.run_dir(args, "stpp", 0)
    _finished_stage(stpp / "stage1", 0.61, 3840)  # SupOnly s0 finished, ST++ still training
    _saved_config(args, "stpp", stpp)
    archive.mirror(Path(args.runs), camvid.archive_root(args))
    shutil.rmtree(tmp_path / "runs")  # the machine is gone
    assert camvid.finished_dir(args, "suponly", 0) == camvid.archive_root(args) / stpp.name
    assert camvid.collect(args, "suponly", 0)["val_miou"] == 0.61
    assert camvid.collect(args, "stpp", 0) is None  # not finished: runs again (from scratch)
    uni = camvid.run_dir(args, "unimatch", 0)
    arch = camvid.archive_root(args) / uni.name
    _finished_stage(arch / "online", 0.65, 3854)
    _saved_config(args, "unimatch", arch, "data.root=/elsewhere")  # another machine's paths
    (arch / "results.json").write_text(json.dumps(
        {"final_metrics": {"miou": 0.65, "iou": [0.65]}, "stages": {
            "online": {"val_miou": 0.65, "wall_seconds": 1.0}}}))
    camvid.run_one(args, "unimatch", 0)  # would start `ciscr run` (and fail here) if not skipped
    assert not uni.exists()
    assert camvid.collect(args, "unimatch", 0)["iterations"] == 3854
    # Made under another protocol (here: another crop): not a result of this one.
    _saved_config(args, "unimatch", arch, "train.crop_size=160")
    assert camvid.finished_dir(args, "unimatch", 0) is None
    assert camvid.collect(args, "unimatch", 0) is None


def test_suponly_is_read_from_st_plus_plus_until_st_has_copied_stage1(tmp_path):
    args = camvid.parse_args(["--runs", str(tmp_path)])
    st, stpp = camvid.run_dir(args, "st", 0), camvid.run_dir(args, "stpp", 0)
    assert camvid.run_dir(args, "suponly", 0) == st  # nothing run yet
    (stpp / "stage1").mkdir(parents=True)
    (stpp / "stage1" / "metrics.json").write_text("{}")
    assert camvid.run_dir(args, "suponly", 0) == stpp
    camvid.share_stages(args, "st", 0)  # needs stage1's done.json: not there yet
    assert not (st / "stage1").exists()
    (stpp / "stage1" / "done.json").write_text("{}")
    camvid.share_stages(args, "st", 0)
    assert (st / "stage1" / "metrics.json").exists()
    assert (st / "stage1" / camvid.COPIED).read_text().strip() == str(stpp / "stage1")
    assert camvid.run_dir(args, "suponly", 0) == st


def test_items_moved_reports_paired_rows_and_says_what_is_not_measured(tmp_path):
    import json

    args = camvid.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    runs = {("ciscr_bank", 0): {"val_miou": 0.40}, ("bank_warm", 0): {"val_miou": 0.43},
            ("st", 0): {"val_miou": 0.45, "bn_recalibrated": {"before": 0.45, "after": 0.44}}}
    lines = camvid.items_moved(args, runs, [0])
    assert "not counted yet" in lines[4]  # no camvid_pairs.json in --out
    assert lines[-1].endswith("on CISC-R (bank): +3.00 (n=1).")
    assert "x teacher confidence n/a" in lines[6]
    assert "after - before: -1.00 (n=1)" in lines[7]
    off = {"both_crops_ge_3pct": 0.25, "class_absent_from_a_crop": 0.4, "crops_per_pair": 2.0}
    on = {"both_crops_ge_3pct": 1.0, "class_absent_from_a_crop": 0.0, "crops_per_pair": 3.5}
    q = {"single_crop_ge_3pct": 0.6, "rule_finds_none": 0.0}
    (tmp_path / "camvid_pairs.json").write_text(json.dumps(
        {"pairs_rule_off": off, "pairs_rule_on": on, "query": q}))
    assert "both crops 25.0 % -> 100.0 %" in camvid.items_moved(args, runs, [0])[4]


def test_budget_reading_says_whether_supOnly_levelled_off_at_the_protocols_budget():
    import camvid_budget as cb

    from ciscr.config import load_config

    used = load_config("camvid").train.epochs

    def curve(miou):
        return {"final": {"miou": miou}}

    rising = {(used // 2, 0): curve(0.44), (used, 0): curve(0.49), (2 * used, 0): curve(0.51)}
    lines = cb.reading(rising, [used // 2, used, 2 * used], [0])
    assert lines[1].startswith(f"- from {used} to {2 * used} epochs")
    assert f"{used} -> {2 * used} epochs moves SupOnly by +2.00 points: still improving" in lines[2]
    flat = {**rising, (2 * used, 0): curve(0.495)}
    assert "+0.50 points: levelled off" in cb.reading(flat, [used // 2, used, 2 * used], [0])[2]
    assert len(cb.reading({(used, 0): curve(0.49)}, [used, 2 * used], [0])) == 1  # nothing to say
    logged = {(used, 0): {"final": {"miou": 0.5}, "val": [(i, 0.4 + i / 1000) for i in (30, 60, 90)]}}
    assert cb.reading(logged, [used], [0])[1] == (
        f"- val mIoU over the last third of the {used}-epoch run(s): 49.0 to 49.0 (1 evaluations)")


def test_gpu_check_runs_its_checks_and_reports_them_on_a_cpu(tmp_path):
    import json

    import gpu_check

    rc = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--only", "info,run suponly"])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and [c["name"] for c in res["checks"]] == ["info", "run suponly (bf16)"]
    assert all(c["passed"] and c["rc"] == 0 for c in res["checks"])
    assert (tmp_path / "runs" / "suponly" / "results.json").exists()
    assert "| run suponly (bf16) | PASS | 0 |" in (tmp_path / "gpu_check.md").read_text()
    names = [c.name for c in gpu_check.checks(tmp_path, "cuda:0")]
    assert "run ciscr_bank (fp16, loss scaling)" in names and "bench --quick" in names
    assert not any("fp16" in c.name or "bench" in c.name for c in gpu_check.checks(tmp_path, "cpu"))
    bad = gpu_check.Check("fails", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    gpu_check.run_check(bad, tmp_path / "bad.log")
    assert bad.result["rc"] == 3 and not bad.result["passed"] and bad.result["tail"] == ["boom"]
    slow = gpu_check.Check("slow", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    gpu_check.run_check(slow, tmp_path / "slow.log")
    assert slow.result["rc"] == "timeout" and not slow.result["passed"]


def test_online_cisc_source_prototype_cosines_by_hand():
    import online_cisc_source as ocs

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 5.0], [3.0, 0.0]])
    cos = ocs.prototype_cosines(a, b, torch.tensor([True, True, False]))
    assert cos[0] == pytest.approx(2 ** -0.5) and cos[1] == pytest.approx(1.0) and cos[2] is None


def test_online_cisc_source_averages_two_models_state_by_hand():
    import online_cisc_source as ocs

    a, b = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([1.0, 3.0]))
        b.weight.copy_(torch.tensor([3.0, -1.0]))
    a.running_mean.fill_(2.0)
    a.num_batches_tracked.fill_(7)
    avg = ocs.averaged_model(a, b)
    assert avg.weight.tolist() == [2.0, 1.0] and avg.running_mean.tolist() == [1.0, 1.0]
    assert avg.num_batches_tracked.item() == 7 and a.weight.tolist() == [1.0, 3.0]  # a untouched


def test_online_cisc_source_measures_a_tiny_unimatch_cisc_run(tmp_path):
    """A 4-iteration UniMatch + CISC run: its memory, its bank as trained, a fresh bank and a
    'stale' bank and an averaged one (here from the same checkpoint, so identical to the fresh
    one) are scored; a checkpoint without a memory gets a simulated one."""
    import online_cisc_source as ocs

    from ciscr.cli import main

    out = tmp_path / "run"
    args = ["run", "synthetic", "--out", str(out), f"data.root={tmp_path / 'data'}",
            "method.name=unimatch_cisc", "method.confidence_threshold=0.5", "train.epochs=1",
            "train.unlabeled_epochs=0", "train.iters_per_epoch=4", "train.batch_size=4",
            "train.crop_size=32", "train.progress=false", "data.synthetic.num_train=16",
            "data.synthetic.num_val=2", "data.synthetic.size=32", "data.labeled=8",
            "report=false", "device=cpu", "method.score_final_pseudo=false",
            "method.prototype_refresh=3"]  # fmt: skip
    assert main(args) == 0
    ckpt = out / "online" / "checkpoint.pt"
    res = ocs.measure(out, max_images=3, stale=ckpt)
    assert res["iteration"] == "4/4" and res["images"] == 3
    scored = [sig for sig in ocs.SIGNALS if sig in res]
    assert scored == ["memory", "trained_bank", "bank", "stale_bank", "averaged_bank", "confidence"]
    for sig in scored:
        total = res[sig]["pixels_correct"] + res[sig]["pixels_wrong"]
        assert total > 0 and res[f"{sig}_confident"]["pixels_correct"] <= res[sig]["pixels_correct"]
    assert res["stale_bank"] == res["bank"]  # same model: the same bank, the same weights
    assert res["averaged_bank"] == res["bank"]  # a model averaged with itself is itself
    stale = [c for c in res["prototype_cosine"]["stale_bank"] if c is not None]
    assert stale and all(c == pytest.approx(1.0) for c in stale)
    # The bank as trained was refreshed at iteration 3 by another model: not the same.
    assert res["prototype_cosine"]["trained_bank"] != res["prototype_cosine"]["stale_bank"]
    text = "\n".join(ocs.markdown([res, res], [out, out]))
    assert "the run's EMA memory" in text and "± 0.000" in text
    sources, it = ocs.checkpoint_sources(ckpt)
    assert set(sources) == {"memory", "trained_bank"} and it == "4/4"
    # A checkpoint without a memory (UniMatch alone) gets one simulated at its model.
    state = torch.load(ckpt, weights_only=True)
    state["step_state"] = None
    torch.save(state, tmp_path / "plain.pt")
    res = ocs.measure(out, max_images=2, checkpoint=tmp_path / "plain.pt")
    assert "simulated_memory" in res and "memory" not in res and "trained_bank" not in res
    assert any(c is not None for c in res["prototype_cosine"]["simulated_memory"])


def test_budget_curves_come_from_runs_then_archive_then_the_previous_record(tmp_path):
    import json

    import archive
    import camvid_budget as cb

    args = cb.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    rd = cb.run_dir(args, 20, 0)
    _finished_stage(rd / "stage1", 0.40, 240)
    live = cb.load_curves(args, [(20, 0)])[(20, 0)]
    assert live["final"]["miou"] == 0.40 and "from_record" not in live
    archive.mirror(Path(args.runs), cb.archive_root(args))
    shutil.rmtree(tmp_path / "runs")
    assert cb.load_curves(args, [(20, 0)])[(20, 0)] == live  # from the archive
    record = {"e40_s0": {"loss": [[480, 0.5]], "val": [], "final": {"miou": 0.44, "iou": []}},
              "e80_s0": {"loss": [[100, 0.9]], "val": [], "final": None}}  # unfinished
    (tmp_path / "o" / "camvid_budget.json").write_text(json.dumps(record))
    curves = cb.load_curves(args, [(20, 0), (40, 0), (80, 0)])
    assert curves[(40, 0)]["from_record"] and curves[(40, 0)]["final"]["miou"] == 0.44
    assert curves[(80, 0)] is None  # an unfinished run is not a result, and cannot resume
    assert cb.provenance(curves) == [
        "- read from the previous `camvid_budget.json` (their runs were lost with the machine "
        "that trained them, before their artefacts were archived): 40 epochs s0"]


def test_supersede_moves_the_run_and_its_archived_copy_with_the_reason(tmp_path):
    import archive

    args = camvid.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    rd = camvid.run_dir(args, "stpp", 0)
    _finished_stage(rd / "stage1", 0.6, 3840)
    _saved_config(args, "stpp", rd)
    archive.mirror(Path(args.runs), camvid.archive_root(args))
    assert camvid.finished_dir(args, "suponly", 0) == rd
    argv = ["--runs", args.runs, "--out", args.out, "--supersede", rd.name, "--as", "old",
            "--reason", "a protocol\nchange"]
    camvid.supersede(camvid.parse_args(argv))
    assert camvid.finished_dir(args, "suponly", 0) is None  # neither copy counts any more
    for root in (camvid.superseded_root(args), camvid.archive_root(args, superseded=True)):
        assert (root / "old" / "REASON.txt").read_text() == "a protocol change\n"
    assert any(x.startswith("| `old` | a protocol change | stage1: 3840 |")
               for x in camvid.table_superseded(args))
    with pytest.raises(SystemExit, match="no run"):
        camvid.supersede(camvid.parse_args(argv))
    assert camvid.report_argv(argv + ["--jobs", "2", "--report-only"]) == [
        "--runs", args.runs, "--out", args.out, "--jobs", "2"]


def test_suponly_prefers_a_run_on_this_machine_to_an_archived_one(tmp_path):
    import archive

    args = camvid.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    st, stpp = camvid.run_dir(args, "st", 0), camvid.run_dir(args, "stpp", 0)
    _finished_stage(st / "stage1", 0.60, 3840)
    _saved_config(args, "st", st)
    archive.mirror(Path(args.runs), camvid.archive_root(args))
    shutil.rmtree(st)  # ST's copy lost with its machine; ST++ trained stage 1 here again
    _finished_stage(stpp / "stage1", 0.61, 3840)
    _saved_config(args, "stpp", stpp)
    assert camvid.finished_dir(args, "suponly", 0) == stpp
    assert camvid.collect(args, "suponly", 0)["val_miou"] == 0.61
