"""ciscr profile: caller-specific cProfile times, the ST vs CISC-R comparison and its targets
(hand values), and a tiny end-to-end run of the three passes."""

import cProfile
import io
import json
import pstats
import time

import pytest

from ciscr.cli import main
from ciscr.timing import profiling
from ciscr.timing.profiling import code_key, compare_stages, edge_seconds, targets


def _leaf(seconds):
    time.sleep(seconds)


def _calls_twice():
    _leaf(0.02)
    _leaf(0.02)


def _calls_once():
    _leaf(0.05)


def test_edge_seconds_splits_a_function_by_caller():
    prof = cProfile.Profile()
    prof.enable()
    _calls_twice()
    _calls_once()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    leaf = code_key(_leaf)
    total = edge_seconds(stats, leaf)
    twice = edge_seconds(stats, leaf, code_key(_calls_twice))
    once = edge_seconds(stats, leaf, code_key(_calls_once))
    assert twice == pytest.approx(0.04, abs=0.03) and once == pytest.approx(0.05, abs=0.03)
    assert total == pytest.approx(twice + once)
    assert edge_seconds(stats, leaf, code_key(test_edge_seconds_splits_a_function_by_caller)) == 0
    assert edge_seconds(stats, None) == 0.0


def test_code_key_sees_through_decorators_and_into_closures():
    from ciscr.engine.steps import Rectifier
    from ciscr.utils.misc import count_parameters

    assert code_key(Rectifier.__call__)[2] == "__call__"  # not torch.no_grad's wrapper
    assert code_key(Rectifier.__call__)[0].endswith("steps.py")
    assert code_key(count_parameters, "<genexpr>")[2] == "<genexpr>"
    assert code_key(count_parameters, "no_such_function") is None


def _train(stage, total, eval_s, iterations):
    return {"stage": stage, "kind": "training", "total": total, "iterations": iterations,
            "seconds": {"training": total - eval_s, "evaluation": eval_s}}


def _other(stage, total):
    return {"stage": stage, "kind": "x", "total": total, "seconds": {}}


TIMED = {
    "st": [_train("stage1", 11.0, 1.0, 100), _other("pseudo0", 2.0),
           _train("stage2", 21.0, 1.0, 100)],
    "ciscr_bank": [_train("stage1", 12.0, 1.0, 100), _other("pseudo0", 2.0), _other("selection", 3.0),
                   _train("stage2", 25.0, 1.0, 100), _other("pseudo1", 1.0),
                   _train("stage3", 22.0, 1.0, 100), _other("pseudo_final", 2.0)],
    "ciscr": [_train("stage1", 12.0, 1.0, 100), _train("stage2", 31.0, 1.0, 100)],
}  # fmt: skip


def test_ciscr_stages_are_compared_per_iteration_with_st():
    comp = {c["stage"]: c for c in compare_stages(TIMED) if c["method"] == "ciscr_bank"}
    assert comp["stage1"]["st_stage"] == "stage1"
    assert comp["stage1"]["ratio"] == pytest.approx(0.11 / 0.10)
    assert comp["stage2"]["ratio"] == pytest.approx(0.24 / 0.20)
    assert comp["stage3"]["st_stage"] == "stage2"  # ST retrains once
    assert comp["stage3"]["ratio"] == pytest.approx(0.21 / 0.20)


def test_targets_hand_values():
    got = {t["target"]: t for t in targets(TIMED)}
    assert got["ciscr_bank stage1 / ST stage1 (s per step)"]["pass"]  # 1.10
    assert not got["ciscr_bank stage2 / ST stage2 (s per step)"]["pass"]  # 1.20 > 1.15
    assert got["ciscr_bank stage3 / ST stage2 (s per step)"]["pass"]  # 1.05
    # the paper's query mode: stage 1 (L_CISC) is a target, its stage 2 (1.5x) is shown only
    assert got["ciscr stage1 / ST stage1 (s per step)"]["pass"]
    assert "ciscr stage2 / ST stage2 (s per step)" not in got
    assert any(c["method"] == "ciscr" and c["stage"] == "stage2" for c in compare_stages(TIMED))
    side = got["ciscr_bank pseudo0 + selection + pseudo1 / mean training stage"]
    # (2 + 3 + 1) / mean(11, 24, 21): pseudo_final (scoring only) is not counted
    assert side["value"] == pytest.approx(6 / (56 / 3)) and side["pass"]


def test_step_median_is_compared_and_rounds_give_a_median_ratio():
    timed = {m: [dict(r) for r in rows] for m, rows in TIMED.items()}
    timed["ciscr_bank"][3]["step_median"] = 0.3  # ciscr stage2's log says 0.3 s per step
    timed["st"][2]["step_median"] = 0.2
    comp = {c["stage"]: c for c in compare_stages(timed) if c["method"] == "ciscr_bank"}
    assert comp["stage2"]["ratio"] == pytest.approx(1.5)  # the log's median, not 0.24 / 0.20
    slower = {m: [dict(r) for r in rows] for m, rows in timed.items()}
    slower["ciscr_bank"][3]["step_median"] = 0.22
    faster = {m: [dict(r) for r in rows] for m, rows in timed.items()}
    faster["ciscr_bank"][3]["step_median"] = 0.21
    comp = {c["stage"]: c for c in compare_stages(timed, [slower, faster])
            if c["method"] == "ciscr_bank"}
    assert comp["stage2"]["ratios"] == pytest.approx([1.5, 1.1, 1.05])
    assert comp["stage2"]["ratio"] == pytest.approx(1.1)  # the median round
    got = {t["target"]: t for t in targets(timed, [slower, faster])}
    assert got["ciscr_bank stage2 / ST stage2 (s per step)"]["pass"]


def test_the_interleaved_pass_judges_the_stage_targets_even_when_the_timed_pass_is_noisy():
    noisy = {m: [dict(r) for r in rows] for m, rows in TIMED.items()}
    noisy["st_end"] = [dict(r) for r in TIMED["st"]]
    noisy["st_end"][2]["step_median"] = 0.30  # the timed pass's A/A: 50 % off
    inter = {"rounds": 3, "block": 2, "warmup": 1, "times": {
        "st stage1": [1.0, 2.0, 1.0], "st stage2": [2.0, 2.0, 4.0],
        "st stage2 (again)": [2.0, 2.2, 4.0],
        "ciscr_bank stage1": [1.1, 2.0, 1.3],  # round ratios 1.1, 1.0, 1.3 -> 1.1
        "ciscr_bank stage2": [2.0, 2.6, 4.8],  # 1.0, 1.3, 1.2 -> 1.2
        "ciscr_bank stage3": [2.1, 2.0, 4.0],  # 1.05, 1.0, 1.0 -> 1.0
    }}  # fmt: skip
    comp = {c["key"]: c for c in profiling.compare_interleaved(inter)}
    assert comp["st stage2 (again)"]["ratio"] == pytest.approx(1.0)  # the A/A row
    assert comp["ciscr_bank stage1"]["ratio"] == pytest.approx(1.1)
    assert comp["ciscr_bank stage2"]["st_key"] == "st stage2"
    assert comp["ciscr_bank stage2"]["ratio"] == pytest.approx(1.2)
    assert comp["ciscr_bank stage3"]["st_key"] == "st stage2"  # ST retrains once
    assert comp["ciscr_bank stage3"]["s_per_step"] == pytest.approx(2.1)  # median of rounds
    got = {t["target"]: t for t in targets(noisy, (), inter)}
    s2 = got["ciscr_bank stage2 / ST stage2 (s per step)"]
    assert s2["value"] == pytest.approx(1.2) and s2["pass"] is False  # judged, not inconclusive
    assert s2["timed"] == pytest.approx(0.24 / 0.25)  # the timed ratio is kept beside it
    assert got["ciscr_bank stage1 / ST stage1 (s per step)"]["pass"] is True
    assert got["ciscr stage1 / ST stage1 (s per step)"]["value"] is None  # not interleaved
    assert got["ciscr stage1 / ST stage1 (s per step)"]["pass"] is False
    md = "\n".join(profiling._interleaved_section(inter))
    assert "st stage2 (again)" in md and "| 1.20" in md


def test_st_runs_bracket_each_round_and_an_a_a_control_over_the_limit_is_inconclusive():
    quiet = {m: [dict(r) for r in rows] for m, rows in TIMED.items()}
    quiet["st_end"] = [dict(r) for r in TIMED["st"]]
    quiet["st_end"][2]["step_median"] = 0.22  # ST stage 2 ran at 0.20 s at the round's start
    comp = {c["stage"]: c for c in compare_stages(quiet) if c["method"] == "ciscr_bank"}
    assert comp["stage2"]["st_s_per_it"] == pytest.approx(0.21)  # mean of the two ST runs
    assert comp["stage2"]["ratio"] == pytest.approx(0.24 / 0.21)
    noise = profiling.noise_control(quiet)
    assert noise["ratios"]["stage2"] == pytest.approx([1.1]) and noise["quiet"]
    assert all(t["pass"] is not None for t in targets(quiet))
    noisy = {m: [dict(r) for r in rows] for m, rows in quiet.items()}
    noisy["st_end"][2]["step_median"] = 0.30  # the same work, 50 % slower: machine noise
    assert not profiling.noise_control(noisy)["quiet"]
    got = {t["target"]: t["pass"] for t in targets(noisy)}
    assert got["ciscr_bank stage2 / ST stage2 (s per step)"] is None  # inconclusive
    assert got["ciscr_bank pseudo0 + selection + pseudo1 / mean training stage"]  # same run
    md = profiling._targets_section(targets(noisy))
    assert "INCONCLUSIVE" in "\n".join(md) and "inconclusive" in md[1]
    assert profiling.noise_control(TIMED) is None  # no st_end: nothing to judge the noise by


@pytest.mark.parametrize("args, match", [
    (["--methods", "st,bogus"], "--methods"),
    (["--passes", "timed,slow"], "--passes"),
    (["--passes", "interleaved"], "add timed"),
    (["--repeats", "0"], "--repeats"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(capsys, args, match):
    assert main(["profile", "synthetic", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and match in err and err.count("\n") == 1


TINY = [
    "data.synthetic.num_train=16", "data.synthetic.num_val=3", "data.synthetic.size=32",
    "data.labeled=6", "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=2", "train.batch_size=4",
    "train.crop_size=32", "method.tta_scales=[1.0]", "method.tta_flip=false",
    "model.channels=16", "method.score_final_pseudo=false", "method.min_class_ratio=0.0",
    "model.backbone=mobilenet_v2",
]


def test_tiny_profile_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profiling, "TORCH_WINDOW", (0, 1))  # the stages have 2 iterations
    monkeypatch.setattr("ciscr.timing.steptime.ROUNDS", 2)
    monkeypatch.setattr("ciscr.timing.steptime.BLOCK", 1)
    # The profile times report building around write_report; its figures (seconds each, and
    # tested in test_report.py) are not what this test checks.
    monkeypatch.setattr("ciscr.report.build_html", lambda *a, **k: "<html></html>")
    out = tmp_path / "results"
    assert main(["profile", "synthetic", *TINY, "--threads", "1", "--work",
                 str(tmp_path / "work"), "--out", str(out), "--name", "p"]) == 0
    res = json.loads((out / "p.json").read_text())
    assert res["command"].startswith("ciscr profile synthetic data.synthetic.num_train=16")
    timed = {m: {r["stage"]: r for r in rows} for m, rows in res["timed"].items()}
    assert set(timed["st"]) == {"setup", "stage1", "pseudo0", "stage2", "report"}
    assert set(timed["st_end"]) == set(timed["st"])  # the A/A control closes the round
    assert {"selection", "pseudo1", "stage3"} <= set(timed["ciscr"])
    assert timed["ciscr"]["stage2"]["iterations"] == 2
    assert timed["ciscr"]["stage2"]["step_median"] > 0  # from the stage's train.jsonl
    prof = {s["stage"]: s for s in res["profiled"]["ciscr"]}
    for s in prof.values():  # the top-level categories and "other" add up to the stage
        top = sum(c["seconds"] for c in s["categories"] if c["depth"] == 0)
        assert top == pytest.approx(s["seconds"], rel=0.05)
    cat = {c["label"]: c["seconds"] for c in prof["stage2"]["categories"]}
    assert cat["rectifier (teacher forward, CISC maps)"] > 0
    batches = cat["train batches: load + augment (main process)"]
    assert batches >= cat["unlabeled images + pseudo labels"] > 0  # the row breaks down batches
    assert prof["stage2"]["torch_window"]["iterations"] == 1
    assert prof["stage2"]["torch_window"]["rectifier_s"] > 0
    st2 = {c["label"]: c["seconds"] for c in res["profiled"]["st"][3]["categories"]}
    assert st2["rectifier (teacher forward, CISC maps)"] == 0  # ST has no rectifier
    inter = res["interleaved"]  # the training stages of the timed runs, side by side
    assert inter["rounds"] == 2 and inter["block"] == 1
    assert set(inter["times"]) == {"st stage1", "st stage2", "st stage2 (again)",
                                   "ciscr stage1", "ciscr stage2", "ciscr stage3"}
    assert all(len(v) == 2 and min(v) > 0 for v in inter["times"].values())
    md = (out / "p.md").read_text()
    assert "## Time per stage (timed pass)" in md and "## Targets" in md
    assert "## Stage steps side by side (interleaved pass)" in md
    assert "- command: `ciscr profile synthetic" in md
    assert "ciscr: training stages (cProfile" in capsys.readouterr().out


def test_st_is_profiled_at_the_config_settings_and_query_mode_with_its_preset():
    st = profiling.method_config("synthetic", "st", [])
    bank = profiling.method_config("synthetic", "ciscr_bank", [])
    assert st.method.name == "st" and st.method.retrain_batches == "split"
    # what differs from CISC-R (bank) is CISC-R's own work, not the recipe around it
    for key in ("confidence_threshold", "init", "stage1_cisc_loss", "cutout"):
        assert getattr(st.method, key) == getattr(bank.method, key), key
    assert profiling.method_config("synthetic", "ciscr", []).method.stage1_cisc_loss  # paper's
