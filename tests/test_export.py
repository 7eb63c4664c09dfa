"""ciscr export: ONNX graph vs PyTorch with onnxruntime, metadata, predict from the .onnx file,
and a clear error without the optional extra."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciscr import cli
from ciscr.config import Config, ModelCfg, config_to_dict
from ciscr.engine.checkpoint import save_checkpoint
from ciscr.engine.evaluate import predict_logits
from ciscr.errors import CheckpointError, ConfigError, DependencyError
from ciscr.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    RELATIVE_TOLERANCE,
    load_onnx_model,
)
from ciscr.models import build_model
from ciscr.predict import load_model_from_checkpoint, predict_paths

REPO = Path(__file__).resolve().parents[1]
K = 3
NAMES = ["other", "road", "car"]
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 250, 5]]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
MODEL = ModelCfg(backbone="resnet18", output_stride=16, pretrained="", channels=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(MODEL, K).eval()
    cfg = Config(model=MODEL, train={"crop_size": 32})
    meta = {"config": config_to_dict(cfg), "class_names": NAMES, "palette": PALETTE,
            "num_classes": K, "mean": MEAN, "std": STD, "stage": "stage3"}
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    save_checkpoint(path, {"model": model.state_dict(), "iteration": 7, "meta": meta})
    return path


@pytest.fixture(scope="module")
def cli_export(ckpt: Path) -> tuple[Path, str]:
    """The model exported once, by the CLI (``ciscr export``, verified with onnxruntime), and
    what it printed: every ONNX test reads this one file (an export takes seconds)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = ckpt.parent / "sub" / "model.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["export", str(ckpt), "--out", str(out)]) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def onnx_file(cli_export: tuple[Path, str]) -> Path:
    return cli_export[0]


def _images(folder: Path) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    out = []
    for i, (h, w) in enumerate([(37, 53), (64, 48)]):
        img = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"im{i}.png")
        out.append(img)
    return out


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 45, 77)])
def test_onnxruntime_matches_pytorch_logits(ckpt: Path, onnx_file: Path, shape) -> None:
    """Stated tolerance: max |difference| <= RELATIVE_TOLERANCE (1e-3) x max |logit|."""
    import onnxruntime as ort

    model, _ = load_model_from_checkpoint(ckpt, "cpu")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits.numpy()
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    assert got.shape == ref.shape == (shape[0], K, shape[2], shape[3])
    assert np.abs(got - ref).max() <= RELATIVE_TOLERANCE * max(1.0, np.abs(ref).max())


def test_the_file_alone_carries_classes_palette_and_normalisation(onnx_file: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    raw = sess.get_modelmeta().custom_metadata_map
    meta = {k: json.loads(v) for k, v in raw.items()}
    assert meta["class_names"] == NAMES and meta["palette"] == PALETTE
    assert meta["mean"] == MEAN and meta["std"] == STD and meta["num_classes"] == K
    assert meta["config"]["model"]["backbone"] == "resnet18" and meta["iteration"] == 7
    dims = [d.dim_param or d.dim_value for d in _input_dims(onnx_file)]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))


def _input_dims(path: Path):
    import onnx

    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim


@pytest.mark.parametrize("kw", [{}, {"mode": "sliding", "window": 24, "flip": True}])
def test_predict_from_onnx_gives_the_checkpoints_masks(ckpt, onnx_file, tmp_path, kw) -> None:
    images = _images(tmp_path / "in")
    a = predict_paths(ckpt, [tmp_path / "in"], tmp_path / "pt", device="cpu", progress=False, **kw)
    b = predict_paths(onnx_file, [tmp_path / "in"], tmp_path / "ox", device="cpu",
                      progress=False, **kw)
    model, _ = load_model_from_checkpoint(ckpt, "cpu")
    for ra, rb, image in zip(a, b, images, strict=True):
        ma, mb = np.asarray(Image.open(ra["mask"])), np.asarray(Image.open(rb["mask"]))
        assert Image.open(rb["mask"]).getpalette()[: 3 * K] == sum(PALETTE, [])
        # Identical except where PyTorch itself is undecided (top-2 probabilities within 1e-4:
        # float32 summation order may then pick either class).
        x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 -
             torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        probs = predict_logits(model, x, kw.get("mode", "whole"), num_classes=K,
                               window=kw.get("window", 0), flip=kw.get("flip", False))[0]
        top2 = probs.topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-4).numpy()
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(ma[clear], mb[clear])
    summary = json.loads((tmp_path / "ox" / "predictions.json").read_text())
    assert summary["checkpoint"] == str(onnx_file) and summary["meta"]["class_names"] == NAMES


def test_readme_onnxruntime_snippet_segments_an_image(ckpt, onnx_file, tmp_path, monkeypatch):
    """The README's "Deploying a model" snippet, run as written, gives predict's mask."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Deploying a model"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    image = _images(tmp_path / "in")[0]
    monkeypatch.chdir(tmp_path)
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=100)
    (tmp_path / "model.onnx").symlink_to(onnx_file)
    exec(compile(snippet, "README.md snippet", "exec"), {})
    rec = predict_paths(ckpt, [tmp_path / "photo.jpg"], tmp_path / "pred", device="cpu",
                        progress=False)[0]
    got, want = Image.open(tmp_path / "mask.png"), np.asarray(Image.open(rec["mask"]))
    assert got.mode == "P" and got.getpalette()[: 3 * K] == sum(PALETTE, [])
    assert (np.asarray(got) == want).mean() > 0.999


def test_export_cli_verifies_with_onnxruntime(cli_export, ckpt: Path, tmp_path: Path,
                                              capsys) -> None:
    out, stdout = cli_export
    assert f"written: {out}" in stdout and "verified with onnxruntime" in stdout
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temporary file left
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "m.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_bad_onnx_inputs_are_one_line_errors(ckpt, onnx_file, tmp_path) -> None:
    import onnx

    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match="no ciscr metadata .*ciscr export"):
        load_onnx_model(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"junk\.onnx: cannot load the ONNX model"):
        load_onnx_model(tmp_path / "junk.onnx")
    with pytest.raises(ConfigError, match="--amp bf16: an ONNX model"):
        predict_paths(onnx_file, [tmp_path / "junk.onnx"], tmp_path / "o", amp="bf16")


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript"])
def test_without_the_extra_export_says_how_to_install_it(ckpt, tmp_path, monkeypatch, capsys,
                                                         missing) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import now raises ImportError
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ciscr export needs the optional ONNX packages")
    assert "pip install 'ciscr[onnx]'" in err and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_without_onnxruntime_predict_on_onnx_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(DependencyError, match=r"pip install 'ciscr\[onnx\]'"):
        load_onnx_model(tmp_path / "m.onnx")
