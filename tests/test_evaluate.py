"""ConfusionMatrix / mIoU hand values, prediction modes, evaluate(), ce_loss."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ciscr.config import EvalCfg
from ciscr.engine.evaluate import (
    ConfusionMatrix,
    eval_indices,
    evaluate,
    format_miou_table,
    predict_logits,
)
from ciscr.engine.losses import ce_loss
from ciscr.errors import ConfigError


class Out(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class Conv1x1(nn.Module):
    """Translation-equivariant (pointwise) model: a window sees exactly what the whole sees."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> Out:
        self.shapes.append(tuple(x.shape))
        y = self.conv(x)
        return Out(y, y.relu())


class Ramp(nn.Module):
    """Ignores the content: class-0 logit grows with the column index (not flip-invariant)."""

    def forward(self, x: torch.Tensor) -> Out:
        b, _, h, w = x.shape
        logits = torch.zeros(b, 2, h, w)
        logits[:, 0] = torch.linspace(-2.0, 2.0, w)
        return Out(logits, logits)


class Oracle(nn.Module):
    """Predicts the class stored in channel 0 of the image."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> Out:
        logits = F.one_hot(x[:, 0].long(), self.k).permute(0, 3, 1, 2).float() * 10
        return Out(logits, logits)


# Hand example (K=4, class 3 absent from GT and predictions; one pixel ignored):
#   (t,p) pairs on valid pixels: (0,0) (0,1) (1,1) (1,1) (2,2) (0,2) (1,0)
#   GT counts 3,3,1; pred counts 2,3,2; diag 1,2,1
#   IoU0 = 1/(3+2-1) = .25, IoU1 = 2/(3+3-2) = .5, IoU2 = 1/(1+2-1) = .5, IoU3 undefined
TARGET = torch.tensor([[0, 0, 1, 1], [255, 2, 0, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 2, 2, 0]])


def test_confusion_matrix_hand_values() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED[None], TARGET[None])
    m = cm.compute()
    assert m["iou"] == [0.25, 0.5, 0.5, None]
    assert m["absent_classes"] == [3]
    assert m["miou"] == pytest.approx(1.25 / 3)
    assert m["acc"] == pytest.approx(4 / 7)
    assert m["mean_acc"] == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert m["num_pixels"] == 7
    assert cm.mat[0].tolist() == [1, 1, 1, 0]


def test_confusion_matrix_merge_equals_single_update_and_predicted_only_class() -> None:
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(PRED[0], TARGET[0])
    b.update(PRED[1].flatten(), TARGET[1].flatten())
    whole = ConfusionMatrix(4)
    whole.update(PRED, TARGET)
    assert torch.equal(a.merge(b).mat, whole.mat)
    # a class only predicted (never in GT) has union > 0 and IoU 0, and it counts in the mean
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    m = cm.compute()
    assert m["iou"] == [0.5, None, 0.0]
    assert m["miou"] == pytest.approx(0.25)
    # labels >= K are skipped like ignore
    cm.update(torch.tensor([0]), torch.tensor([7]))
    assert cm.compute()["num_pixels"] == 2


def test_format_table_marks_absent_classes() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    text = format_miou_table(cm.compute(), ["bg", "road", "car"])
    lines = text.splitlines()
    assert lines[2].split() == ["bg", "25.00"]
    assert lines[5].split() == ["class_3", "absent"]
    assert "41.67" in text and "(over 3 classes)" in text


def test_sliding_equals_whole_for_pointwise_model() -> None:
    model = Conv1x1().eval()
    x = torch.randn(2, 3, 10, 13)
    whole = predict_logits(model, x, "whole", num_classes=3, flip=True)
    model.shapes.clear()
    slid = predict_logits(model, x, "sliding", num_classes=3, window=6, flip=True)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-6)
    # stride 4: rows at 0,4 and columns at 0,4,7 -> 6 windows, each also flipped
    assert model.shapes == [(2, 3, 6, 6)] * 12
    # image smaller than the window: padded, then cropped back
    small = x[:, :, :5, :4]
    out = predict_logits(model, small, "sliding", num_classes=3, window=8)
    torch.testing.assert_close(out, predict_logits(model, small, "whole", num_classes=3))


def test_flip_averages_mirrored_views() -> None:
    x = torch.randn(1, 3, 4, 6)
    plain = predict_logits(Ramp(), x, "whole", num_classes=2, flip=False)
    flipped = predict_logits(Ramp(), x, "whole", num_classes=2, flip=True)
    assert not torch.allclose(plain, plain.flip(-1))
    torch.testing.assert_close(flipped, flipped.flip(-1))  # ramp + reversed ramp is symmetric
    torch.testing.assert_close(flipped, (plain + plain.flip(-1)) / 2)


def test_multiscale_shape_and_values() -> None:
    model = Conv1x1().eval()
    x = torch.randn(2, 3, 9, 11)
    ms = predict_logits(model, x, "multiscale", num_classes=3, scales=(0.5, 1.0, 1.5), flip=True)
    assert ms.shape == (2, 3, 9, 11)
    torch.testing.assert_close(ms.sum(1), torch.ones(2, 9, 11))
    one = predict_logits(model, x, "multiscale", num_classes=3, scales=(1.0,))
    torch.testing.assert_close(one, predict_logits(model, x, "whole", num_classes=3))
    # a constant image gives the same prediction at every scale
    const = torch.ones(1, 3, 8, 8) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    msc = predict_logits(model, const, "multiscale", num_classes=3, scales=(0.5, 2.0), window=6)
    torch.testing.assert_close(msc, predict_logits(model, const, "whole", num_classes=3))
    # scale 2.0 exceeds window 6 -> sliding windows of 6x6; scale 0.5 (4x4) is one forward
    model.shapes.clear()
    predict_logits(model, const, "multiscale", num_classes=3, scales=(0.5, 2.0), window=6)
    assert model.shapes[0] == (1, 3, 4, 4) and set(model.shapes[1:]) == {(1, 3, 6, 6)}


def test_sliding_without_window_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="eval.window"):
        predict_logits(Conv1x1(), torch.zeros(1, 3, 4, 4), "sliding", num_classes=3)


def test_evaluate_with_oracle_model_restores_train_mode() -> None:
    image = torch.zeros(1, 3, 2, 4)
    image[0, 0] = PRED.float()
    batch = {"image": image, "mask": TARGET[None]}
    model = Oracle(4).train()
    cfg = EvalCfg(mode="sliding", window=2, flip=True)
    m = evaluate(model, [batch, batch], 4, cfg, "cpu", progress=False)
    assert model.training
    assert m["iou"] == [0.25, 0.5, 0.5, None] and m["num_pixels"] == 14
    m1 = evaluate(model, [batch, batch], 4, EvalCfg(mode="whole"), "cpu", max_batches=1)
    assert m1["num_pixels"] == 7
    assert eval_indices(7, 1, 3) == [1, 4]


def test_ce_loss_hand_values_with_ignore_and_weights() -> None:
    # two pixels: logits (0, ln 3) -> p(class 1) = 3/4; third pixel ignored
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)
    with torch.no_grad():
        logits[0, 1] = torch.log(torch.tensor(3.0))
    target = torch.tensor([[[1, 0, 255]]])
    ce1, ce0 = -torch.log(torch.tensor(0.75)), -torch.log(torch.tensor(0.25))
    torch.testing.assert_close(ce_loss(logits, target), (ce1 + ce0) / 2)
    w = torch.tensor([[[0.5, 2.0, 100.0]]], requires_grad=True)
    loss = ce_loss(logits, target, weight_map=w)
    torch.testing.assert_close(loss, (0.5 * ce1 + 2.0 * ce0) / 2)
    loss.backward()
    assert w.grad is None and logits.grad is not None
    empty = ce_loss(logits, torch.full((1, 1, 3), 255))
    assert empty.item() == 0.0 and empty.requires_grad


def test_eval_chunks_are_dealt_whole_to_ranks() -> None:
    from ciscr.engine.evaluate import eval_chunk_indices

    assert eval_chunk_indices(5, 2, 0, 1) == [0, 1, 2, 3, 4]
    assert eval_chunk_indices(5, 2, 0, 2) == [0, 1, 4]  # chunks [0,1] [4]
    assert eval_chunk_indices(5, 2, 1, 2) == [2, 3]
    assert eval_chunk_indices(5, 8, 1, 2) == []  # one chunk: rank 1 has nothing to do
    assert eval_chunk_indices(3, 1, 1, 2) == [1]  # batch 1: the plain strided shard


def test_evaluate_batches_images_of_one_size_and_chunk() -> None:
    from ciscr.engine.evaluate import _grouped

    def item(i: int, h: int) -> dict:
        return {"image": torch.full((1, 3, h, 4), float(i)), "mask": torch.zeros(1, h, 4).long(),
                "index": torch.tensor([i])}

    items = [item(0, 2), item(1, 2), item(2, 2), item(3, 3), item(4, 2)]
    got = [b["image"][:, 0, 0, 0].tolist() for b in _grouped(items, 2)]
    # 0,1 = chunk 0; 2 = chunk 1 (3 differs in size); 4 = chunk 2
    assert got == [[0.0, 1.0], [2.0], [3.0], [4.0]]
    assert [len(b["image"]) for b in _grouped(items, 8)] == [3, 1, 1]  # same chunk, size change
    assert [len(b["image"]) for b in _grouped(items, 1)] == [1] * 5
    # the metrics do not depend on the grouping (a pointwise model), and max_batches counts
    # the loader's own batches
    model = Conv1x1(3)
    cfg = {"mode": "whole", "flip": False}
    one = evaluate(model, items, 3, EvalCfg(**cfg, batch_size=1), "cpu", progress=False)
    many = evaluate(model, items, 3, EvalCfg(**cfg, batch_size=8), "cpu", progress=False)
    assert one == many and many["num_pixels"] == 4 * (2 * 4 + 3)
    assert model.shapes[-3:] == [(3, 3, 2, 4), (1, 3, 3, 4), (1, 3, 2, 4)]
    part = evaluate(model, items, 3, EvalCfg(mode="whole", batch_size=8), "cpu", max_batches=2)
    assert part["num_pixels"] == 2 * 8
