"""`torchtn train`: one process and many (torchrun, gloo) give the same model; a killed worker resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtn.cli import main

# the CPU and gloo, on machines with a GPU too (training on CUDA is tested in test_cuda.py)
BASE = ["train", "--epochs", "3", "--batch-size", "64", "--no-progress", "--device", "cpu"]


def torchrun(args, nproc=2, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            "-m", "torchtn", *args]


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("layers", ["dense", "mpo"])
def test_two_processes_train_the_same_model_as_one(tmp_path, layers):
    args = [*BASE, "--layers", layers, "--rank", "4", "--lr", "3e-3"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = subprocess.run(torchrun([*args, "--out", str(tmp_path / "two")]), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["rows"][0]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["rows"][0]
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.003 and two["world_size"] == 2
    assert one["model"] == "fc2" and one["layers"] == layers and one["params"] == sum(v.numel() for v in a.values())
    # rank 0 alone wrote, and printed once
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoints", "model.json", "model.safetensors",
                                                                     "results.json", "training.png"]
    assert proc.stdout.count("test accuracy") == 1
    # the results open as every job's do, with the job and the curve it drew (validation accuracy per epoch)
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert {"experiment", "command", "machine", "versions", "seconds", "rows", "job", "history"} <= set(results)
    assert results["versions"]["torchtn"] and results["job"]["layers"] == layers
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert (tmp_path / "one" / "training.png").read_bytes()[:4] == b"\x89PNG"


def _processes_writing(out: Path) -> list[int]:
    """PIDs of the processes whose command line names ``out`` (torchrun's launcher and its workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmd and b"-m" in cmd:
                pids.append(int(d.name))
    return pids


def test_a_killed_job_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    """Kill a two-process run (SIGKILL, all workers) after its first checkpoint; `--resume` under torchrun ends
    with the weights of an uninterrupted run. (torchrun's own --max-restarts path relaunches the same command; a
    relaunched worker resumes by itself — tested below without torchrun, as gloo's reconnection after a restart is
    timing-dependent on a loaded 2-core machine.)"""
    args = ["train", "--epochs", "40", "--batch-size", "64", "--no-progress", "--device", "cpu", "--seed", "2"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    run = subprocess.Popen(torchrun([*args, "--out", str(out)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    ckpt = out / "checkpoints" / "model.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed"
    for pid in _processes_writing(out):  # the launcher and both workers
        os.kill(pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert not (out / "model.safetensors").exists()
    proc = subprocess.run(torchrun([*args, "--out", str(out), "--resume"]), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # a worker that torchrun relaunched after a failure (TORCHELASTIC_RESTART_COUNT > 0) continues its own run
    # without --resume, and starts afresh when the failure came before the first checkpoint
    relaunched = tmp_path / "relaunched"
    cut = ["train", "--epochs", "2", "--batch-size", "64", "--no-progress", "--out", str(relaunched)]
    assert main(cut) == 0
    (relaunched / "model.safetensors").unlink()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(cut) == 0 and (relaunched / "model.safetensors").exists()
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    assert main([*cut[:-1], str(fresh)]) == 0


def test_train_refuses_bad_requests(tmp_path, capsys):
    assert main(["train", "--arch", "lenet5", "--out", str(tmp_path / "x")]) == 2
    assert "cannot take digits images" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["train", "--arch", "googlenet"]) == 2
    assert main(["train", "--arch", "hybrid", "--layers", "mpo", "--unitary", "--out", str(tmp_path / "a")]) == 2
    assert "--unitary is for --layers adtn" in capsys.readouterr().err
    assert main([*BASE, "--out", str(tmp_path / "r")]) == 0
    assert main([*BASE, "--out", str(tmp_path / "r"), "--resume", "--lr", "0.5"]) == 2
    assert "other settings (lr" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--no-progress"]) == 0  # the run's own options
    assert "epochs=3" in capsys.readouterr().out


def test_cifar_architectures_smoke_run_on_a_tiny_subset(tmp_path):
    """The CIFAR-10 part of Gao et al. runs where the files are; here a tiny fake set checks the whole path."""
    from test_data import write_cifar

    data = write_cifar(tmp_path / "cifar-10-batches-py", n=8).parent
    for arch in ("vgg16", "resnet18", "densenet"):
        out = tmp_path / arch
        assert main(["train", "--arch", arch, "--layers", "mpo", "--dataset", "cifar10", "--data-dir", str(data),
                     "--epochs", "1", "--batch-size", "16", "--no-progress", "--out", str(out)]) == 0
        row = json.loads((out / "results.json").read_text())["rows"][0]
        assert row["model"] == arch and row["layers"] == "mpo" and 0 <= row["test_accuracy"] <= 1


def test_adtn_papers_cifar_networks_smoke_run_on_a_tiny_subset(tmp_path):
    """Qing et al.'s CIFAR runs (AlexNet, ZFNet, VGG-16 on CIFAR-10/100) run where the files and a GPU are; here tiny
    fake sets check the whole path, ADTN layers included."""
    from test_data import write_cifar, write_cifar100

    from torchtn.io import load_model, read_metadata
    from torchtn.layers import ADTNLinear
    from torchtn.models import build_model

    c100 = write_cifar100(tmp_path / "cifar-100-python", n=16).parent
    c10 = write_cifar(tmp_path / "cifar-10-batches-py", n=8).parent
    for arch, layers, dataset, data in (("alexnet", "adtn", "cifar100", c100), ("zfnet", "mpo", "cifar100", c100),
                                        ("vgg16", "adtn", "cifar10", c10)):
        out = tmp_path / f"{arch}-{layers}"
        assert main(["train", "--arch", arch, "--layers", layers, "--depth", "1", "--dataset", dataset,
                     "--data-dir", str(data), "--epochs", "1", "--batch-size", "16", "--no-progress",
                     "--out", str(out)]) == 0
        row = json.loads((out / "results.json").read_text())["rows"][0]
        assert row["model"] == arch and row["layers"] == layers and 0 <= row["test_accuracy"] <= 1
        path = out / "model.safetensors"
        model = load_model(path, build_model(read_metadata(path)["metadata"]["config"]))
        adtn = [m for m in model.modules() if isinstance(m, ADTNLinear)]
        assert len(adtn) == (2 if layers == "adtn" else 0) and all(m.generator.depth == 1 for m in adtn)
        assert model.classifier[-1].out_features == (100 if dataset == "cifar100" else 10)


def test_sweep_training_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["train", "--arch", "hybrid", "--layers", "mpo", "--rank", "2", "--optimizer", "sweep", "--max-rank", "6",
            "--cutoff", "1e-4", "--epochs", "6", "--lr", "3e-3", "--batch-size", "64", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["optimizer"] == "sweep" and row["test_accuracy"] >= 0.9
    assert max(row["bond_dims"]["tn"]) == 6  # grown from --rank 2 to --max-rank
    assert (out / "sweeps.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["inspect", str(out / "model.safetensors"), "--plot", str(tmp_path / "e.png")]) == 0
    shown = capsys.readouterr().out
    assert "sweep training: 127 records (steps 0–126)" in shown  # the start, 21 batches × 6 epochs
    assert "2 → 6" in shown and (tmp_path / "e-sweeps.png").exists()
    # sweeps need MPO layers: one clear line, nothing written
    assert main(["train", "--arch", "fc2", "--optimizer", "sweep", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--optimizer sweep trains MPO layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


USER_NET = """
from torch import nn


class DigitNet(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)
"""


def test_train_a_model_of_the_users_own_architecture(tmp_path, capsys):
    """--arch FILE.py:NAME trains a plain nn.Module of the user's; with --layers mpo its linear maps become MPOs at
    --rank, started at PyTorch's variance as the zoo's MPO layers are — and both learn the digits."""
    from torchtn.data import load_dataset
    from torchtn.experiments.train import TrainJob, job_model
    from torchtn.io import read_metadata

    source = tmp_path / "digit_net.py"
    source.write_text(USER_NET)
    arch = [*BASE, "--arch", f"{source}:DigitNet", "--arch-args", '{"hidden": 256}', "--lr", "3e-3"]
    assert main([*arch, "--out", str(tmp_path / "dense")]) == 0
    assert main([*arch, "--layers", "mpo", "--rank", "4", "--out", str(tmp_path / "mpo")]) == 0
    dense = json.loads((tmp_path / "dense" / "results.json").read_text())["rows"][0]
    mpo = json.loads((tmp_path / "mpo" / "results.json").read_text())["rows"][0]
    assert dense["model"] == mpo["model"] == f"{source}:DigitNet" and mpo["layers"] == "mpo"
    assert dense["params"] == 64 * 256 + 256 + 256 * 10 + 10 and mpo["params"] < dense["params"] / 3
    assert dense["test_accuracy"] > 0.8 and mpo["test_accuracy"] > 0.3  # ten classes: chance is 0.1 (seeds 0-2: 0.51-0.74)
    types = {e["type"] for e in read_metadata(tmp_path / "mpo" / "model.safetensors")["layers"].values()}
    assert "MPOLinear" in types
    torch.manual_seed(0)
    model = job_model(TrainJob(arch=f"{source}:DigitNet", arch_args={"hidden": 256}, layers="mpo", rank=4),
                      load_dataset("digits"))
    first = model.body[1]
    assert type(first).__name__ == "MPOLinear"
    assert 0.5 < first.weight.var().item() * 3 * 64 < 2.0  # nn.Linear's Var(W) = 1 / (3 · fan_in)
    # --layers adtn: fresh ADTNs of --depth, their gates drawn from the job's seed
    for seed in (0, 1):
        assert main([*arch, "--layers", "adtn", "--depth", "2", "--epochs", "1", "--seed", str(seed),
                     "--out", str(tmp_path / f"adtn-{seed}")]) == 0
    adtn = json.loads((tmp_path / "adtn-0" / "results.json").read_text())["rows"][0]
    assert adtn["layers"] == "adtn" and adtn["params"] < dense["params"] / 10 and 0 <= adtn["test_accuracy"] <= 1
    gates = [weights(tmp_path / f"adtn-{seed}")["body.1.generator.gates"] for seed in (0, 1)]
    assert not torch.equal(*gates)


def test_zoo_fc2_and_lenet5_with_adtn_layers(tmp_path, capsys):
    """--layers adtn on the zoo's FC2 and LeNet-5: the big maps are ADTNs of --depth (the reproduction's counts: 545
    and 898 generator parameters at depth 2), the classifier dense; the file rebuilds through its recorded config."""
    from torchtn import ADTNLinear
    from torchtn.io import load_model, read_metadata
    from torchtn.models import FC2, LeNet5, build_model

    fc2, lenet = FC2(784, 256, 10, layers="adtn", adtn_depth=2), LeNet5(layers="adtn", adtn_depth=2)
    assert isinstance(fc2.fc1, ADTNLinear) and isinstance(fc2.fc2, torch.nn.Linear)
    assert fc2.fc1.param_report["generator"] == 545
    assert sum(m.param_report["generator"] for m in (lenet.fc1, lenet.fc2)) == 898
    assert type(lenet.fc3) is torch.nn.Linear and lenet.config()["adtn_depth"] == 2
    assert "adtn_depth" not in LeNet5().config()  # dense and MPO files keep the config they had
    out = tmp_path / "fc2-adtn"
    assert main([*BASE, "--arch", "fc2", "--layers", "adtn", "--depth", "1", "--epochs", "1", "--out", str(out)]) == 0
    config = read_metadata(out / "model.safetensors")["metadata"]["config"]
    assert config["layers"] == "adtn" and config["adtn_depth"] == 1
    model = load_model(out / "model.safetensors", build_model(config))
    assert isinstance(model.fc1, ADTNLinear) and model.fc1.depth == 1
    # --unitary: orthogonal gates, kept by the file (each gate the polar factor of its latent matrix)
    out = tmp_path / "fc2-unitary"
    assert main([*BASE, "--arch", "fc2", "--layers", "adtn", "--depth", "1", "--unitary", "--epochs", "1",
                 "--out", str(out)]) == 0
    config = read_metadata(out / "model.safetensors")["metadata"]["config"]
    model = load_model(out / "model.safetensors", build_model(config))
    gates = model.fc1.generator.effective_gates.detach().reshape(-1, 4, 4)
    assert model.fc1.generator.unitary
    torch.testing.assert_close(gates @ gates.transpose(1, 2), torch.eye(4).expand_as(gates), rtol=0, atol=1e-5)
    assert main([*BASE, "--arch", "fc2", "--unitary", "--out", str(tmp_path / "never")]) == 2
    assert "--unitary is for --layers adtn" in capsys.readouterr().err
    # --mapping: each axis of the 256×64 weight (digits) on its own qubits (8 + 6), kept by the file
    out = tmp_path / "fc2-axes"
    assert main([*BASE, "--arch", "fc2", "--layers", "adtn", "--depth", "1", "--mapping", "axes", "--epochs", "1",
                 "--out", str(out)]) == 0
    config = read_metadata(out / "model.safetensors")["metadata"]["config"]
    model = load_model(out / "model.safetensors", build_model(config))
    assert model.fc1.generator.mapping == "axes" and model.fc1.Q == 14
    assert model.fc1.generator.gates.shape == (1, 13, 4, 4)
    assert main([*BASE, "--arch", "fc2", "--mapping", "axes", "--out", str(tmp_path / "never")]) == 2
    assert "--mapping axes is for --layers adtn" in capsys.readouterr().err
    # resuming with other --layers takes none of the run's ADTN settings: the check names the layers that differ
    assert main(["train", "--layers", "mpo", "--resume", "--out", str(out), "--no-progress"]) == 2
    assert "layers: 'adtn' → 'mpo'" in capsys.readouterr().err


def test_every_zoo_network_takes_adtn_layers(tmp_path):
    """ResNet-18 and DenseNet: the classifier an ADTN of ``adtn_depth``; the hybrid MLP: its middle map — each
    rebuilt from its config with the same outputs; the hybrid trains from the command line."""
    from torchtn import ADTNLinear
    from torchtn.io import load_model, read_metadata
    from torchtn.models import DenseNet, HybridMLP, ResNet18, build_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for model, site in ((ResNet18(layers="adtn", adtn_depth=1), "fc"), (DenseNet(depth=10, layers="adtn"), "fc"),
                        (HybridMLP(64, layers="adtn", adtn_depth=3), "tn")):
        layer = getattr(model, site)
        assert isinstance(layer, ADTNLinear) and layer.depth == model.config()["adtn_depth"]
        assert [type(m) for m in model.modules()].count(ADTNLinear) == 1
        again = build_model(model.config())
        again.load_state_dict(model.state_dict())
        inputs = x if site == "fc" else torch.randn(2, 64)
        torch.testing.assert_close(again.eval()(inputs), model.eval()(inputs), rtol=0, atol=0)
    assert "adtn_depth" not in ResNet18().config() and "adtn_depth" not in HybridMLP(64, layers="mpo").config()
    out = tmp_path / "hybrid-adtn"
    assert main([*BASE, "--arch", "hybrid", "--layers", "adtn", "--depth", "1", "--epochs", "1", "--out", str(out)]) == 0
    config = read_metadata(out / "model.safetensors")["metadata"]["config"]
    model = load_model(out / "model.safetensors", build_model(config))
    assert isinstance(model.tn, ADTNLinear) and model.tn.depth == 1
