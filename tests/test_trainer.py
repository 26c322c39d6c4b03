"""Trainer on real data: accuracy, NaN stop, atomic checkpoints and exact resume."""
import json

import pytest
import torch

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


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_after_interruption_gives_identical_weights(tmp_path, digits, optimizer):
    def build():
        torch.manual_seed(1)
        return nn_model()

    def nn_model():
        model = FC2(64, hidden=32)
        model.fc1 = MPOLinear(64, 32, 3)  # checkpoints must carry MPO layers too
        return model

    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, optimizer=optimizer, progress=False, seed=3)
    straight = build()
    Trainer(straight, cfg).fit(digits)

    def stop_after_first(record):
        if record.epoch == 1:
            raise Interrupt

    ckpt = tmp_path / "run.safetensors"
    first = build()
    with pytest.raises(Interrupt):
        Trainer(first, cfg, checkpoint=ckpt, on_epoch_end=stop_after_first).fit(digits)
    assert read_metadata(ckpt)["metadata"]["epoch"] == 1
    resumed = build()
    history = Trainer(resumed, cfg, checkpoint=ckpt).fit(digits, resume=True)
    assert [h.epoch for h in history] == [1, 2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
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
                                          (dict(optimizer="adam"), "optimizer='adam'"), (dict(batch_size=0), "batch_size=0")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_model_files_are_safetensors_and_reload_into_a_skeleton(tmp_path):
    torch.manual_seed(0)
    model, _ = tensorize(FC2(64), rank=3)
    path = save_model(model, tmp_path / "m.safetensors", {"note": "x"})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert "__metadata__" in header and "fc1.cores.0" in header
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["mpo_layers"]["fc1"]["ranks"] == [1, 3, 3, 3, 1] and sidecar["torchtn_version"]
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
