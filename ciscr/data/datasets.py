"""Torch ``Dataset`` views over sample lists: labeled/val images and unlabeled images.

Every random choice of an item is drawn from a generator seeded from ``(seed, epoch, index)``
(:func:`make_generator`), so an item is a pure function of those three numbers: a resumed run
sees exactly the augmentations of an uninterrupted one, whatever ``num_workers`` is.

Batching: training crops all have the same size, so the default collate works. Validation
images keep their own size; use ``batch_size=1`` or :func:`pad_collate` (pads images with 0
and masks with the ignore index, which the confusion matrix skips).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from ciscr.data.io import read_image, read_mask
from ciscr.data.transforms import (
    TrainTransform,
    cutout,
    normalize,
    random_box,
    strong_photometric,
    to_tensor,
)
from ciscr.errors import CiscrError, DataError

if TYPE_CHECKING:
    from ciscr.data.formats import Sample

_U64 = 2**64


def make_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch, index)``.

    numpy's SeedSequence hashes the triple, so nearby triples such as (0, 1, 0) and (0, 0, 1)
    give unrelated streams (a linear mix like ``seed*a + epoch*b + index`` collides).
    """
    ss = np.random.SeedSequence([seed % _U64, epoch % _U64, index % _U64])
    state = int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1  # 63 bits: a valid torch seed
    g = torch.Generator()
    g.manual_seed(state)
    return g


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.tensor(mask).long()  # copies: read masks may be read-only arrays


class _Base(Dataset):
    """Shared parts: the sample list, ``repeat``, the epoch and per-item generators."""

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        ignore_index: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_size: int,
        scale_range: tuple[float, float],
        seed: int,
        repeat: int,
    ) -> None:
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.samples = list(samples)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed, self.repeat, self.epoch = seed, repeat, 0
        self.weak = TrainTransform(crop_size, scale_range, ignore_index)

    def __len__(self) -> int:
        return len(self.samples) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (call before iterating, on every rank)."""
        self.epoch = epoch

    def _locate(self, index: int) -> tuple[int, torch.Generator]:
        """(position in ``samples``, generator of this dataset index in the current epoch)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        # The generator is keyed on the dataset index, so the repeated copies of a sample get
        # different augmentations within one epoch.
        return index % len(self.samples), make_generator(self.seed, self.epoch, index)

    def _read_mask(self, path: Path, image: np.ndarray) -> np.ndarray:
        return read_mask(path, self.num_classes, self.ignore_index, expect_size=image.shape[:2])

    def _ignore_mask(self, image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)


class SegDataset(_Base):
    """Labeled images with ground truth (training with weak augmentation, or validation).

    Item: ``image`` float (3, h, w) normalised; ``mask`` int64 (h, w) with ``ignore_index`` for
    void and padding; ``id`` str; ``index`` int = position in ``samples`` (repeated copies share
    it). ``train=True``: random scale/crop/flip (h = w = crop_size); ``train=False``: the image
    at its own size, untouched. ``repeat`` multiplies the length (small labeled sets are
    repeated twice per epoch, METHOD.md section 6).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        ignore_index: int = 255,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        train: bool = False,
        crop_size: int = 321,
        scale_range: tuple[float, float] = (0.5, 2.0),
        seed: int = 0,
        repeat: int = 1,
    ) -> None:
        super().__init__(
            samples, num_classes, ignore_index, mean, std, crop_size, scale_range, seed, repeat
        )
        self.train = train
        missing = [s for s in self.samples if s.mask is None]
        if missing:
            raise DataError(
                f"{missing[0].image}: image '{missing[0].id}' has no mask, but a labeled or "
                f"validation set needs one for every image ({len(missing)} missing)"
            )

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, g = self._locate(index)
        s = self.samples[i]
        image = read_image(s.image)
        mask = _mask_tensor(self._read_mask(s.mask, image))
        img = to_tensor(image)
        if self.train:
            img, (mask,) = self.weak(img, [mask], g)
        return {
            "image": normalize(img, self.mean, self.std),
            "mask": mask,
            "id": s.id,
            "index": i,
        }


class UnlabeledDataset(_Base):
    """Unlabeled images, with their pseudo labels when training.

    ``pseudo_dir`` given (rectified training): item = ``image`` float (3, crop, crop) after weak
    scale/crop/flip and, if ``strong``, strong photometric augmentation; ``pseudo`` int64
    (crop, crop) read from ``pseudo_dir/<id>.png`` (``ignore_index`` where padded); ``conf``
    float (crop, crop), the teacher's confidence from ``conf_dir/<id>.png`` (all 1 without a
    ``conf_dir``); ``gt``; ``id``; ``index``. Image, pseudo, conf and gt share the same
    geometric transform; ``cutout`` (ST++) voids a random box of the pseudo label after the
    strong augmentation.

    ``pseudo_dir=None`` (pseudo-labelling / scoring pass): item = ``image`` normalised at full
    size with no augmentation, ``gt``, ``id``, ``index``.

    ``gt`` int64 (h, w) is the ground truth when ``sample.mask`` exists, else all
    ``ignore_index``. !!! gt is ONLY FOR SCORING pseudo labels (METHOD.md Table 5 / Fig. 10).
    It must never reach a loss: using it would leak unlabeled ground truth into training. !!!
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        pseudo_dir: str | Path | None,
        num_classes: int,
        ignore_index: int = 255,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        crop_size: int = 321,
        scale_range: tuple[float, float] = (0.5, 2.0),
        seed: int = 0,
        strong: bool = True,
        repeat: int = 1,
        conf_dir: str | Path | None = None,
        cutout: bool = False,
    ) -> None:
        super().__init__(
            samples, num_classes, ignore_index, mean, std, crop_size, scale_range, seed, repeat
        )
        self.pseudo_dir = Path(pseudo_dir) if pseudo_dir is not None else None
        self.conf_dir = Path(conf_dir) if conf_dir is not None else None
        self.strong, self.cutout = strong, cutout

    def pseudo_path(self, sample_id: str) -> Path:
        """Where the pseudo label of ``sample_id`` is read from: ``pseudo_dir/<id>.png``."""
        if self.pseudo_dir is None:
            raise ValueError("this UnlabeledDataset has no pseudo_dir")
        return self.pseudo_dir / f"{sample_id}.png"

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, g = self._locate(index)
        s = self.samples[i]
        image = read_image(s.image)
        gt_np = self._read_mask(s.mask, image) if s.mask is not None else self._ignore_mask(image)
        gt = _mask_tensor(gt_np)
        img = to_tensor(image)
        if self.pseudo_dir is None:
            return {"image": normalize(img, self.mean, self.std), "gt": gt, "id": s.id, "index": i}
        pseudo = _mask_tensor(self._read_mask(self.pseudo_path(s.id), image))
        masks = [pseudo, gt]
        if self.conf_dir is not None:
            # The teacher's confidence travels as a uint8 map (255 = 1.0) through the same
            # geometry; padding reads 255 (its pseudo label is void anyway).
            masks.append(self._confidence(s.id, image))
        img, (pseudo, gt, *conf) = self.weak(img, masks, g)
        # Without confidence maps every pixel counts fully (no full-size map to resize).
        conf = conf[0].float() / 255.0 if conf else torch.ones(pseudo.shape)
        if self.strong:
            img = strong_photometric(img, g)
        if self.cutout:
            img, pseudo = cutout(img, pseudo, g, ignore_index=self.ignore_index)
        return {
            "image": normalize(img, self.mean, self.std),
            "pseudo": pseudo,
            "conf": conf,
            "gt": gt,
            "id": s.id,
            "index": i,
        }

    def _confidence(self, sample_id: str, image: np.ndarray) -> torch.Tensor:
        """The uint8 confidence map of ``sample_id`` (255 = 1.0) from ``conf_dir``."""
        path = self.conf_dir / f"{sample_id}.png"
        return _mask_tensor(read_mask(path, 256, self.ignore_index, expect_size=image.shape[:2]))


class MixedDataset(Dataset):
    """ST++'s retraining list: the labeled items, then the pseudo-labelled items, all as
    ``{image, mask, conf, is_pseudo}`` so that one batch mixes them.

    ``labeled``: a training :class:`SegDataset` (built with ``repeat = ceil(N_u / N_l)`` as
    ST++ does; each repetition is its own index, so its own augmentation); ``pseudo``: datasets
    of :class:`UnlabeledDataset` items, whose ``pseudo`` becomes ``mask``. The ground truth of
    unlabeled images is dropped here: it must never reach a loss.
    """

    def __init__(self, labeled: Dataset, pseudo: Sequence[Dataset]) -> None:
        self.parts = [labeled, *pseudo]
        self.offsets = np.cumsum([0] + [len(d) for d in self.parts])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_labeled(self) -> int:
        """Labeled items in one pass over the list (repetitions counted)."""
        return int(self.offsets[1])

    def set_epoch(self, epoch: int) -> None:
        for d in self.parts:
            d.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        it = self.parts[part][index - int(self.offsets[part])]
        if part == 0:
            return {"image": it["image"], "mask": it["mask"],
                    "conf": torch.ones(it["mask"].shape), "is_pseudo": False}
        return {"image": it["image"], "mask": it["pseudo"], "conf": it["conf"], "is_pseudo": True}


class UnlabeledViews(_Base):
    """Unlabeled images for the online family (FixMatch / UniMatch), no pseudo labels on disk.

    Item: ``image_w`` the weak view (scale / crop / flip), ``image_s1`` .. ``image_s{views}``
    strong photometric views of the same crop (each its own draw), ``box1`` .. ``box{views}``
    (crop, crop) uint8 CutMix boxes (1 = take the mixing image there; all 0 with probability
    1 - ``cutmix_p``), ``valid`` (crop, crop) bool (False on padding), ``gt`` (ONLY to score the
    online pseudo labels, never a loss), ``index``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        ignore_index: int = 255,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        crop_size: int = 321,
        scale_range: tuple[float, float] = (0.5, 2.0),
        seed: int = 0,
        views: int = 2,
        cutmix_p: float = 0.5,
    ) -> None:
        super().__init__(
            samples, num_classes, ignore_index, mean, std, crop_size, scale_range, seed, 1
        )
        self.views, self.cutmix_p = views, cutmix_p

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, g = self._locate(index)
        s = self.samples[i]
        image = read_image(s.image)
        gt_np = self._read_mask(s.mask, image) if s.mask is not None else self._ignore_mask(image)
        valid = torch.zeros(image.shape[:2], dtype=torch.long)  # 0 = image, ignore = padding
        img, (gt, valid) = self.weak(to_tensor(image), [_mask_tensor(gt_np), valid], g)
        item: dict[str, Any] = {"image_w": normalize(img, self.mean, self.std), "gt": gt,
                                "valid": valid == 0, "index": i}
        h, w = img.shape[-2:]
        for v in range(1, self.views + 1):
            item[f"image_s{v}"] = normalize(strong_photometric(img, g), self.mean, self.std)
            item[f"box{v}"] = random_box(h, w, g, self.cutmix_p)
        return item


def pad_collate(batch: list[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Collate items of different sizes by padding right/bottom to the largest (H, W).

    ``image`` (3, H, W) is padded with 0 (the mean colour once normalised); every 2-D integer
    tensor (``mask``, ``pseudo``, ``gt``) with ``ignore_index``, so padding never counts in
    metrics or losses. Other keys are collated by ``default_collate`` (ids -> list of str,
    indices -> int64 tensor). Use ``functools.partial`` for another ignore index.

    Returns:
        dict with ``image`` (B, 3, Hmax, Wmax) and masks (B, Hmax, Wmax).
    """
    hmax = max(int(item["image"].shape[-2]) for item in batch)
    wmax = max(int(item["image"].shape[-1]) for item in batch)
    padded = []
    for item in batch:
        out = dict(item)
        for key, val in item.items():
            if not isinstance(val, torch.Tensor) or val.dim() < 2:
                continue
            pad = (0, wmax - val.shape[-1], 0, hmax - val.shape[-2])
            fill = 0.0 if val.is_floating_point() else ignore_index
            out[key] = F.pad(val, pad, value=fill)
        padded.append(out)
    return default_collate(padded)


class _Failed:
    """A user error raised while loading an item, carried out of a worker process as data."""

    def __init__(self, error: CiscrError) -> None:
        self.error = error


class _Carrier(Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.ds[key]
        except CiscrError as err:
            return _Failed(err)


class _CarryingCollate:
    """Collate, unless an item failed: then the failure is the batch (a class, so it pickles)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[Any]) -> Any:
        for item in batch:
            if isinstance(item, _Failed):
                return item
        return self.collate(batch)


class WorkerSafeLoader:
    """A ``DataLoader`` whose user errors (:class:`CiscrError`) come out as themselves.

    PyTorch re-raises an exception from a worker process with the message "Caught DataError in
    DataLoader worker process 0. Original Traceback ..." (a whole traceback), which would break
    the one-line ``error: ...`` contract of the CLI. Here a failing item is returned as data and
    its original exception is raised in the main process. Keyword arguments go to DataLoader.
    """

    def __init__(
        self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] = default_collate, **kw: Any
    ) -> None:
        self.loader = DataLoader(_Carrier(dataset), collate_fn=_CarryingCollate(collate_fn), **kw)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch
