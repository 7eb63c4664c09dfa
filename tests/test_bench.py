"""ciscr bench: the --quick run end to end, and the pieces with hand-computed values."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

import ciscr
from ciscr.cli import main
from ciscr.timing import bench
from ciscr.timing.bench import BenchSpec, TrainVariant


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            [
                "bench",
                "--quick",
                "--repeats",
                "2",
                "--no-memory",
                "--threads",
                "1",
                "--loader-iters",
                "2",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    return json.loads((out / "speed_cpu.json").read_text()), buf.getvalue(), out


def test_quick_run_has_every_variant_with_positive_medians(quick_run):
    res, stdout, out = quick_run
    names = {r["name"] for r in res["train"]}
    assert names == {v.name for v in bench.train_variants()}
    assert len(names) == 16
    assert {r["name"] for r in res["pseudo"]} == {
        "pseudo/single/fp32", "pseudo/single/bf16", "pseudo/tta/fp32", "pseudo/tta/bf16",
        "pseudo/single_cl/fp32", "pseudo/single_cl/bf16", "pseudo/tta_cl/fp32",
        "pseudo/tta_cl/bf16",
    }  # fmt: skip
    assert len(res["select"]) == 4
    for r in res["train"] + res["pseudo"] + res["select"]:
        assert len(r["times_s"]) == 2
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["median_s"] > 0 and r["images_per_s"] > 0
    # The table is printed and written.
    assert "| st/fp32/nchw" in stdout and "## Targets" in stdout
    md = (out / "speed_cpu.md").read_text()
    assert "## Train step" in md and "| bank_all/bf16/cl" in md
    assert res["command"].startswith("ciscr bench --backbone mobilenet_v2 --batch 2 --crop 32")
    assert res["machine"]["threads"] == 1 and res["machine"]["cores"] >= 1


def test_quick_run_ratios_match_medians(quick_run):
    res = quick_run[0]
    med = {r["name"]: r["median_s"] for r in res["train"]}
    batch = bench.QUICK["batch"]
    for r in res["train"]:
        fmt = r["format"]
        assert r["ratio_to_st"] == pytest.approx(r["median_s"] / med[f"st/{r['precision']}/{fmt}"])
        assert r["images_per_s"] == pytest.approx(2 * batch / r["median_s"])
        assert r["tflops_per_s"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
        if r["precision"] == "bf16":
            fp32 = med[f"{r['method']}/fp32/{fmt}"]
            assert r["bf16_speedup"] == pytest.approx(fp32 / r["median_s"])
        else:
            assert r["bf16_speedup"] is None
        if fmt == "cl":
            nchw = med[f"{r['method']}/{r['precision']}/nchw"]
            assert r["channels_last_speedup"] == pytest.approx(nchw / r["median_s"])
    # A CISC step does strictly more convolution work than the ST step.
    flops = {r["method"]: r["flops"] for r in res["train"]}
    assert (
        flops["st"] > 0 and flops["bank_one"] > flops["st"] and flops["query"] > flops["bank_one"]
    )
    pmed = {r["name"]: r["median_s"] for r in res["pseudo"]}
    tta = next(r for r in res["pseudo"] if r["name"] == "pseudo/tta/fp32")
    assert tta["ratio_to_single"] == pytest.approx(
        pmed["pseudo/tta/fp32"] / pmed["pseudo/single/fp32"]
    )
    for t in res["targets"]:  # PASS / FAIL follow the printed values and limits
        limit = float(t["limit"].split()[1])
        assert t["pass"] == (t["value"] <= limit if "<=" in t["limit"] else t["value"] >= limit)
    assert len(res["targets"]) == 16  # 8 bank-step + 8 bf16 targets (memory skipped)


def test_time_round_robin_rotates_the_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = bench.time_round_robin(fns, repeats=2, warmup=1, sync=lambda: None)
    assert calls == list("abcbcacab")
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert all(x >= 0 for t in times.values() for x in t)


def test_blob_labels_have_several_classes_and_are_seeded():
    g = torch.Generator().manual_seed(3)
    lab = bench.blob_labels(6, 40, 50, 11, g)
    assert lab.shape == (6, 40, 50) and lab.dtype == torch.long
    assert int(lab.min()) >= 0 and int(lab.max()) < 11
    assert sum(len(torch.unique(x)) >= 2 for x in lab) >= 5
    again = bench.blob_labels(6, 40, 50, 11, torch.Generator().manual_seed(3))
    assert torch.equal(lab, again)


def _row(name, ratio, peak, bf16=None):
    method, prec, fmt = name.split("/")
    return {"name": name, "method": method, "precision": prec, "format": fmt,
            "ratio_to_st": ratio, "peak_mib": peak, "bf16_speedup": bf16,
            "teacher_peak_mib": 10.0}  # fmt: skip


def test_targets_hand_values():
    rows = [
        _row("st/fp32/nchw", 1.0, 100.0),
        _row("bank_one/fp32/nchw", 1.05, 109.0),  # 1.05 <= 1.10; 109 <= 100 + 10
        _row("bank_all/fp32/nchw", 1.20, 111.0),  # both fail
        _row("st/bf16/nchw", 1.0, 90.0, bf16=1.5),
        _row("bank_one/bf16/nchw", 1.10, 95.0, bf16=1.39),
    ]
    got = {(t["target"][:4], t["variant"]): (t["pass"], t["limit"])
           for t in bench.evaluate_targets(rows)}  # fmt: skip
    assert got == {
        ("bank", "bank_one/fp32/nchw"): (True, "<= 1.10"),
        ("peak", "bank_one/fp32/nchw"): (True, "<= 110"),
        ("bank", "bank_all/fp32/nchw"): (False, "<= 1.10"),
        ("peak", "bank_all/fp32/nchw"): (False, "<= 110"),
        ("bf16", "st/bf16/nchw"): (True, ">= 1.40"),
        ("bank", "bank_one/bf16/nchw"): (True, "<= 1.10"),
        ("peak", "bank_one/bf16/nchw"): (True, "<= 100"),
        ("bf16", "bank_one/bf16/nchw"): (False, ">= 1.40"),
    }


def test_count_flops_of_a_convolution():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 8, 8)
    # 2 FLOPs per multiply-add: 2 * (4 * 8 * 8 outputs) * (3 * 3 * 3 taps) = 13824.
    assert bench.count_flops(lambda: conv(x)) == 13824


def test_memory_runs_each_variant_in_its_own_process():
    spec = BenchSpec(**bench.QUICK, threads=1)
    st, bank = TrainVariant("st", "none", False), TrainVariant("bank_one", "none", False)
    alone = TrainVariant("teacher", "none", False)
    mem = bench.measure_memory(spec, [st, bank, alone])
    weights = bench._tensor_bytes(bench._build(spec, torch.device("cpu"), False, False)) / 2**20
    assert mem[st.name] > 0
    # The bank variant also holds the teacher (about 8 MiB of weights here): its peak shows it,
    # and so does the teacher measured alone.
    assert mem[bank.name] > mem[st.name] + 0.5 * weights
    assert mem[alone.name] > 0.5 * weights


class _CountingFeatures:
    """Teacher stand-in: (B,3,H,W) -> (B,4,H/4,W/4) non-negative, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return nn.functional.avg_pool2d(x.abs(), 4).repeat(1, 2, 1, 1)[:, :4]


def test_query_rectifier_runs_the_teacher_twice_per_step():
    from ciscr.engine.steps import Rectifier

    g = torch.Generator().manual_seed(0)
    pool = bench._TensorPool(torch.randn(3, 3, 16, 16, generator=g), torch.zeros(3, 16, 16).long())
    feats = _CountingFeatures()
    rect = Rectifier(features=feats, mode="query", classes="one", num_classes=2,
                     query_lists={0: [0, 1, 2], 1: []}, seed=0, labeled=pool)  # fmt: skip
    out = rect(torch.randn(2, 3, 16, 16, generator=g), torch.zeros(2, 16, 16).long(), 1)
    # Unlabeled batch + queried batch; no extra probe forward to learn the feature width.
    assert feats.calls == 2
    assert out["cmap"].shape == (2, 16, 16) and out["cls"].tolist() == [0, 0]


def test_bad_only_is_a_user_error(capsys):
    assert main(["bench", "--quick", "--only", "train,bogus"]) == 2
    assert "error: --only train,bogus" in capsys.readouterr().err


def test_memory_server_env_pins_glibc_mmap_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")  # a user's own setting wins
    env = bench.memory_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4096"
    assert str(Path(ciscr.__file__).resolve().parents[1]) in env["PYTHONPATH"]


def test_quick_run_shows_each_default_beside_its_alternative(quick_run):
    res, stdout, _ = quick_run
    names = [r["name"].rsplit("/", 1)[0] for r in res["loader"]]
    assert names == ["loader/workers0", "loader/workers1"]
    assert res["loader"][0]["images_per_s"] == pytest.approx(
        2 * bench.QUICK["batch"] * 2 / res["loader"][0]["median_s"]
    )
    settings = [(r["setting"], r["measured_on"].split(" (")[0]) for r in res["defaults"]]
    assert ("train.amp", "train step") in settings and ("data.num_workers", "ST stage, 2 "
                                                        "iterations") in settings
    assert ("train.channels_last", "train step") in settings
    for r in res["defaults"]:
        assert r["speedup"] == pytest.approx(r["alternative_s"] / r["default_s"])
    assert "## Defaults vs their alternatives" in stdout and "| data.num_workers" in stdout


def test_defaults_rows_hand_values():
    def row(name, s):
        return {"name": name, "median_s": s}

    res = {
        "train": [row("st/bf16/nchw", 1.0), row("st/fp32/nchw", 1.8), row("st/bf16/cl", 1.25)],
        "pseudo": [row("pseudo/tta/bf16", 2.0), row("pseudo/tta/fp32", 2.5),
                   row("pseudo/tta_cl/bf16", 1.6)],
        "loader": [row("loader/workers0/bf16", 10.0), row("loader/workers1/bf16", 8.0)],
        "loader_iters": 5,
    }
    got = {(r["setting"], r["measured_on"]): r for r in bench.defaults_rows(res, "bf16")}
    amp = got["train.amp", "train step (ST)"]
    assert (amp["default"], amp["alternative"], amp["speedup"]) == ("auto (bf16)", "fp32", 1.8)
    assert got["train.amp", "pseudo-labelling (TTA)"]["speedup"] == pytest.approx(1.25)
    assert got["train.channels_last", "train step (ST, bf16)"]["speedup"] == pytest.approx(1.25)
    assert got["data.num_workers", "ST stage, 5 iterations"]["speedup"] == pytest.approx(0.8)
    cl = got["train.infer_channels_last", "pseudo-labelling (TTA, bf16)"]
    assert (cl["default"], cl["alternative"], cl["speedup"]) == ("true", "false", 1.25)
    assert ("train.amp", "evaluation (whole image)") not in got  # not measured: no row
    # on a CPU without fast bf16 the default is fp32 and bf16 is the alternative
    fp32 = {r["measured_on"]: r for r in bench.defaults_rows(res, "none")}["train step (ST)"]
    assert (fp32["default"], fp32["alternative"]) == ("auto (fp32)", "bf16")
    assert fp32["speedup"] == pytest.approx(1.0 / 1.8)
