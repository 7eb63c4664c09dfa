"""The pure helpers of benchmarks/ (the CamVid comparison's scheduling and its diagnostic)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import camvid_diagnostics as diag  # noqa: E402
import camvid_figures as figs  # noqa: E402


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


def test_demo_time_flags_a_machine_whose_speed_moved_during_the_demo():
    import demo_time

    assert demo_time.steadiness(200.0, 220.0) == []  # +10 %: steady
    noisy = demo_time.steadiness(212.0, 408.0)  # the machine slowed to half its speed
    assert noisy[0].startswith("> NOISY: the reference step changed by +92 %")
    assert demo_time.steadiness(400.0, 200.0)[0].startswith("> NOISY: the reference step changed by -50 %")


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




def test_line_kinds_tells_code_from_prose_comments_and_blanks(tmp_path):
    import line_kinds

    f = tmp_path / "m.py"
    f.write_text('"""Doc\nstring."""\n\n# a comment\nX = 1  # not a comment line\n'
                 'NOTE = """\n1\n2\n3\n"""\n')
    assert line_kinds.line_kinds(f) == {"lines": 10, "blank": 1, "comment": 1, "prose": 7,
                                        "code": 1}
    assert line_kinds.main([str(tmp_path / "missing.py")]) == 1


def test_suite_time_reads_pytest_summary_without_its_time_and_the_slowest_tests():
    import suite_time

    out = "....\n=========== 506 passed, 1 skipped in 461.23s (0:07:41) ===========\n"
    assert suite_time.summary_counts(out) == "506 passed, 1 skipped"
    assert suite_time.summary_counts("3 failed, 2 passed in 1.0s") == "3 failed, 2 passed"
    with pytest.raises(SystemExit):
        suite_time.summary_counts("no summary here")
    out = ("....\n=== slowest 3 durations ===\n41.20s call     tests/a.py::test_x\n"
           "9.01s setup    tests/b.py::test_y\n\n(1 durations < 0.005s hidden.)\n"
           "=== 2 passed in 50.3s ===\n")
    assert suite_time.slowest(out) == ["41.20s call     tests/a.py::test_x",
                                       "9.01s setup    tests/b.py::test_y"]
    assert suite_time.slowest("2 passed in 1.0s") == []


def test_precision_ratio_writes_both_steps_with_the_cpu(tmp_path, monkeypatch):
    import precision_ratio

    monkeypatch.setattr(sys, "argv", ["precision_ratio.py", "--repeats", "1", "--warmup", "0",
                                      "--batch", "2", "--crop", "32", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        assert precision_ratio.main() == 0
    finally:
        torch.set_num_threads(threads)
    (page,) = tmp_path.glob("precision_*.md")
    text = page.read_text()
    assert "- fp32 step: " in text and "- bf16 step: " in text and "bf16 / fp32 time: " in text
    assert "train.amp=auto picks" in text and "- machine: " in text


def test_camvid_levers_reads_steps_and_tabulates_ratios(tmp_path):
    import camvid_levers as lev

    (tmp_path / "online").mkdir()
    recs = [{"iteration": i, "step_seconds": s} for i, s in enumerate([9.0, 6.0, 4.0, 5.0], 1)]
    recs.append({"iteration": 4, "val_miou": 0.5})
    (tmp_path / "online" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert lev.step_seconds(tmp_path, skip=1) == [6.0, 4.0, 5.0]
    med = {name: 8.0 for name in lev.LEVERS} | {"suponly": 2.0, "one_strong_view": 6.0}
    page = lev.format_table(med, steps=6, skip=2)
    assert "| one strong view instead of two | `method.strong_views=1` | 6.00 | 3.00 | 0.75 |" in page
    assert "`method.unlabeled_every=2`" in page
    assert "`method.mix_source=batch`" in page  # the cheaper pseudo-labelling forward
    assert "steps 3-6" in page and "no setting in ciscr yet: none." in page


def test_readme_suite_time_is_the_measured_one_or_says_it_is_not_measured():
    import re

    import suite_time

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    start, end = (readme.index(m) + len(m) for m in suite_time.README_MARK)
    block = readme[start:end - len(suite_time.README_MARK[1])].strip()
    page = repo / "docs" / "results" / "test_suite.md"
    if block == "(not measured yet)":
        assert not page.exists()
        return
    text = page.read_text()  # the README's figures are the results file's, not typed
    minutes = re.search(r"- wall time: ([\d.]+) min", text).group(1)
    counts = re.search(r"- result: (.+)", text).group(1)
    assert f"ran in {minutes} minutes ({counts})" in block
    assert ("NOISY" in text) == ("NOISY" in block)  # a noisy timing is flagged in both
