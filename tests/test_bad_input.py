"""Bad input (issue 5, section 3): one ``error: ...`` line naming the file or setting, exit
status 2, no traceback, and no output at all -- every check runs before anything is trained.

The CLI runs in-process (``ciscr.cli.main``) on a copy of a small folder-format dataset with
one file broken per test.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ciscr.engine.checkpoint as ck
from ciscr.cli import main
from ciscr.config import DataCfg, SyntheticCfg
from ciscr.data import check
from ciscr.data.formats import Sample, parse_list, read_listed
from ciscr.data.synthetic import make_synthetic
from ciscr.engine.checkpoint import load_checkpoint, save_checkpoint
from ciscr.engine.train import Stream, stream_loader
from ciscr.errors import CiscrError, DataError

K = 4  # classes of the test dataset: background + 3 shapes
TINY = [
    "train.epochs=1", "train.unlabeled_epochs=0", "train.iters_per_epoch=2", "train.batch_size=4", "train.crop_size=32",
    "train.progress=false", "train.ckpt_every=1", "model.backbone=mobilenet_v2", "report=false",
    "method.tta_scales=[1.0]", "method.score_final_pseudo=false", "device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SyntheticCfg(num_train=16, num_val=3, size=32, num_classes=K)
    return make_synthetic(tmp_path_factory.mktemp("pristine"), cfg, seed=0)


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the dataset that a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def run_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["run", "synthetic", "--out", str(out), "data.format=folder", f"data.root={data}",
            "data.labeled=4", *TINY, *extra]  # fmt: skip


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; assert exit status 2 and exactly one stderr line; return its message."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: ") :]


def assert_bad_run(capsys, tmp_path: Path, data: Path, *expected: str, extra=()) -> str:
    """A run over ``data`` fails with one line containing ``expected`` and leaves nothing."""
    out = tmp_path / "run"
    msg = one_error(capsys, run_args(out, data, *extra))
    for part in expected:
        assert part in msg, msg
    assert not out.exists(), "a failed check must leave no output behind"
    return msg


# --------------------------------------------------------------------------- images and masks


def test_corrupt_image(capsys, tmp_path: Path, data: Path) -> None:
    bad = data / "images" / "train" / "train_00003.png"
    bad.write_bytes(b"this is not a PNG")
    assert_bad_run(capsys, tmp_path, data, f"{bad}: cannot read image (not a recognised")


def test_truncated_image(capsys, tmp_path: Path, data: Path) -> None:
    bad = data / "images" / "val" / "val_00001.png"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])
    assert_bad_run(capsys, tmp_path, data, f"{bad}: cannot read image")


def test_truncated_jpeg_is_caught_by_the_cheap_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(path, quality=95)
    assert check.image_size(path) == (64, 48)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=f"^{path}: cannot read image"):
        check.image_size(path)


def test_mask_size_differs_from_image(capsys, tmp_path: Path, data: Path) -> None:
    bad = data / "masks" / "train" / "train_00005.png"
    Image.fromarray(np.zeros((16, 32), np.uint8), mode="L").save(bad)
    assert_bad_run(capsys, tmp_path, data, f"{bad}: mask size (H, W)=(16, 32) differs from the "
                   "image size (H, W)=(32, 32)")  # fmt: skip


def test_mask_values_out_of_range(capsys, tmp_path: Path, data: Path) -> None:
    bad = data / "masks" / "val" / "val_00002.png"
    mask = np.asarray(Image.open(bad)).copy()
    mask[0, :3] = [4, 9, 254]  # K=4: 4, 9 and 254 are neither classes nor the ignore index
    Image.fromarray(mask, mode="L").save(bad)
    assert_bad_run(capsys, tmp_path, data, f"{bad}: mask values 4, 9, 254 are not class ids in "
                   "[0, 4) nor the ignore index 255")  # fmt: skip


def test_rgb_mask(capsys, tmp_path: Path, data: Path) -> None:
    bad = data / "masks" / "train" / "train_00000.png"
    Image.open(bad).convert("RGB").save(bad)
    assert_bad_run(capsys, tmp_path, data, f"{bad}: mask is RGB; expected a single-channel")


def test_several_bad_files_report_the_first_and_the_count(capsys, tmp_path, data) -> None:
    for name in ("train_00002.png", "train_00009.png"):
        (data / "images" / "train" / name).write_bytes(b"junk")
    msg = assert_bad_run(capsys, tmp_path, data, "(and 1 more bad file(s))")
    assert "train_00002.png" in msg and "train_00009" not in msg


# --------------------------------------------------------------------------- split lists


def test_missing_image_named_in_split_list(capsys, tmp_path: Path, data: Path) -> None:
    (data / "train.txt").write_text("train_00000\ntrain_00001\nholiday_photo\n")
    assert_bad_run(capsys, tmp_path, data, f"{data / 'train.txt'}:3: no image 'holiday_photo'")


@pytest.mark.parametrize(
    ("entry", "why"),
    [("../../etc/passwd.png", "leaves the dataset root"), ("/etc/passwd.png", "is absolute")],
)
def test_split_list_path_outside_root(capsys, tmp_path: Path, data: Path, entry, why) -> None:
    (data / "train.txt").write_text(f"train_00000\n{entry}\n")
    assert_bad_run(capsys, tmp_path, data, f"{data / 'train.txt'}:2: path '{entry}' {why}")


def _touch_pair(root: Path, stem: str) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"{stem}.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(root / f"{stem}.png")


def test_list_entries_missing_escaping_or_absolute(tmp_path: Path) -> None:
    _touch_pair(tmp_path, "a")
    with pytest.raises(DataError, match=r"^lab:2: .*b\.png does not exist$"):
        parse_list("a.jpg a.png\na.jpg b.png\n", tmp_path, "lab", need_mask=True)
    with pytest.raises(DataError, match=r"^lab:1: .*nope\.jpg does not exist$"):
        parse_list("nope.jpg a.png\n", tmp_path, "lab", need_mask=True)
    with pytest.raises(DataError, match=r"^lab:1: path 'x/../../a.jpg' leaves the dataset root$"):
        parse_list("x/../../a.jpg a.png\n", tmp_path, "lab", need_mask=True)
    with pytest.raises(DataError, match=r"^lab:1: path '/etc/a.jpg' is absolute"):
        parse_list("/etc/a.jpg\n", tmp_path, "lab", need_mask=False)


def test_labeled_unlabeled_overlap(tmp_path: Path) -> None:
    for stem in ("a", "b", "v"):
        _touch_pair(tmp_path, stem)
    cfg = DataCfg(format="voc", root=str(tmp_path))
    lists = ("a.jpg a.png\n", "b.jpg\na.jpg\n", "v.jpg v.png\n")
    with pytest.raises(DataError, match=r"^lab / unl: image 'a.jpg' is both labeled and unlabeled"):
        read_listed(cfg, tmp_path, lists, ("lab", "unl", "val"))


def test_empty_labeled_split(capsys, tmp_path: Path, data: Path) -> None:
    empty = tmp_path / "labeled.txt"
    empty.write_text("\n")
    assert_bad_run(capsys, tmp_path, data, f"{empty}: labeled list is empty",
                   extra=[f"data.labeled={empty}"])  # fmt: skip


def test_empty_unlabeled_split(capsys, tmp_path: Path, data: Path) -> None:
    msg = assert_bad_run(capsys, tmp_path, data, extra=["data.labeled=16"])
    assert msg.startswith("the unlabeled split is empty but method.name=ciscr_bank self-trains")


# --------------------------------------------------------------------------- settings, weights


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epoch=3", "train.epoch: unknown key"),
        ("train.epochs=three", "train.epochs: invalid value 'three'"),
        ("train.lr=-0.1", "train.lr: invalid value -0.1"),
        ("method.rectify=sometimes", "method.rectify: invalid value 'sometimes'"),
        ("train.amp=fp16", "train.amp=fp16 needs a CUDA device; use bf16 on CPU"),
    ],
)
def test_bad_setting(capsys, tmp_path: Path, data: Path, override: str, expected: str) -> None:
    assert_bad_run(capsys, tmp_path, data, expected, extra=[override])


def test_missing_weight_file(capsys, tmp_path: Path, data: Path) -> None:
    missing = tmp_path / "imagenet.pth"
    assert_bad_run(capsys, tmp_path, data, f"{missing}: pretrained weight file not found",
                   extra=[f"model.pretrained={missing}"])  # fmt: skip


def test_mismatching_weight_file(capsys, tmp_path: Path, data: Path) -> None:
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    assert_bad_run(capsys, tmp_path, data, f"{wrong}: does not match",
                   extra=[f"model.pretrained={wrong}"])  # fmt: skip


def test_output_directory_not_writable(capsys, tmp_path: Path, data: Path) -> None:
    # Tests run as root, where permissions do not block writes: a FILE in the path does.
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "run"
    msg = one_error(capsys, run_args(out, data))
    assert msg == f"--out {out}: output directory is not writable (Not a directory)"


# --------------------------------------------------------------------------- disk full


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1, "w": torch.ones(3)})
    real_save = torch.save

    def full_disk(obj, f) -> None:
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # what made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(CiscrError) as info:
        save_checkpoint(path, {"iteration": 2, "w": torch.zeros(3)})
    assert str(info.value) == f"{path}: no space left on device (nothing was overwritten)"
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file


def test_real_failed_write_inside_torch_save_is_one_line(tmp_path: Path) -> None:
    # A real kernel-level write failure (file size limit): torch's C++ writer reports it as a
    # bare RuntimeError, which must still become a one-line CiscrError with nothing left over.
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(CiscrError, match=f"^{path}: cannot write \\(the write failed"):
            save_checkpoint(path, {"iteration": 2, "w": torch.zeros(1 << 20)})  # 4 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_disk_full_during_training(capsys, tmp_path: Path, data: Path, monkeypatch) -> None:
    real_save, calls = torch.save, []

    def fills_up(obj, f) -> None:
        if "checkpoint.pt" in Path(f).name:  # not the ST++ snapshots a SupOnly stage 1 keeps
            calls.append(1)
            if len(calls) == 2:  # the checkpoint of iteration 2
                raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ck.torch, "save", fills_up)
    out = tmp_path / "run"
    msg = one_error(capsys, ["train", *run_args(out, data)[1:]])
    ckpt = out / "stage1" / "checkpoint.pt"
    assert msg == f"{ckpt}: no space left on device (nothing was overwritten)"
    assert load_checkpoint(ckpt)["iteration"] == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- workers, cache


class _Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        if i == 2:
            raise DataError("/data/x.png: cannot read image (truncated)")
        return {"image": torch.zeros(2)}


def test_error_in_dataloader_worker_stays_one_line() -> None:
    stream = Stream(_Broken(), batch_size=4)
    batches = stream_loader(stream, 0, seed=0, start=0, stop=1, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(batches))
    assert str(info.value) == "/data/x.png: cannot read image (truncated)"


def test_data_check_is_cached_until_a_file_changes(pristine: Path, tmp_path: Path, monkeypatch):
    data = Path(shutil.copytree(pristine, tmp_path / "data"))
    img, mask = data / "images" / "train" / "train_00001.png", data / "masks" / "train"
    groups = {"labeled": [Sample("train_00001", img, mask / "train_00001.png")],
              "unlabeled": [Sample("train_00002", data / "images/train/train_00002.png", None)]}  # fmt: skip
    assert check.validate_samples(groups, K, run_dir=tmp_path, progress=False) == [0, 1]
    record = json.loads((tmp_path / check.CHECK_FILE).read_text())
    assert record["passed"] and record["num_samples"] == {"labeled": 1, "unlabeled": 1}

    def must_not_run(*args):
        raise AssertionError("re-validated although nothing changed")

    monkeypatch.setattr(check, "check_sample", must_not_run)
    assert check.validate_samples(groups, K, run_dir=tmp_path, progress=False) == [0, 1]
    monkeypatch.undo()
    Image.fromarray(np.full((32, 32), 7, np.uint8), mode="L").save(mask / "train_00001.png")
    with pytest.raises(DataError, match="mask values 7 are not class ids"):
        check.validate_samples(groups, K, run_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- missing class


def test_class_without_labeled_image_warns_and_trains(tmp_path: Path, data: Path, caplog) -> None:
    masks = sorted((data / "masks" / "train").glob("*.png"))
    present = {m.stem: set(np.unique(np.asarray(Image.open(m))).tolist()) for m in masks}
    counts = {k: sum(k not in p for p in present.values()) for k in range(1, K)}
    absent = max(counts, key=counts.get)
    chosen = [stem for stem, p in present.items() if absent not in p][:4]
    assert len(chosen) == 4
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("\n".join(chosen) + "\n")
    out = tmp_path / "run"
    caplog.set_level("WARNING", logger="ciscr")
    argv = run_args(out, data, f"data.labeled={labeled}", "method.retrain=one")
    assert main(argv) == 0
    name = (data / "classes.txt").read_text().split()[absent]
    assert any(f"'{name}'" in r.getMessage() and "no labeled mask" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    queries = json.loads((out / "selection" / "queries.json").read_text())
    assert queries[name] == []  # never queried: its pseudo-labelled pixels get plain CE
    assert (out / "stage2" / "done.json").is_file()


def test_class_without_query_image_gets_plain_ce() -> None:
    # METHOD.md 3: a class with no query image cannot be rectified; when no other class is
    # eligible the image falls back to w = 1, i.e. exactly the plain pseudo-label CE.
    from ciscr import cisc
    from ciscr.engine.losses import ce_loss
    from ciscr.engine.steps import Rectifier

    feats = torch.rand(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    rect = Rectifier(features=lambda x: feats[: x.shape[0]], mode="query", classes="one",
                     num_classes=3, query_lists={0: [0], 1: [0], 2: []}, seed=0, background=0)  # fmt: skip
    pseudo = torch.zeros(2, 8, 8, dtype=torch.long)
    pseudo[:, 2:6, 2:6] = 2  # only background and the class without queries
    weights = rect(torch.zeros(2, 3, 8, 8), pseudo, 0)
    assert weights["cls"].tolist() == [-1, -1]
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rectified = cisc.rectified_ce(logits, pseudo, weights["cmap"], weights["cls"])
    assert torch.allclose(rectified, ce_loss(logits, pseudo), atol=1e-6)


def test_config_and_weight_files_never_execute_code(capsys, tmp_path: Path, data: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    msg = one_error(capsys, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert msg.startswith(f"{cfg}: not valid YAML")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, weights)
    assert_bad_run(capsys, tmp_path, data, f"{weights}: cannot read pretrained weights",
                   extra=[f"model.pretrained={weights}"])  # fmt: skip
    assert not marker.exists()
