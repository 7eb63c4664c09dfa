"""report.html from a real (tiny) run directory: sections, inline images, self-containment,
incomplete runs, the CLI, and a real headless browser (chromium) when one is installed."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ciscr import cli
from ciscr.config import load_config, save_config
from ciscr.errors import DataError
from ciscr.report import SECTIONS, expected_stages, pick_class, read_train_log, write_report

RUN_ARGS = [
    "train.epochs=1", "train.unlabeled_epochs=0",
    "train.iters_per_epoch=2",
    "data.synthetic.num_train=24",
    "data.synthetic.num_val=4",
    "train.progress=false", "model.backbone=mobilenet_v2",
    "method.tta_scales=[1.0]",
    "method.score_final_pseudo=true",  # the demo config skips it; the report shows it
]
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(["run", "synthetic", "--out", str(out), *RUN_ARGS]) == 0
    assert (out / "report.html").is_file()  # report=true (the default) writes it at the end
    return out


@pytest.fixture(scope="module")
def report(run_dir: Path) -> str:
    path = write_report(run_dir, max_gallery=2)
    assert path == run_dir / "report.html" and path.is_file()
    assert path.stat().st_mode & 0o444 == 0o444  # readable by all: a report is shared
    return path.read_text()


def _section(page: str, key: str) -> str:
    start = page.index(f'<section id="{key}">')
    return page[start : page.index("</section>", start)]


def _copy(run_dir: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("tb", "report.html")))


# --------------------------------------------------------------------------- complete run


def test_report_has_every_section_and_the_result(run_dir: Path, report: str) -> None:
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in report
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_stage"] == "stage3"
    miou = results["final_metrics"]["miou"]
    assert f"<b>val mIoU {100 * miou:.2f}</b> (stage3, last checkpoint" in report
    assert "<details><summary>resolved config (config.yaml)</summary>" in report
    assert "backbone: mobilenet_v2" in _section(report, "config")
    assert "missing or incomplete" not in report and "results.json is missing" not in report
    assert report.count('<span class="st done">done</span>') == 7  # every stage incl. pseudo_final


def test_images_are_inline_pngs(report: str) -> None:
    images = IMG_RE.findall(report)
    # 3 curve figures + selection histogram + 2 CISC maps + pseudo-label grid + predictions grid
    assert len(images) == 8
    assert report.count("<img ") == len(images)
    for data in images:
        png = Image.open(io.BytesIO(base64.b64decode(data)))
        assert png.format == "PNG" and min(png.size) > 100
    for key in ("curves", "selection", "cisc", "labels", "predictions"):
        assert IMG_RE.search(_section(report, key)), key


def test_report_is_self_contained(report: str) -> None:
    assert "://" not in report  # no http(s)://, file:// or protocol-relative URL anywhere
    for banned in ("<script", "<link", "@import", "url(", "<iframe", "@font-face"):
        assert banned not in report.lower()
    assert all(v.startswith("data:image/png;base64,") for v in re.findall(r'src="([^"]*)"', report))
    assert all(v.startswith("#") for v in re.findall(r'href="([^"]*)"', report))


def test_tables_show_the_run_numbers(run_dir: Path, report: str) -> None:
    iou = _section(report, "iou")
    absent = 0
    for stage in ("stage1", "stage2", "stage3"):
        m = json.loads((run_dir / stage / "metrics.json").read_text())
        assert f"<b>{100 * m['miou']:.2f}</b>" in iou
        absent += sum(v is None for v in m["iou"])
        for v in m["iou"]:
            assert (f"<td>{100 * v:.2f}</td>" if v is not None else "<td>absent</td>") in iou
    assert iou.count("<td>absent</td>") == absent
    pseudo = _section(report, "pseudo")
    for name in ("pseudo0", "pseudo1", "pseudo_final"):
        q = json.loads((run_dir / name / "quality.json").read_text())
        assert f"<b>{100 * q['miou']:.2f}</b>" in pseudo
        assert f"{name}: by " in pseudo
    split = json.loads((run_dir / "selection" / "unlabeled_split.json").read_text())
    halves = json.loads((run_dir / "selection" / "half_quality.json").read_text())
    sel = _section(report, "selection")
    for half in ("reliable", "unreliable"):
        row = f"<td>{half}</td><td>{len(split[half])}</td><td>{100 * halves[half]['miou']:.2f}</td>"
        assert row in sel
    queries = json.loads((run_dir / "selection" / "queries.json").read_text())
    for name, entries in queries.items():
        assert f"<td>{name}</td><td>{len(entries)}</td>" in sel


# --------------------------------------------------------------------------- units


def test_train_log_keeps_the_last_record_per_iteration(tmp_path: Path) -> None:
    lines = [
        {"iteration": 10, "loss": 3.0, "lr": 0.1},
        {"iteration": 20, "loss": 2.0, "lr": 0.05},
        {"iteration": 20, "val_miou": 0.25},  # an epoch-end record shares the iteration
        {"iteration": 20, "loss": 1.5, "lr": 0.05},  # logged again after a resume: wins
        {"iteration": 10, "loss": 2.5, "lr": 0.1},  # likewise, out of order
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 30, "lo'  # torn line
    (tmp_path / "train.jsonl").write_text(text)
    series = read_train_log(tmp_path / "train.jsonl")
    assert series == {
        "loss": [(10, 2.5), (20, 1.5)],
        "lr": [(10, 0.1), (20, 0.05)],
        "val_miou": [(20, 0.25)],
    }
    assert read_train_log(tmp_path / "absent.jsonl") == {}


def test_pick_class_most_frequent_non_background() -> None:
    label = np.array([[0, 0, 0, 0], [2, 2, 1, 255], [2, 2, 1, 255]], np.uint8)
    assert pick_class(label, 3, background=0, min_ratio=0.03) == 2  # 4 px of class 2
    assert pick_class(label, 3, background=None, min_ratio=0.03) == 0  # 4 vs 4: first
    assert pick_class(label, 3, background=0, min_ratio=0.5) == -1  # 4 of 10 valid < 50%
    assert pick_class(np.zeros((2, 2), np.uint8), 3, background=0, min_ratio=0.0) == -1


# --------------------------------------------------------------------------- incomplete runs


def test_incomplete_run_renders_with_missing_notes(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path / "killed")
    shutil.rmtree(run / "stage3")
    shutil.rmtree(run / "pseudo_final")
    (run / "stage2" / "done.json").unlink()  # killed during stage 2's last moments
    page = write_report(run, max_gallery=1).read_text()
    assert '<td>stage3</td><td><span class="st missing">missing</span>' in page
    assert '<td>stage2</td><td><span class="st incomplete">incomplete</span>' in page
    assert "missing or incomplete: stage2, stage3" in page
    assert "stage3/checkpoint.pt is missing" in _section(page, "predictions")
    assert "stage3: no training log" in _section(page, "curves")
    assert len(IMG_RE.findall(page)) == 5  # 2 curves + histogram + 1 CISC map + labels grid
    (run / "results.json").unlink()
    page = write_report(run, max_gallery=1).read_text()
    assert "results.json is missing: the run is incomplete" in page
    assert "the final stage (stage3) has no metrics" in page
    assert "://" not in page


def test_config_only_and_bad_directories(run_dir: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "train_only"
    overrides = [
        "method.name=suponly",
        "method.stage1_cisc_loss=false",
        "method.retrain=none",
        "method.rectify=none",
    ]
    save_config(load_config(run_dir / "config.yaml", overrides), bare / "config.yaml")
    assert expected_stages_of(bare) == ["stage1"]
    page = write_report(bare, max_gallery=1).read_text()
    assert '<td>stage1</td><td><span class="st missing">missing</span>' in page
    assert "this method does not select" in page
    assert "stage1/checkpoint.pt is missing" in page
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a ciscr run directory"):
        write_report(tmp_path / "empty", max_gallery=1)
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nowhere'}: no such run directory\n"


def expected_stages_of(run: Path) -> list[str]:
    from ciscr.report import _read_run

    return expected_stages(_read_run(run, "cpu"))


def test_cli_report_prints_the_path(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = _copy(run_dir, tmp_path / "cli")
    assert cli.main(["report", str(run), "--max-gallery", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = (run / "report.html").read_text()
    assert page.count("galleries disabled") == 3
    assert len(IMG_RE.findall(page)) == 4  # curves and histogram only


# --------------------------------------------------------------------------- a real browser

# The exact command, printed in the skip reason and in README's "Test it" (what .ci/run runs):
# on a fresh machine the test is skipped, and the reader should not have to look it up.
CHROMIUM_INSTALL = "sudo apt-get install -y chromium"
CHROMIUM_SKIP = (f"chromium is not installed, so the report's browser test is skipped; "
                 f"install it with: {CHROMIUM_INSTALL} (Debian/Ubuntu; .ci/run does this)")


def test_readme_says_how_to_get_chromium() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    test_it = readme.split("**Test it:**", 1)[1].split("---", 1)[0]
    assert CHROMIUM_INSTALL in test_it and "chromium" in CHROMIUM_SKIP



def test_headless_chromium_renders_the_report(report: str, tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip(CHROMIUM_SKIP)
    page = tmp_path / "report.html"
    page.write_text(report)
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert len(IMG_RE.findall(dom)) == 8
    assert '<section id="predictions">' in dom and "Per-class IoU" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    colours = np.unique(np.asarray(img).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, tables and figures, not a blank page
