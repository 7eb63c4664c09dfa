"""The time-per-stage table: built from each stage's done.json, shown in the summary and report."""

import json

from ciscr.report import build_html
from ciscr.runner import format_results
from ciscr.timing import category_totals, format_time_table, stage_time_rows, time_table


def _done(run, name, **summary):
    (run / name).mkdir(parents=True, exist_ok=True)
    (run / name / "done.json").write_text(json.dumps(summary))


def fake_run(run):
    _done(run, "stage1", val_miou=0.5, wall_seconds=12.0, eval_seconds=2.0)
    (run / "stage1" / "train.jsonl").write_text(
        '{"iteration": 10, "loss": 1, "step_seconds": 0.3}\n'
        '{"iteration": 20, "loss": 0.5, "step_seconds": 0.1}\n'
        '{"iteration": 20, "val_miou": 0.4}\n{"iteration": 30, "loss": 0.4, "step_seconds": 0.2}\n'
    )
    _done(run, "pseudo0", num_images=4, wall_seconds=3.0)
    _done(run, "selection", reliable=2, unreliable=2, wall_seconds=1.0)
    _done(run, "stage2", val_miou=0.6, wall_seconds=20.0)  # an older run: no eval_seconds
    _done(run, "stage3", val_miou=0.7)  # no record at all: left out
    return run


def test_rows_split_training_and_evaluation(tmp_path):
    rows = stage_time_rows(fake_run(tmp_path))
    assert [r["stage"] for r in rows] == ["stage1", "pseudo0", "selection", "stage2"]
    s1, p0, sel, s2 = rows
    assert s1["seconds"]["training"] == 10.0 and s1["seconds"]["evaluation"] == 2.0
    assert s1["iterations"] == 30 and s1["total"] == 12.0
    assert s1["step_median"] == 0.2  # median of the step records; the val record has none
    assert s2["step_median"] is None  # an older run's log: no step_seconds
    assert p0["seconds"]["pseudo-labelling"] == 3.0 and p0["seconds"]["training"] is None
    assert sel["seconds"]["selection"] == 1.0
    # without eval_seconds the evaluation stays inside training and is shown as unknown
    assert s2["seconds"]["training"] == 20.0 and s2["seconds"]["evaluation"] is None
    assert category_totals(rows) == {
        "training": 30.0, "evaluation": 2.0, "pseudo-labelling": 3.0, "selection": 1.0,
    }


def test_table_has_total_and_share_rows(tmp_path):
    header, body = time_table(stage_time_rows(fake_run(tmp_path)))
    assert header[0] == "stage" and header[-1] == "total s"
    assert body[-2] == ["total", "30.0", "2.0", "3.0", "1.0", "36.0"]
    assert body[-1] == ["share", "83%", "6%", "8%", "3%", "100%"]
    text = format_time_table(stage_time_rows(tmp_path))
    assert text.startswith("time per stage") and "stage2" in text
    assert format_time_table([]) == ""


def test_summary_and_report_carry_the_table(tmp_path):
    run = fake_run(tmp_path / "run")
    metrics = {"miou": 0.7, "iou": [0.7, 0.7], "acc": 0.9}
    results = {"method": "ciscr", "final_stage": "stage2", "run_dir": str(run),
               "stages": {"stage1": {"val_miou": 0.5}}, "final_metrics": metrics}
    text = format_results(results, ["a", "b"])
    assert "time per stage" in text and "36.0" in text
    page = build_html(run, max_gallery=0)
    assert 'id="time"' in page and "<td>36.0</td>" in page


def test_online_run_lists_its_training_stage(tmp_path):
    # issue 26: a FixMatch / UniMatch run trains in one "online" stage; the table listed only
    # pseudo_final (training 0.0 s) before.
    _done(tmp_path, "online", val_miou=0.5, wall_seconds=2100.0, eval_seconds=30.0)
    (tmp_path / "online" / "train.jsonl").write_text('{"iteration": 40, "step_seconds": 0.5}\n')
    _done(tmp_path, "pseudo_final", num_images=4, wall_seconds=26.4)
    rows = stage_time_rows(tmp_path)
    assert [r["stage"] for r in rows] == ["online", "pseudo_final"]
    assert rows[0]["seconds"]["training"] == 2070.0 and rows[0]["iterations"] == 40
    assert category_totals(rows)["training"] == 2070.0
    assert "online" in format_time_table(rows)
