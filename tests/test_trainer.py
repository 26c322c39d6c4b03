"""Trainer on real data: accuracy, NaN stop, atomic checkpoints and exact resume."""
import dataclasses
import json
import math
import re
import time

import pytest
import torch
from torch import nn

from torchtn import MPOLinear, load_model, save_model, tensorize
from torchtn.data import Dataset, load_digits
from torchtn.io import read_metadata
from torchtn.models import FC2, build_model
from torchtn.train import TrainConfig, Trainer, TrainingDiverged, evaluate


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_dense_and_mpo_fc2_learn_digits(digits):
    torch.manual_seed(0)
    dense = FC2(64)
    Trainer(dense, TrainConfig(epochs=15, lr=3e-3, progress=False)).fit(digits)
    _, acc = evaluate(dense, digits.x_test, digits.y_test)
    assert acc >= 0.95
    mpo, _ = tensorize(dense, rank=8)
    Trainer(mpo, TrainConfig(epochs=10, lr=1e-3, progress=False)).fit(digits)
    assert evaluate(mpo, digits.x_test, digits.y_test)[1] >= 0.93


def test_nan_loss_stops_clearly(digits):
    bad = Dataset("bad", digits.x_train.clone(), digits.y_train, digits.x_val, digits.y_val, digits.x_test,
                  digits.y_test, (8, 8), 10)
    bad.x_train.view(len(bad.x_train), -1)[:, 3] = float("nan")
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 1, step 1"):
        Trainer(FC2(64), TrainConfig(epochs=1, progress=False)).fit(bad)


class Interrupt(Exception):
    pass


def run_interrupted_and_resumed(ckpt, data, build, cfg, stop_epoch, hook_for=None, **trainer_kwargs):
    """Train ``build()`` straight through; train another, interrupted after ``stop_epoch`` with a checkpoint, then
    resume a third fresh ``build()`` from it. Returns (straight model, resumed model, resumed history)."""
    def hooks(model):
        return trainer_kwargs if hook_for is None else {"on_step_end": hook_for(model), **trainer_kwargs}

    def stop(record):
        if record.epoch == stop_epoch:
            raise Interrupt

    straight = build()
    Trainer(straight, cfg, **hooks(straight)).fit(data)
    first = build()
    with pytest.raises(Interrupt):
        Trainer(first, cfg, checkpoint=ckpt, on_epoch_end=stop, **hooks(first)).fit(data)
    assert read_metadata(ckpt)["metadata"]["epoch"] == stop_epoch
    resumed = build()
    history = Trainer(resumed, cfg, checkpoint=ckpt, **hooks(resumed)).fit(data, resume=True)
    return straight, resumed, history


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_resume_after_interruption_gives_identical_weights(tmp_path, digits, optimizer):
    def build():
        torch.manual_seed(1)
        return nn_model()

    def nn_model():
        model = FC2(64, hidden=32)
        model.fc1 = MPOLinear(64, 32, 3)  # checkpoints must carry MPO layers too
        return model

    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, optimizer=optimizer, progress=False, seed=3)
    straight, resumed, history = run_interrupted_and_resumed(tmp_path / "run.safetensors", digits, build, cfg,
                                                             stop_epoch=1)
    assert [h.epoch for h in history] == [1, 2, 3]
    assert_same_weights(straight, resumed)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_checkpoint_is_never_overwritten_by_a_fresh_run(tmp_path, digits):
    ckpt = tmp_path / "c.safetensors"
    cfg = TrainConfig(epochs=1, progress=False)
    Trainer(FC2(64), cfg, checkpoint=ckpt).fit(digits)
    stamp = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(FC2(64), cfg, checkpoint=ckpt).fit(digits)
    assert ckpt.read_bytes() == stamp
    with pytest.raises(ValueError, match="lr"):
        Trainer(FC2(64), TrainConfig(epochs=2, lr=0.5, progress=False), checkpoint=ckpt).fit(digits, resume=True)


@pytest.mark.parametrize("kwargs,match", [(dict(epochs=-1), "epochs=-1"), (dict(lr=0), "lr=0"),
                                          (dict(optimizer="adagrad"), "optimizer='adagrad'"), (dict(batch_size=0), "batch_size=0"),
                                          (dict(min_lr_fraction=1.5), r"min_lr_fraction=1.5 .*in \[0, 1\]"),
                                          (dict(min_lr_fraction=-0.1), "min_lr_fraction=-0.1"),
                                          (dict(weight_decay=float("nan")), "weight_decay=nan .*>= 0"),
                                          (dict(seed=2**32), r"seed=4294967296 .*\[0, 2\*\*32\)"),
                                          (dict(sweep={"max_rank": 4}), "sweep options were given with optimizer='adamw'")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_bad_trainer_arguments_are_named():
    with pytest.raises(TypeError, match="sweep=3 is not allowed: expected a SweepConfig"):
        TrainConfig(optimizer="sweep", sweep=3)
    with pytest.raises(TypeError, match="loss=3 is not allowed: expected one of .* or a callable"):
        Trainer(FC2(64), loss=3)
    with pytest.raises(ValueError, match="checkpoint='run.pt' must end in .safetensors"):
        Trainer(FC2(64), checkpoint="run.pt")


def test_data_without_training_rows_is_refused(digits, tmp_path):
    with pytest.raises(ValueError, match="'digits' has no training rows"):
        Trainer(FC2(64), TrainConfig(epochs=1, progress=False), checkpoint=tmp_path / "c.safetensors").fit(
            digits.first(0))
    assert not (tmp_path / "c.safetensors").exists()


def test_targets_that_do_not_fit_the_model_are_named_before_training(digits, tmp_path):
    """Each of these failed deep inside the loss (IndexError, a reshape) — or trained: targets one short of the
    examples were paired with the wrong images, a one-output model's cross-entropy is identically 0."""
    cfg = TrainConfig(epochs=1, progress=False)
    cases = [
        (FC2(64, num_classes=5), digits, r"labels of 'digits' run from 0 to 9, but FC2 gives 5 class scores"),
        (FC2(64), dataclasses.replace(digits, y_train=digits.y_train.float()),
         r"needs integer class labels or class probabilities shaped like the outputs \(10,\), but y_train is "
         r"torch.float32 \(1294,\)"),
        (FC2(64, num_classes=1), digits, "gives one output per example: cross-entropy over one class is always 0"),
        (FC2(64).requires_grad_(False), digits, "FC2 has no trainable parameters"),
    ]
    for model, data, match in cases:
        with pytest.raises(ValueError, match=match):
            Trainer(model, cfg, checkpoint=tmp_path / "c.safetensors").fit(data)
        assert not (tmp_path / "c.safetensors").exists()
    wide = dataclasses.replace(digits, y_train=torch.randn(len(digits.y_train), 2))
    with pytest.raises(ValueError, match=r"FC2 gives 3 outputs per example \(3,\), but the targets of 'digits' have 2"):
        Trainer(FC2(64, num_classes=3), cfg, loss="mse").fit(wide)
    soft = dataclasses.replace(digits, y_train=torch.nn.functional.one_hot(digits.y_train, 10).float())
    assert Trainer(FC2(64), cfg).fit(soft)  # class probabilities: cross-entropy's soft targets
    with pytest.raises(ValueError, match=r"x_train \(1294, 1, 8, 8\) and y_train \(1289,\) must have one target"):
        dataclasses.replace(digits, y_train=digits.y_train[:-5])
    with pytest.raises(TypeError, match="data must be a torchtn.data.Dataset .* got tuple"):
        Trainer(FC2(64), cfg).fit((digits.x_train, digits.y_train))


def test_a_distillation_weight_outside_0_1_is_named():
    with pytest.raises(ValueError, match=r"distill=1.5 .*in \[0, 1\]"):
        Trainer(torch.nn.Linear(2, 1), TrainConfig(progress=False), teacher=torch.nn.Linear(2, 1), distill=1.5)


def test_model_files_are_safetensors_and_reload_into_a_skeleton(tmp_path):
    torch.manual_seed(0)
    model, _ = tensorize(FC2(64), rank=3)
    path = save_model(model, tmp_path / "m.safetensors", {"note": "x"})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert "__metadata__" in header and "fc1.cores.0" in header
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["layers"]["fc1"]["type"] == "MPOLinear" and sidecar["torchtn_version"]
    assert sidecar["layers"]["fc1"]["spec"]["ranks"] == [1, 3, 3, 3, 1]
    with pytest.raises(FileExistsError):
        save_model(model, path)
    skeleton = build_model(model.config())
    load_model(path, skeleton)
    x = torch.randn(4, 64)
    assert isinstance(skeleton.fc1, MPOLinear) and torch.allclose(skeleton(x), model(x))


@pytest.mark.skipif(not __import__("torchtn.data.datasets", fromlist=["x"]).FASHION_MNIST_DIR.is_dir(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_real_idx_files_train_an_mpo_model():
    """Files nobody here produced (Debian's Fashion-MNIST IDX), read by read_idx, trained on with MPOLinear."""
    import numpy as np
    from torch import nn

    from torchtn.data import read_idx
    from torchtn.data.datasets import FASHION_MNIST_DIR

    x = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:12000].reshape(12000, -1).astype(np.float32) / 255
    y = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:12000].astype(np.int64)
    xt = torch.from_numpy((x - x.mean()) / x.std())
    yt = torch.from_numpy(y)
    data = Dataset("fmnist-subset", xt[:10000], yt[:10000], xt[10000:11000], yt[10000:11000], xt[11000:], yt[11000:],
                   (28, 28), 10)
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear(784, 256, 8), nn.ReLU(), nn.Linear(256, 10))
    Trainer(model, TrainConfig(epochs=3, lr=3e-3, progress=False)).fit(data)
    assert evaluate(model, data.x_test, data.y_test)[1] >= 0.78


def test_trainer_fits_a_regression_with_mse():
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(4, 32, generator=gen) / 32 ** 0.5
    x = torch.randn(1200, 32, generator=gen)
    y = x @ w_true.T + 0.01 * torch.randn(1200, 4, generator=gen)
    data = Dataset("linreg", x[:1000], y[:1000], x[1000:1100], y[1000:1100], x[1100:], y[1100:], (32,), 0)
    torch.manual_seed(0)
    model = MPOLinear(32, 4, rank=8, in_shape=(4, 8), out_shape=(2, 2))  # rank 8 = full rank here: exact fit possible
    assert model.ranks == (1, 8, 1)
    history = Trainer(model, TrainConfig(epochs=60, batch_size=100, lr=2e-2, weight_decay=0.0, progress=False),
                      loss="mse").fit(data)
    from torchtn.train import measure

    test_mse = measure(model, data.x_test, data.y_test, "mse")["loss"]
    assert test_mse < 0.01 * y.var().item()  # explains > 99% of the variance
    assert history[-1].val_loss < history[0].val_loss and history[-1].metrics == {}


def test_structure_change_hook_rebuilds_the_optimizer():
    data = load_digits()
    torch.manual_seed(0)
    model = FC2(64, hidden=32)
    model.fc1 = MPOLinear(64, 32, 4)
    seen = {}

    def shrink(trainer, step):
        if step == 5:
            seen["bias_steps"] = float(trainer.optimizer.state[model.fc2.bias]["step"])
            model.fc1.set_cores(model.fc1.tt.round(max_rank=2).cores)  # a bond shrinks mid-run
            return True
        return False

    trainer = Trainer(model, TrainConfig(epochs=6, batch_size=64, lr=1e-2, progress=False), on_step_end=shrink)
    history = trainer.fit(data)
    assert model.fc1.ranks == (1, 2, 2, 2, 1)
    opt = trainer.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # unchanged parameters kept their Adam state (step count continued); the new cores started fresh
    steps_per_epoch = -(-len(data.y_train) // 64)
    assert float(opt.state[model.fc2.bias]["step"]) == 6 * steps_per_epoch
    assert seen["bias_steps"] == 6
    assert float(opt.state[model.fc1.cores[1]]["step"]) == 6 * steps_per_epoch - 6
    assert history[-1].val_accuracy > 0.8


def test_a_model_returning_a_structure_needs_a_loss_that_reads_it(digits):
    """A model returning a tuple (or dict, as many libraries' models do) with a built-in loss is refused in one line
    before training (it was cross_entropy's "argument 'input' must be Tensor, not tuple"); a loss that reads the
    structure trains it."""
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return (self.fc(x.flatten(1)), None)

    with pytest.raises(TypeError, match="Pair returns a tuple, but loss='cross_entropy' needs one tensor"):
        Trainer(Pair(), TrainConfig(epochs=1, progress=False)).fit(digits)
    def first_of_pair(out, y):
        return torch.nn.functional.cross_entropy(out[0], y)

    history = Trainer(Pair(), TrainConfig(epochs=2, progress=False), loss=first_of_pair).fit(digits)
    assert history[-1].train_loss < history[0].train_loss


def test_bad_loss_names_the_argument():
    with pytest.raises(ValueError, match="loss='hinge'"):
        Trainer(FC2(64), loss="hinge")


def test_resume_after_a_rank_change_restores_the_changed_layer(tmp_path):
    """A checkpoint written after a bond shrank reloads into a freshly built (unshrunk) model and resumes bitwise."""
    data = load_digits()

    def build():
        torch.manual_seed(0)
        model = FC2(64, hidden=32)
        model.fc1 = MPOLinear(64, 32, 4)
        return model

    def hook_for(model):
        def shrink(trainer, step):
            if step == 5:
                model.fc1.set_cores(model.fc1.tt.round(max_rank=2).cores)
                return True
            return False
        return shrink

    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, progress=False, seed=1)
    assert build().fc1.ranks == (1, 4, 4, 4, 1)  # what a fresh model has before resuming
    straight, resumed, _ = run_interrupted_and_resumed(tmp_path / "c.safetensors", data, build, cfg, stop_epoch=2,
                                                       hook_for=hook_for)
    assert resumed.fc1.ranks == (1, 2, 2, 2, 1)
    assert_same_weights(straight, resumed)


def test_learning_rate_warms_up_linearly_then_follows_the_schedule():
    cfg = TrainConfig(epochs=1, lr=1.0, warmup_steps=4, min_lr_fraction=1.0, progress=False)
    trainer = Trainer(FC2(64), cfg)
    assert [trainer._lr(s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        TrainConfig(warmup_steps=-1)
    # with a time budget the cosine schedule runs by time, or by steps where those are further along
    timed = Trainer(FC2(64), TrainConfig(lr=1.0, max_seconds=100.0, progress=False))
    assert timed._lr(0, 10**6, seconds=0.0) == 1.0 and timed._lr(0, 10**6, seconds=100.0) == pytest.approx(0.0)
    assert timed._lr(0, 10**6, seconds=50.0) == pytest.approx(0.5)  # half the budget: half-way down the cosine
    assert timed._lr(50, 100, seconds=10.0) == pytest.approx(0.5) and timed._lr(0, 10**6, 250.0) == pytest.approx(0.0)


def test_a_time_budget_decays_the_rate_by_the_recorded_epochs_seconds(digits):
    cfg = TrainConfig(epochs=10**6, batch_size=256, lr=1e-2, max_seconds=2.0, progress=False)
    trainer = Trainer(FC2(64, hidden=16), cfg)
    history = trainer.fit(digits)
    steps = -(-len(digits.y_train) // 256)
    assert 2 <= len(history) < 10**6  # the budget ended the run
    for k, record in enumerate(history):  # each epoch's last rate: a function of the epochs before it, not the clock
        spent = sum(h.seconds for h in history[:k])
        pace = spent / k / steps if k else 0.0
        last = (k + 1) * steps - 1
        assert record.lr == pytest.approx(trainer._lr(last, steps * 10**6, spent + pace * (steps - 1)), rel=1e-12)
    assert history[-1].lr < 0.5 * cfg.lr  # the budget, not the epoch cap, ran the cosine down


def test_the_progress_bar_counts_steps_or_seconds_of_a_time_budget(digits, capsys):
    """A run with epochs shows steps out of all of them; under a time budget (where the epoch count is only a cap and
    a step bar would promise days) seconds out of the budget, never past it."""
    steps = -(-len(digits.y_train) // 256)
    Trainer(FC2(64, hidden=16), TrainConfig(epochs=2, batch_size=256, progress=True)).fit(digits)
    err = capsys.readouterr().err
    assert f"/{2 * steps} [" in err and "s of the time budget" not in err
    Trainer(FC2(64, hidden=16), TrainConfig(epochs=10**6, batch_size=256, max_seconds=1.0, progress=True)).fit(digits)
    err = capsys.readouterr().err
    shown = [(int(n), int(t)) for n, t in re.findall(r"(\d+)/(\d+) s of the time budget", err)]
    assert shown and all(t == 1 and n <= t for n, t in shown) and f"/{10**6 * steps}" not in err


def test_distill_loss_matches_any_teacher_output():
    data = load_digits()
    torch.manual_seed(0)
    teacher = FC2(64, hidden=32)
    student = FC2(64, hidden=32)
    mse = torch.nn.functional.mse_loss
    with torch.no_grad():
        before = float(mse(student(data.x_val), teacher(data.x_val)))
    Trainer(student, TrainConfig(epochs=5, lr=3e-3, progress=False), teacher=teacher, distill=1.0,
            distill_loss=mse).fit(data)
    with torch.no_grad():
        assert float(mse(student(data.x_val), teacher(data.x_val))) < 0.2 * before  # it learned the teacher's logits
    with pytest.raises(ValueError, match="distill_loss needs a teacher"):
        Trainer(student, TrainConfig(), distill_loss=mse)


def test_keep_best_ends_with_the_weights_of_least_validation_loss_and_survives_resume(tmp_path, digits):
    from torchtn.train import measure

    def build():
        torch.manual_seed(2)
        return FC2(64, hidden=32)

    # a good start ruined by a far too high rate: the starting weights are the best, and they come back
    good = build()
    Trainer(good, TrainConfig(epochs=8, lr=3e-3, progress=False)).fit(digits)
    start = {k: v.clone() for k, v in good.state_dict().items()}
    start_loss = measure(good, digits.x_val, digits.y_val)["loss"]
    trainer = Trainer(good, TrainConfig(epochs=2, lr=5.0, optimizer="sgd", progress=False, keep_best=True))
    history = trainer.fit(digits)
    assert min(h.val_loss for h in history) > start_loss and trainer.best_epoch == 0
    for k, v in good.state_dict().items():
        assert torch.equal(v, start[k]), k
    # from scratch every round improves at first: the kept round is the one of least validation loss
    cfg = TrainConfig(epochs=4, batch_size=64, lr=1e-2, progress=False, keep_best=True, seed=1)
    fresh = build()
    trainer = Trainer(fresh, cfg)
    history = trainer.fit(digits)
    best = min(range(len(history)), key=lambda i: history[i].val_loss)
    assert trainer.best_epoch == best + 1
    assert measure(fresh, digits.x_val, digits.y_val)["loss"] == pytest.approx(history[best].val_loss, rel=1e-5)
    # interrupted and resumed, it keeps the same best weights (stored in the checkpoint)
    straight, resumed, _ = run_interrupted_and_resumed(tmp_path / "b.safetensors", digits, build, cfg, stop_epoch=2)
    assert_same_weights(straight, resumed)
    assert_same_weights(straight, fresh)
    trainer.config = TrainConfig(epochs=1, batch_size=64, lr=1e-2, progress=False, keep_best=True, seed=2)
    trainer.fit(digits)  # a second fit on the same trainer starts its own search from the weights it now has
    assert best + 1 > 1  # so the first fit's best epoch cannot pass for the second's
    assert trainer.best_epoch in (0, 1) and trainer.best[1] <= history[best].val_loss + 1e-9


def test_a_checkpoint_written_before_a_setting_existed_resumes_with_its_default(tmp_path, digits):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "old.safetensors"
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False)
    Trainer(FC2(64), TrainConfig(epochs=1, batch_size=64, progress=False), checkpoint=ckpt).fit(digits)
    with safe_open(str(ckpt), "pt") as f:
        info = _json.loads(f.metadata()["torchtn"])
    del info["metadata"]["train_config"]["keep_best"]  # as a checkpoint of an older torchtn holds it
    info["metadata"]["train_config"]["epochs"] = 2
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"torchtn": _json.dumps(info)})
    history = Trainer(FC2(64), cfg, checkpoint=ckpt).fit(digits, resume=True)
    assert [h.epoch for h in history] == [1, 2]
    with pytest.raises(ValueError, match="keep_best"):  # a setting that differs from its recorded default still counts
        Trainer(FC2(64), TrainConfig(epochs=2, batch_size=64, progress=False, keep_best=True),
                checkpoint=ckpt).fit(digits, resume=True)


def test_bucketed_batches_hold_rows_of_similar_size_and_cover_the_same_rows():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 65, (1000,), generator=gen)
    x = torch.stack([sizes, torch.arange(1000)], 1).float()  # column 0: the row's size
    data = Dataset("sizes", x, torch.zeros(1000), x[:10], torch.zeros(10), x[:10], torch.zeros(10), (2,), 0)

    def batches(bucket, steps=None):
        cfg = TrainConfig(batch_size=32, bucket=bucket, steps_per_epoch=steps, progress=False, seed=4)
        trainer = Trainer(torch.nn.Linear(2, 1), cfg, sizes=lambda rows: rows[:, 0])
        steps = steps or -(-1000 // 32)
        return trainer._batches(data, 2, steps)

    def padding(bs):  # padded positions when each batch is padded to its longest row
        return sum(int(sizes[b].max()) * len(b) - int(sizes[b].sum()) for b in bs)

    plain, bucketed = batches(0), batches(8)
    assert sorted(torch.cat(plain).tolist()) == sorted(torch.cat(bucketed).tolist()) == list(range(1000))
    assert [len(b) for b in sorted(bucketed, key=len)][1:] == [32] * 31  # one short batch, as without buckets
    assert padding(bucketed) < 0.2 * padding(plain)  # runs of 8 × 32 rows sorted: about 1/8 of the spread
    middles = [float(sizes[b].float().median()) for b in bucketed]
    assert middles != sorted(middles) and middles != sorted(middles, reverse=True)  # short and long batches mixed
    capped = batches(4, steps=10)  # a capped epoch: the same 320 rows as without buckets
    assert sorted(torch.cat(capped).tolist()) == sorted(torch.cat(batches(0, steps=10)).tolist())
    with pytest.raises(ValueError, match="pass sizes"):
        Trainer(torch.nn.Linear(2, 1), TrainConfig(bucket=4, progress=False))
    with pytest.raises(ValueError, match="bucket=-1"):
        TrainConfig(bucket=-1)


def test_augmented_batches_are_seeded_per_step_resume_identically_and_spare_validation(tmp_path, digits):
    calls = []

    def jitter(x, generator):  # Gaussian noise on the pixels, drawn from the trainer's generator
        calls.append(len(x))
        return x + 0.5 * torch.randn(x.shape, generator=generator)

    def build():
        torch.manual_seed(1)
        return FC2(64, hidden=32)

    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, progress=False, seed=3)
    straight, resumed, history = run_interrupted_and_resumed(tmp_path / "run.safetensors", digits, build, cfg,
                                                             stop_epoch=1, augment=jitter)
    assert_same_weights(straight, resumed)  # the resumed epochs drew the same noise
    steps = -(-len(digits.y_train) // 64)
    assert sum(calls) == (3 + 3) * len(digits.y_train) and len(calls) == 6 * steps  # training batches only
    plain = build()
    Trainer(plain, cfg).fit(digits)
    assert not torch.equal(plain.fc1.weight, straight.fc1.weight)  # the noise changed the training
    with pytest.raises(TypeError, match="augment=3"):
        Trainer(build(), cfg, augment=3)


def test_pure_distillation_never_reads_the_targets(digits):
    """At distill=1 the loss is the teacher match alone: invalid class ids as targets (placeholders) are never read
    (cross-entropy would raise on them)."""
    torch.manual_seed(0)
    teacher = FC2(64, hidden=32)
    Trainer(teacher, TrainConfig(epochs=2, lr=1e-2, progress=False)).fit(digits)
    blind = dataclasses.replace(digits, y_train=torch.full((len(digits.y_train),), -1))  # invalid class ids
    student = FC2(64, hidden=32)
    history = Trainer(student, TrainConfig(epochs=8, lr=1e-2, progress=False), teacher=teacher, distill=1.0,
                      temperature=1.0).fit(blind)
    assert all(math.isfinite(h.train_loss) for h in history)
    assert evaluate(student, digits.x_test, digits.y_test)[1] > 0.8  # it learned the task from the teacher alone


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_adds_the_weight_decay_to_the_gradient_and_adamw_decays_the_weight(digits, optimizer):
    """A parameter with zero loss gradient after one full-batch step: Adam's L2 term makes its gradient wd·p, so the
    normalized step moves it by lr·sign(p); AdamW shrinks it by the factor 1 − lr·wd."""

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.idle = nn.Parameter(torch.full((3,), 0.5))

        def forward(self, x):
            return self.fc(x.flatten(1)) + 0 * self.idle.sum()

    torch.manual_seed(0)
    model = Probe()
    n = len(digits.y_train)
    Trainer(model, TrainConfig(epochs=1, batch_size=n, lr=0.1, weight_decay=0.01, optimizer=optimizer,
                               min_lr_fraction=1.0, progress=False)).fit(digits)
    want = 0.5 - 0.1 * 0.005 / (0.005 + 1e-8) if optimizer == "adam" else 0.5 * (1 - 0.1 * 0.01)
    torch.testing.assert_close(model.idle.detach(), torch.full((3,), want), rtol=0, atol=1e-6)


def test_a_resumed_stage_counts_the_seconds_of_the_epochs_an_earlier_run_trained(tmp_path, digits):
    """A stage interrupted after epoch 1 and continued: the trainer says which epochs came from the checkpoint and
    what they took, and the stage's recorded time includes them (it counted only the resumed part before)."""
    from torchtn.experiments.stage import train_stage
    from torchtn.io import read_metadata

    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, progress=False, seed=0)

    def slow(trainer, step):  # epoch 1 takes far longer than the resumed epoch 2
        time.sleep(0.1)
        return False

    def stop(record):
        raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(FC2(64, hidden=16), cfg, checkpoint=tmp_path / "checkpoints" / "s.safetensors",
                on_step_end=slow, on_epoch_end=stop).fit(digits)
    first = read_metadata(tmp_path / "checkpoints" / "s.safetensors")["metadata"]["history"][0]["seconds"]
    torch.manual_seed(0)
    fresh = Trainer(FC2(64, hidden=16), cfg)
    assert fresh.earlier_seconds == 0 and fresh.resumed_epochs == 0
    seconds = train_stage(FC2(64, hidden=16), digits, cfg, tmp_path, "s", {}, resume=True)
    assert first > 2.0 and seconds > first  # (without the earlier epoch: ~0.1 s)
    assert read_metadata(tmp_path / "s.safetensors")["metadata"]["seconds"] == seconds
    done = Trainer(FC2(64, hidden=16), cfg, checkpoint=tmp_path / "checkpoints" / "s.safetensors")
    history = done.fit(digits, resume=True)  # both epochs from the checkpoint, nothing left to train
    assert done.resumed_epochs == 2 and len(history) == 2
    assert done.earlier_seconds == pytest.approx(history[0].seconds + history[1].seconds)
    assert history[0].seconds == first


def test_the_curve_of_a_trainers_records_is_drawn_from_its_metric_only(tmp_path, digits):
    """plot_metric_history (train's training.png, --hf-model's healing.png) draws the records holding the metric and
    draws nothing — no file — when none does."""
    from torchtn.plotting import plot_metric_history

    history = [dataclasses.asdict(h) for h in Trainer(FC2(64, hidden=16), TrainConfig(epochs=2, progress=False)).fit(
        digits)]
    assert plot_metric_history(history, "accuracy", tmp_path / "a.png", scale=100).read_bytes()[:4] == b"\x89PNG"
    assert plot_metric_history(history, "cosine", tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()


def test_a_plot_that_fails_half_way_leaves_the_earlier_file_and_no_temporary_one(tmp_path, monkeypatch):
    """Plots are written atomically (torchtn.io.atomic_write): a savefig that fails after writing part of the image
    leaves the file already there untouched and no temporary file; the format follows the suffix."""
    import matplotlib.figure

    from torchtn.plotting import plot_lines

    series = {"a": [(1.0, 0.5), (2.0, 0.7)]}
    path = tmp_path / "curve.png"
    path.write_bytes(b"mine")
    real = matplotlib.figure.Figure.savefig

    def half(self, fh, **kw):
        fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)
    with pytest.raises(OSError, match="disk full"):
        plot_lines(series, path)
    assert path.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    assert plot_lines(series, path).read_bytes()[:4] == b"\x89PNG"
    assert plot_lines(series, tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")
