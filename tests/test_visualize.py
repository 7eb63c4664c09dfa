"""ciscr visualize: class parsing, colours, the CISC map on hand-made features, the CLI."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciscr import cli
from ciscr.config import Config, ModelCfg, config_to_dict
from ciscr.engine.checkpoint import save_checkpoint
from ciscr.errors import ConfigError
from ciscr.models import SegOutput, build_model
from ciscr.visualize import (
    IGNORE_COLOUR,
    cisc_figure,
    cisc_map_of,
    colorize,
    figure_png,
    fit_size,
    highlight,
    parse_class,
    predict_label,
)

NAMES = ["sky", "road", "car"]
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 250, 5]]
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


class _Stub(torch.nn.Module):
    """features = (R, G) of the image (in [0, 1] with mean 0 / std 1), logits = (R, G, 0.5):
    every CISC value is a cosine of two 2-D colour vectors, computable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x: torch.Tensor) -> SegOutput:
        logits = torch.cat([x[:, :2], torch.full_like(x[:, :1], 0.5)], dim=1)
        return SegOutput(logits, x[:, :2])


def _fill(h: int, w: int, colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


META = {"class_names": NAMES, "palette": PALETTE, "mean": [0.0, 0.0, 0.0], "std": [1, 1, 1]}


def test_parse_class_by_index_and_name() -> None:
    assert parse_class("2", NAMES) == 2
    assert parse_class(0, NAMES) == 0
    assert parse_class("Road", NAMES) == 1  # case-insensitive
    for bad in ("3", "-1", "dog"):
        with pytest.raises(ConfigError, match=r"--cls .*0=sky, 1=road, 2=car") as err:
            parse_class(bad, NAMES)
        assert "\n" not in str(err.value)


def test_colorize_uses_palette_and_void_colour() -> None:
    mask = np.array([[0, 1], [255, 7]], np.uint8)  # 7 is beyond the palette
    rgb = colorize(mask, PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == PALETTE[0] and rgb[0, 1].tolist() == PALETTE[1]
    assert rgb[1, 0].tolist() == list(IGNORE_COLOUR) == rgb[1, 1].tolist()


def test_highlight_and_fit_size() -> None:
    img = _fill(2, 2, (100, 200, 40))
    region = np.array([[True, False], [False, False]])
    out = highlight(img, region, (0, 0, 255))
    assert out[0, 0].tolist() == [50, 100, 148]  # 0.5 * img + 0.5 * colour
    assert out[1, 1].tolist() == [35, 70, 14]  # 0.35 * img outside the region
    big = np.zeros((100, 40), np.uint8)
    assert fit_size(big, 50, nearest=True).shape == (50, 20)
    assert fit_size(big, 200) is big


def test_cisc_map_is_the_cosine_to_the_class_prototype() -> None:
    # Labeled image: class 1 ('road') is red, the rest blue -> prototype direction (1, 0).
    labeled = _fill(4, 4, BLUE)
    labeled[:2] = RED
    mask = np.zeros((4, 4), np.uint8)
    mask[:2] = 1
    # Image: red left half (cos 1), green right half (cos 0), one yellow pixel (cos 1/sqrt 2).
    image = _fill(3, 4, GREEN)
    image[:, :2] = RED
    image[0, 3] = YELLOW
    model = _Stub().train()
    cmap, pred = cisc_map_of(model, image, labeled, mask, 1, META["mean"], META["std"])
    assert model.training  # the mode is restored
    expected = np.array([[1, 1, 0, 1 / math.sqrt(2)], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(cmap, expected, atol=1e-6)
    # argmax of (R, G, 0.5): red -> 0, green -> 1; yellow ties R = G -> the first, 0.
    assert pred.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert np.array_equal(predict_label(model, image, META["mean"], META["std"]), pred)
    # A class absent from the mask gives the zero prototype and an all-zero map.
    cmap0, _ = cisc_map_of(model, image, labeled, mask, 2, META["mean"], META["std"])
    assert not cmap0.any()


def test_cisc_figure_has_four_panels_and_renders() -> None:
    labeled = _fill(8, 8, BLUE)
    labeled[:4] = RED
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 1
    image = _fill(8, 8, RED)
    pseudo = np.ones((8, 8), np.uint8)
    fig = cisc_figure(_Stub(), image, labeled, mask, 1, META, pseudo=pseudo, title="t")
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == [
        "image",
        "pseudo label",
        "query: 'road' (50% of pixels)",
        "CISC map of 'road'",
    ]
    shown = fig.axes[3].images[0].get_array()
    np.testing.assert_allclose(np.asarray(shown), 1.0, atol=1e-6)  # all red: cosine 1
    png = Image.open(io.BytesIO(figure_png(fig)))
    assert png.format == "PNG" and png.size[0] > 400
    pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vis")
    torch.manual_seed(0)
    model_cfg = ModelCfg(backbone="resnet18", output_stride=16, pretrained="", channels=16)
    model = build_model(model_cfg, len(NAMES))
    meta = {
        "config": config_to_dict(Config(model=model_cfg)),
        "class_names": NAMES,
        "palette": PALETTE,
        "num_classes": 3,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_checkpoint(d / "checkpoint.pt", {"model": model.state_dict(), "meta": meta})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(d / "u.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / "l.png")
    mask = np.zeros((24, 24), np.uint8)
    mask[4:12, 4:12] = 2
    mask[0, 0] = 255
    Image.fromarray(mask, mode="L").save(d / "l_mask.png")
    return {
        "ckpt": d / "checkpoint.pt",
        "u": d / "u.png",
        "l": d / "l.png",
        "m": d / "l_mask.png",
        "dir": d,
    }


def _argv(f: dict[str, Path], cls: str, out: Path) -> list[str]:
    return [
        "visualize",
        str(f["ckpt"]),
        "--image",
        str(f["u"]),
        "--labeled",
        str(f["l"]),
        "--mask",
        str(f["m"]),
        "--cls",
        cls,
        "--out",
        str(out),
    ]


def test_cli_writes_png(files, capsys) -> None:
    out = files["dir"] / "fig.png"
    assert cli.main(_argv(files, "car", out)) == 0
    assert capsys.readouterr().out.strip() == f"written: {out}"
    png = Image.open(out)
    assert png.format == "PNG" and png.size[0] > 600
    assert cli.main(_argv(files, "2", files["dir"] / "fig2.png")) == 0  # by index


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            "dog",
            "error: --cls dog: not a class of this checkpoint; choose one of 0=sky, 1=road, 2=car",
        ),
        ("road", "has no pixel in this mask; it contains sky, car"),
    ],
)
def test_cli_bad_class_exits_2_with_one_line(files, capsys, cls, message) -> None:
    out = files["dir"] / f"bad_{cls}.png"
    assert cli.main(_argv(files, cls, out)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
