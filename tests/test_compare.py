"""``ciscr compare``: finished runs side by side, the first as the control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ciscr.cli import main
from ciscr.compare import comparability_warnings, format_compare, movers, read_run
from ciscr.utils.misc import precision_name, resolve_amp

TINY = ["train.epochs=2", "train.unlabeled_epochs=1", "train.batch_size=8", "train.crop_size=32",
        "train.progress=false", "train.log_every=1", "data.synthetic.num_train=30",
        "data.synthetic.num_val=4", "data.synthetic.size=32", "report=false", "device=cpu",
        "threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, extra in (("suponly", ["method.name=suponly"]),
                        ("fixmatch", ["method.name=fixmatch"]),
                        ("seed1", ["method.name=suponly", "seed=1"])):
        out[name] = root / name
        assert main(["run", "synthetic", "--out", str(out[name]), *TINY, *extra]) == 0
    return out


def test_real_runs_compare_with_their_costs_and_files(runs, capsys, tmp_path):
    capsys.readouterr()
    assert main(["compare", str(runs["suponly"]), str(runs["fixmatch"]),
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    a, b = read_run(str(runs["suponly"])), read_run(str(runs["fixmatch"]))
    row = next(line for line in out.splitlines() if line.startswith(str(runs["fixmatch"])))
    # train.amp=auto: bf16 on a CPU with native bf16, fp32 elsewhere (the runs record which).
    expected = precision_name(resolve_amp("auto", "cpu"))
    assert f"{100 * (b.miou - a.miou):+.2f}" in row and row.split()[-1] == expected
    assert (a.labeled, a.unlabeled) == (10, 20) and a.iterations == 6
    assert a.cpu_minutes > 0 and b.cpu_minutes > 0 and a.cpu != "not recorded"
    assert "comparable: same val images, labeled split and start" in out
    assert "per-class IoU %" in out and "biggest movers" in out
    for name in ("compare.json", "compare.png", "compare.html"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0


def test_another_split_is_a_warning_naming_it(runs, capsys):
    assert main(["compare", str(runs["suponly"]), str(runs["seed1"])]) == 0
    out = capsys.readouterr().out
    assert f"warning: {runs['seed1']}: another labeled split than the control" in out


def _fake(run: Path, miou: float, iou: list, *, iters: int = 100, seed: int = 0) -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "data": {"format": "folder", "root": "/d", "labeled": 12},
         "model": {"backbone": "mobilenet_v2", "pretrained": "imagenet"},
         "train": {"amp": "none"}}))
    (run / "results.json").write_text(json.dumps(
        {"method": "suponly", "stages": {}, "budget": {"iterations": iters, "lr": 0.01},
         "final_metrics": {"miou": miou, "iou": iou, "class_names": ["a", "b", "c"]}}))
    return run


def test_movers_and_budget_warning_by_hand(tmp_path):
    ctrl = read_run(str(_fake(tmp_path / "c", 0.5, [0.5, 0.5, 0.5])))
    other = read_run(str(_fake(tmp_path / "o", 0.6, [0.45, 0.9, None], iters=300)))
    # c is absent from the other run's val set: skipped; b moved most.
    assert movers(ctrl, other) == [("b", pytest.approx(0.4)), ("a", pytest.approx(-0.05))]
    warnings = [w for w in comparability_warnings([ctrl, other]) if w.startswith("warning:")]
    assert len(warnings) == 1 and "trained 300 iterations, the control 100" in warnings[0]
    # Runs finished without the machine record: said, not passed off as the same machine.
    assert "note: CPU model and precision not recorded" in format_compare([ctrl, other])
    text = format_compare([ctrl, other])
    assert "+10.00" in text and "b +40.00, a -5.00" in text and "90.00 (+40.00)" in text


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no results.json: not a ciscr run directory"),
    (lambda p: (p.mkdir(), (p / "config.yaml").write_text("seed: 0\n")),
     "no results.json: the run has not finished"),
])
def test_bad_runs_are_one_line(tmp_path, capsys, setup, message):
    ctrl = _fake(tmp_path / "c", 0.5, [0.5, 0.5, 0.5])
    setup(tmp_path / "bad")
    assert main(["compare", str(ctrl), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_one_run_is_not_a_comparison(tmp_path, capsys):
    assert main(["compare", str(_fake(tmp_path / "c", 0.5, [0.5, 0.5, 0.5]))]) == 2
    assert "two or more runs" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    ctrl = _fake(tmp_path / "c", 0.5, [0.5, 0.5, 0.5])
    other = _fake(tmp_path / "o", 0.6, [0.6, 0.6, 0.6])
    (tmp_path / "taken").write_text("x")
    assert main(["compare", str(ctrl), str(other), "--out", str(tmp_path / "taken")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "x"
