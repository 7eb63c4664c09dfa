"""The training loop: exact resume, poly schedule, NaN guard, deterministic data order."""

import pytest
import torch

from ciscr.config import ModelCfg, TrainCfg
from ciscr.engine.checkpoint import load_checkpoint
from ciscr.engine.steps import supervised_step
from ciscr.engine.train import IndexStream, Stream, train_stage
from ciscr.errors import TrainingError
from ciscr.models import build_model
from ciscr.utils.io import read_jsonl


class Toy(torch.utils.data.Dataset):
    """Random images whose label is a fixed function of the image, keyed by (epoch, index)."""

    def __init__(self, n=6):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        x = torch.rand(3, 32, 32, generator=g)
        return {"image": x, "mask": (x[0] > 0.5).long()}


def cfg(**kw):
    base = dict(epochs=2, iters_per_epoch=2, batch_size=2, lr=0.01, ckpt_every=1, log_every=1,
                progress=False)
    return TrainCfg(**{**base, **kw})


def run(out, tc, step=None):
    torch.manual_seed(0)
    model = build_model(ModelCfg(backbone="resnet18", output_stride=16, channels=8), 2)
    return train_stage(out, model, {"labeled": Stream(Toy(), 2)}, step or supervised_step(),
                       tc, seed=0, device=torch.device("cpu"), epoch_stream="labeled")


def test_killed_run_resumes_exactly(tmp_path):
    ref = run(tmp_path / "ref", cfg())

    calls = {"n": 0}
    inner = supervised_step()

    def dies_at_third(model, batches, it):
        calls["n"] += 1
        if it == 2:
            raise KeyboardInterrupt  # the process "dies" after checkpointing iteration 2
        return inner(model, batches, it)

    with pytest.raises(KeyboardInterrupt) as stopped:
        run(tmp_path / "cut", cfg(), dies_at_third)
    # What a rerun will do, said by the stage that was stopped (ciscr's CLI prints it).
    assert "stopped at iteration 2/4" in str(stopped.value)
    assert "resume it from its last checkpoint, iteration 2" in str(stopped.value)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert cut["iteration"] == 2 and cut["spent"]["cpu"] > 0
    resumed = run(tmp_path / "cut", cfg())
    logged = [r["iteration"] for r in read_jsonl(tmp_path / "cut" / "train.jsonl")]
    assert logged == [1, 2, 3, 4]  # continued from the saved iteration, none repeated
    # The stage's CPU time spans both invocations: the final checkpoint adds to the first's.
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["spent"]["cpu"] > cut["spent"]["cpu"]
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_interrupt_before_the_first_checkpoint_says_the_stage_restarts(tmp_path):
    inner = supervised_step()

    def dies_at_second(model, batches, it):
        if it == 1:
            raise KeyboardInterrupt
        return inner(model, batches, it)

    with pytest.raises(KeyboardInterrupt) as stopped:
        run(tmp_path / "cut", cfg(ckpt_every=50), dies_at_second)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    assert "stopped at iteration 1/4 before its first checkpoint (train.ckpt_every=50)" in str(
        stopped.value)
    assert "start this stage again from iteration 0" in str(stopped.value)


def test_step_seconds_time_the_steps_not_the_evaluations(tmp_path):
    """step_seconds (what `ciscr profile` compares) leaves out the epoch-end evaluation."""
    import time

    def slow_eval(model, epoch):
        time.sleep(1.0)
        return {"val_miou": 0.5}

    torch.manual_seed(0)
    model = build_model(ModelCfg(backbone="resnet18", output_stride=16, channels=8), 2)
    t0 = time.perf_counter()
    train_stage(tmp_path, model, {"labeled": Stream(Toy(), 2)}, supervised_step(),
                cfg(log_every=2), seed=0, device=torch.device("cpu"), epoch_stream="labeled",
                on_epoch_end=slow_eval)
    wall = time.perf_counter() - t0
    recs = [r for r in read_jsonl(tmp_path / "train.jsonl") if "loss" in r]
    assert [r["iteration"] for r in recs] == [2, 4]
    steps = sum(2 * r["step_seconds"] for r in recs)  # 2 iterations per record
    # The steps and the two 1-second evaluations are disjoint parts of the stage's wall time,
    # so this holds however slow the machine is; counting an evaluation would break it.
    assert 0 < steps <= wall - 2 * 1.0, (steps, wall)


def test_poly_schedule_per_iteration(tmp_path):
    run(tmp_path, cfg(epochs=1, iters_per_epoch=4, lr=0.1, head_lr_mult=10))
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "train.jsonl")]
    assert lrs == pytest.approx([0.1 * (1 - t / 4) ** 0.9 for t in range(1, 5)])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["iteration"] == ckpt["total_iters"] == 4


def test_nan_loss_stops_with_stage_and_iteration(tmp_path):
    def nan_step(model, batches, it):
        loss = model(batches["labeled"]["image"]).logits.mean()
        return loss * (float("nan") if it == 2 else 1.0), {}

    with pytest.raises(TrainingError, match=r"train: loss became nan at iteration 3"):
        run(tmp_path, cfg(), nan_step)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2  # last good one kept


def test_index_stream_is_a_pure_function_of_position():
    a, b = IndexStream(5, seed=3, stream_id=1, repeat=2), IndexStream(5, seed=3, stream_id=1, repeat=2)
    first = [a.item(p) for p in range(25)]
    assert first == [b.item(p) for p in reversed(range(25))][::-1]
    cycle = [i for i, _ in first[:10]]
    assert sorted(cycle) == sorted(list(range(5)) * 2)  # every item twice per cycle
    epochs = {e for i, e in first[:10]}
    assert epochs == {0, 1}  # the two copies get different augmentation draws


def test_evaluating_during_training_does_not_change_what_is_trained(tmp_path):
    """Epoch-end evaluations (train.eval_every_epochs) must leave the training's random stream
    (dropout) alone: the same run with and without them ends with the same weights."""
    from ciscr.cli import main

    def train(out, every):
        args = ["train", "synthetic", "--out", str(out), f"data.root={tmp_path / 'data'}",
                "train.epochs=3", "train.iters_per_epoch=2", "train.batch_size=2",
                "train.crop_size=32", "train.progress=false", "data.synthetic.num_train=8",
                "data.synthetic.num_val=2", "data.synthetic.size=32", "data.labeled=4",
                "report=false", "device=cpu", f"train.eval_every_epochs={every}"]  # fmt: skip
        assert main(args) == 0
        return load_checkpoint(out / "stage1" / "checkpoint.pt")["model"]

    a, b = train(tmp_path / "quiet", 0), train(tmp_path / "evaluated", 1)
    assert any("val_miou" in r for r in read_jsonl(tmp_path / "evaluated" / "stage1" / "train.jsonl"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_stream_a_step_does_not_read_moves_on_without_loading():
    from ciscr.engine.streams import next_batches, stream_loaders

    class Counted(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.loaded = 0

        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict:
            self.loaded += 1
            return {"x": torch.tensor(i)}

    def loaders(ds_u):
        return stream_loaders({"labeled": Stream(Counted(), 2), "unlabeled": Stream(ds_u, 2)},
                              seed=0, start=0, stop=6, num_workers=0)

    ds_u = Counted()
    ref, skipping = loaders(Counted()), loaders(ds_u)
    cpu = torch.device("cpu")
    for t in range(6):
        want = next_batches(ref, cpu, False)
        only = ("labeled",) if t % 2 == 0 else None
        got = next_batches(skipping, cpu, False, only)
        assert set(got) == ({"labeled"} if only else {"labeled", "unlabeled"})
        for name, batch in got.items():  # the same batch as a run that loads every stream
            assert torch.equal(batch["x"], want[name]["x"])
    assert ds_u.loaded == 3 * 2  # the 3 skipped batches were never loaded
    # Another iterator (a worker loader's): its batch is taken and dropped.
    plain = {"labeled": iter([{"x": torch.tensor(0)}, {"x": torch.tensor(1)}])}
    assert next_batches(plain, cpu, False, ()) == {}
    assert int(next_batches(plain, cpu, False)["labeled"]["x"]) == 1
