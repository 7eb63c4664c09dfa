"""ciscr predict: checkpoint loading, input expansion, outputs, errors, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciscr import cli
from ciscr.config import Config, ModelCfg, config_to_dict
from ciscr.data.transforms import normalize, to_tensor
from ciscr.engine.checkpoint import export_weights, save_checkpoint
from ciscr.engine.evaluate import predict_logits
from ciscr.errors import CheckpointError, ConfigError, DataError
from ciscr.models import build_model
from ciscr.predict import (
    _batches,
    _Item,
    blend_overlay,
    collect_inputs,
    export_metadata,
    load_model_from_checkpoint,
    output_names,
    predict_paths,
)

K = 3
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 250, 5]]
NAMES = ["sky", "road", "car"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _meta() -> dict:
    model_cfg = ModelCfg(backbone="resnet18", output_stride=16, pretrained="")
    cfg = Config(model=model_cfg, train={"crop_size": 32}, eval={"window": 0})
    return {
        "config": config_to_dict(cfg),
        "class_names": NAMES,
        "palette": PALETTE,
        "num_classes": K,
        "mean": MEAN,
        "std": STD,
        "stage": "stage3",
    }


def _model(force_class: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelCfg(backbone="resnet18", output_stride=16, pretrained=""), K)
    if force_class is not None:  # every pixel's argmax becomes force_class
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
            model.classifier.bias[force_class] = 5.0
    return model.eval()


def _save(path: Path, model: torch.nn.Module, meta: dict | None) -> Path:
    state = {"model": model.state_dict(), "iteration": 12}
    if meta is not None:
        state["meta"] = meta
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Other test files run on this 2-core box at the same time: two OpenMP threads then spin
    # against each other and a tiny forward takes a second instead of 25 ms.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("ck") / "checkpoint.pt", _model(), _meta())


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    img = _rgb(h, w, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)  # png (lossless) unless the suffix says otherwise
    return img


def _reference(image: np.ndarray, **kw) -> np.ndarray:
    """What the model predicts, computed here directly: normalise, forward, argmax."""
    x = normalize(to_tensor(image)[None], MEAN, STD)
    probs = predict_logits(_model(), x, kw.pop("mode", "whole"), num_classes=K, **kw)
    return probs.argmax(1)[0].numpy()


def _mask(path: Path) -> tuple[Image.Image, np.ndarray]:
    img = Image.open(path)
    return img, np.asarray(img)


# --------------------------------------------------------------------------- predictions


def test_folder_of_two_sizes(ckpt: Path, tmp_path: Path) -> None:
    a = _write(tmp_path / "in" / "a.png", 37, 53, seed=1)
    b = _write(tmp_path / "in" / "b.png", 64, 48, seed=2)
    (tmp_path / "in" / "notes.txt").write_text("not an image")  # ignored in a folder
    out = tmp_path / "out"
    recs = predict_paths(
        ckpt, [tmp_path / "in"], out, device="cpu", overlay="png", progress=False, batch_size=2
    )
    assert [Path(r["input"]).name for r in recs] == ["a.png", "b.png"]
    for rec, image in zip(recs, (a, b), strict=True):
        img, mask = _mask(Path(rec["mask"]))
        assert img.mode == "P" and mask.shape == image.shape[:2]
        assert img.getpalette()[: 3 * K] == sum(PALETTE, [])
        assert mask.max() < K
        np.testing.assert_array_equal(mask, _reference(image))
        assert Image.open(rec["overlay"]).size == (image.shape[1], image.shape[0])
        assert (rec["height"], rec["width"]) == image.shape[:2]
        counts = np.bincount(mask.ravel(), minlength=K) / mask.size
        assert list(rec["class_pixel_fractions"]) == NAMES
        assert list(rec["class_pixel_fractions"].values()) == pytest.approx(counts, abs=1e-6)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["predictions"] == recs
    assert summary["meta"]["class_names"] == NAMES and summary["meta"]["stage"] == "stage3"
    assert summary["meta"]["iteration"] == 12 and summary["checkpoint"] == str(ckpt)
    assert summary["skipped"] == [] and summary["settings"]["mode"] == "whole"


def test_overlay_is_the_exact_blend(tmp_path: Path) -> None:
    ck = _save(tmp_path / "forced.pt", _model(force_class=2), _meta())
    image = _write(tmp_path / "in" / "x.png", 9, 11, seed=3)
    (rec,) = predict_paths(
        ck,
        [tmp_path / "in" / "x.png"],
        tmp_path / "o",
        device="cpu",
        overlay="png",
        alpha=0.25,
        progress=False,
    )
    _, mask = _mask(Path(rec["mask"]))
    assert (mask == 2).all()
    assert rec["class_pixel_fractions"] == {"sky": 0.0, "road": 0.0, "car": 1.0}
    want = np.rint(0.75 * image.astype(np.float64) + 0.25 * np.array([0, 250, 5]))
    np.testing.assert_array_equal(np.asarray(Image.open(rec["overlay"])), want.astype(np.uint8))


def test_blend_overlay_hand_values() -> None:
    image = np.array([[[100, 0, 255], [0, 0, 0]]], dtype=np.uint8)
    mask = np.array([[1, 0]])
    pal = np.array([[0, 0, 0], [200, 100, 50]], dtype=np.uint8)
    out = blend_overlay(image, mask, pal, 0.5)
    np.testing.assert_array_equal(out, [[[150, 50, 152], [0, 0, 0]]])  # 152.5 rounds to even


def test_glob_input_and_same_stem_from_two_folders(ckpt: Path, tmp_path: Path) -> None:
    _write(tmp_path / "x" / "img.png", 20, 24)
    _write(tmp_path / "y" / "img.png", 20, 24, seed=5)
    _write(tmp_path / "y" / "other.bmp", 20, 24)
    recs = predict_paths(
        ckpt, [str(tmp_path / "*" / "img.png")], tmp_path / "out", device="cpu", progress=False
    )
    assert [Path(r["mask"]).name for r in recs] == ["x_img.png", "y_img.png"]
    assert [Path(r["overlay"]).name for r in recs] == ["x_img_overlay.jpg", "y_img_overlay.jpg"]
    assert Image.open(recs[0]["overlay"]).format == "JPEG"


def test_sliding_window_larger_than_window(ckpt: Path, tmp_path: Path) -> None:
    image = _write(tmp_path / "big.png", 45, 70, seed=7)
    (rec,) = predict_paths(
        ckpt,
        [tmp_path / "big.png"],
        tmp_path / "o",
        mode="sliding",
        window=32,
        device="cpu",
        progress=False,
    )
    img, mask = _mask(Path(rec["mask"]))
    assert img.size == (70, 45)
    np.testing.assert_array_equal(mask, _reference(image, mode="sliding", window=32))
    saved = json.loads((tmp_path / "o" / "predictions.json").read_text())["settings"]
    assert (saved["mode"], saved["window"]) == ("sliding", 32)


def test_sliding_window_defaults_to_checkpoint_crop_size(ckpt: Path, tmp_path: Path) -> None:
    _write(tmp_path / "big.png", 40, 40)
    predict_paths(
        ckpt, [tmp_path / "big.png"], tmp_path / "o", mode="sliding", device="cpu", progress=False
    )
    saved = json.loads((tmp_path / "o" / "predictions.json").read_text())["settings"]
    assert saved["window"] == 32  # train.crop_size of the checkpoint's config


def test_multiscale_flip_slides_large_scales(ckpt: Path, tmp_path: Path) -> None:
    image = _write(tmp_path / "m.png", 20, 24, seed=8)
    (rec,) = predict_paths(
        ckpt,
        [tmp_path / "m.png"],
        tmp_path / "o",
        mode="multiscale",
        scales=(0.5, 1.5),
        flip=True,
        device="cpu",
        progress=False,
    )
    # Scale 1.5 is 30x36, larger than the checkpoint's 32 window: it is slid, as in eval.
    want = _reference(image, mode="multiscale", scales=(0.5, 1.5), flip=True, window=32)
    np.testing.assert_array_equal(_mask(Path(rec["mask"]))[1], want)


def test_safetensors_export_predicts_the_same(ckpt: Path, tmp_path: Path) -> None:
    st = tmp_path / "model.safetensors"
    export_weights(st, _model(), export_metadata(_meta()))
    image = _write(tmp_path / "in" / "a.png", 21, 30, seed=9)
    (rec,) = predict_paths(st, [tmp_path / "in"], tmp_path / "o", device="cpu", progress=False)
    np.testing.assert_array_equal(_mask(Path(rec["mask"]))[1], _reference(image))
    model, meta = load_model_from_checkpoint(st, "cpu")
    assert not model.training and meta["palette"] == PALETTE and meta["mean"] == MEAN
    export_weights(tmp_path / "bare.safetensors", _model(), {"num_classes": "3"})
    with pytest.raises(CheckpointError, match="bare.safetensors.*no ciscr 'config'"):
        load_model_from_checkpoint(tmp_path / "bare.safetensors")


# --------------------------------------------------------------------------- helpers


def test_output_names_resolve_every_clash() -> None:
    paths = [Path("a/x.png"), Path("b/x.jpg"), Path("c/y.png"), Path("c/y_overlay.png")]
    assert output_names(paths, "png") == [
        ("a_x.png", "a_x_overlay.png"),
        ("b_x.png", "b_x_overlay.png"),
        ("y.png", "y_overlay.png"),
        ("y_overlay_2.png", "y_overlay_2_overlay.png"),  # y_overlay.png was taken by y
    ]
    assert output_names([Path("p/q.png")], "none") == [("q.png", None)]


def test_batches_group_equal_sizes() -> None:
    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5)]
    items = [_Item(i, Path(f"{i}.png"), s, f"{i}.png", None) for i, s in enumerate(sizes)]
    got = [[it.index for it in b] for b in _batches(items, 2)]
    assert got == [[0, 2], [3], [1, 4]]


def test_collect_inputs(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "b.jpg", 4, 4)
    _write(tmp_path / "d" / "a.png", 4, 4)
    _write(tmp_path / "d" / "sub" / "c.webp", 4, 4)
    (tmp_path / "d" / ".hidden.png").write_bytes(b"")
    d = tmp_path / "d"
    assert collect_inputs([d]) == [d / "a.png", d / "b.jpg"]
    assert collect_inputs([d], recursive=True) == [d / "a.png", d / "b.jpg", d / "sub" / "c.webp"]
    assert collect_inputs([d / "a.png", str(d / "*.png"), d]) == [d / "a.png", d / "b.jpg"]
    with pytest.raises(DataError, match="nope.png: no such file"):
        collect_inputs([d / "nope.png"])


# --------------------------------------------------------------------------- errors / CLI


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["predict", *map(str, argv), "--no-progress", "--device", "cpu"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_end_to_end(ckpt: Path, tmp_path: Path, capsys) -> None:
    _write(tmp_path / "in" / "p.jpg", 30, 22)
    _write(tmp_path / "in" / "q.png", 30, 22, seed=4)
    out = tmp_path / "res"
    rc, stdout, _ = _cli(
        capsys, ckpt, tmp_path / "in", "--out", out, "--flip", "--batch-size", "2", "--alpha", "0.3"
    )
    assert rc == 0 and "predicted 2 image(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "p.png",
        "p_overlay.jpg",
        "predictions.json",
        "q.png",
        "q_overlay.jpg",
    ]
    settings = json.loads((out / "predictions.json").read_text())["settings"]
    assert settings["flip"] is True and settings["alpha"] == 0.3 and settings["batch_size"] == 2


def test_outputs_inside_the_input_folder(ckpt: Path, tmp_path: Path, capsys) -> None:
    _write(tmp_path / "in" / "p.jpg", 12, 12)
    _write(tmp_path / "in" / "q.png", 12, 12)
    # The mask of q.png would be in/q.png: refused rather than overwriting the input.
    rc, _, err = _cli(capsys, ckpt, tmp_path / "in", "--out", tmp_path / "in")
    assert rc == 2 and "q.png would overwrite an input image" in err
    # Results in a sub-folder, found again by --recursive: a rerun does not predict them.
    for _ in range(2):
        rc, stdout, _ = _cli(
            capsys, ckpt, tmp_path / "in", "--recursive", "--out", tmp_path / "in" / "pred"
        )
        assert rc == 0 and "predicted 2 image(s)" in stdout


def test_corrupt_image_fails_with_its_name(ckpt: Path, tmp_path: Path, capsys) -> None:
    _write(tmp_path / "in" / "good.png", 16, 16)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG garbage")
    rc, _, err = _cli(capsys, ckpt, tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 2
    assert err.startswith("error: ") and "bad.png" in err and "--skip-bad" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_truncated_image_fails_at_decode(ckpt: Path, tmp_path: Path, capsys) -> None:
    _write(tmp_path / "full.png", 40, 40)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, pixels missing
    rc, _, err = _cli(capsys, ckpt, tmp_path / "cut.png", "--out", tmp_path / "o" / "p")
    assert rc == 2 and "cut.png" in err
    assert not (tmp_path / "o").exists()  # a failed predict leaves no (empty) folder behind
    (tmp_path / "kept").mkdir()
    rc, _, _ = _cli(capsys, ckpt, tmp_path / "cut.png", "--out", tmp_path / "kept")
    assert rc == 2 and (tmp_path / "kept").is_dir()  # a folder that existed stays


def test_skip_bad_continues(ckpt: Path, tmp_path: Path, capsys) -> None:
    _write(tmp_path / "in" / "good.png", 16, 16)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"not a jpeg")
    rc, stdout, _ = _cli(capsys, ckpt, tmp_path / "in", "--out", tmp_path / "o", "--skip-bad")
    assert rc == 0 and "predicted 1 image(s)" in stdout
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert [Path(r["input"]).name for r in summary["predictions"]] == ["good.png"]
    assert [Path(s["input"]).name for s in summary["skipped"]] == ["bad.jpg"]
    assert not (tmp_path / "o" / "bad.png").exists()
    rc, _, err = _cli(
        capsys, ckpt, tmp_path / "in" / "bad.jpg", "--out", tmp_path / "o2", "--skip-bad"
    )
    assert rc == 2 and "none of the 1 input image(s) could be read" in err


def test_no_match_is_an_error(ckpt: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = _cli(capsys, ckpt, str(tmp_path / "*.png"), "--out", tmp_path / "o")
    assert rc == 2 and "no images matched" in err
    rc, _, err = _cli(capsys, ckpt, tmp_path / "missing.jpg", "--out", tmp_path / "o")
    assert rc == 2 and "missing.jpg: no such file or folder" in err


def test_checkpoint_without_meta(tmp_path: Path, capsys) -> None:
    bare = _save(tmp_path / "bare.pt", _model(), meta=None)
    with pytest.raises(CheckpointError, match="bare.pt: checkpoint has no meta"):
        load_model_from_checkpoint(bare)
    _write(tmp_path / "a.png", 8, 8)
    rc, _, err = _cli(capsys, bare, tmp_path / "a.png", "--out", tmp_path / "o")
    assert rc == 2 and "bare.pt" in err and "no meta" in err


def test_mismatched_weights_and_bad_options(tmp_path: Path, ckpt: Path) -> None:
    meta = _meta()
    meta["num_classes"], meta["class_names"] = 4, ["a", "b", "c", "d"]
    wrong = _save(tmp_path / "wrong.pt", _model(), meta)
    with pytest.raises(CheckpointError, match="wrong.pt: weights do not fit"):
        load_model_from_checkpoint(wrong)
    _write(tmp_path / "a.png", 8, 8)
    with pytest.raises(ConfigError, match="--alpha"):
        predict_paths(ckpt, [tmp_path / "a.png"], tmp_path / "o", alpha=1.5)
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        predict_paths(ckpt, [tmp_path / "a.png"], tmp_path / "o", amp="fp16", device="cpu")
