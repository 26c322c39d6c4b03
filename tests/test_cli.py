"""The torchtn command line: a tiny real run, resume, and every bad input giving one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchtn.cli import main


def test_tiny_compress_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compress", "--epochs", "4", "--finetune-epochs", "2", "--rank", "2", "8", "--out", str(out),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "rank-8" in printed and "test acc tuned %" in printed and "dense" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in results["rows"]] == ["rank-2", "rank-8"]
    assert results["dense"]["test_accuracy"] > 0.85  # 4 epochs on digits
    assert (out / "accuracy_vs_compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "rank-8.safetensors").is_file() and (out / "dense.safetensors").is_file()
    # a second run into the same directory is refused; --resume reuses the finished stages
    assert main(["compress", "--out", str(out), "--no-progress"]) == 2
    assert main(["compress", "--epochs", "4", "--finetune-epochs", "2", "--rank", "2", "8", "--out", str(out),
                 "--resume", "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["acc_after"] for r in again["rows"]] == [r["acc_after"] for r in results["rows"]]


def test_ratio_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["compress", "--epochs", "2", "--finetune-epochs", "1", "--ratio", "10", "--out", str(out),
                 "--no-progress"]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["setting"] == "ratio-10" and row["ratio"] >= 10


@pytest.mark.parametrize("args,words", [
    (["--rank", "-1"], "--rank=-1"),
    (["--rank", "0"], "--rank=0"),
    (["--rel-tol", "0"], "--rel-tol=0"),
    (["--rel-tol", "1.5"], "--rel-tol=1.5"),
    (["--ratio", "0"], "--ratio=0"),
    (["--ratio", "-3"], "--ratio=-3"),
    (["--lr", "inf"], "--lr=inf"),
    (["--finetune-lr", "nan"], "--finetune-lr=nan"),
    (["--seed", "-1"], "--seed=-1"),
    (["--epochs", "-1"], "--epochs=-1"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist does not exist"),
    (["--dataset", "mnist"], "no data directory given"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar10"),
    (["--rank", "2", "--ratio", "5"], "not allowed with argument"),
    (["--resume"], "--resume needs --out"),
])
def test_bad_arguments_one_line_exit_2_nothing_written(tmp_path, capsys, args, words):
    out = tmp_path / "never"
    extra = [] if "--resume" in args else ["--out", str(out)]
    assert main(["compress", *args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("torchtn: error:") and words in err
    assert not out.exists()


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "torchtn.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("torchtn ")
    exe = Path(sys.executable).with_name("torchtn")
    if exe.exists():
        bad = subprocess.run([str(exe), "compress", "--rank", "-4"], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_inspect_reports_bonds_and_refuses_overwrite(tmp_path, capsys):
    import numpy as np
    from conftest import entropy_reference, unfolding

    from torchtn import MPOLinear, save_model
    from torchtn.models import FC2

    torch.manual_seed(0)
    model = FC2(64, hidden=32)
    model.fc1 = MPOLinear(64, 32, 3, dtype=torch.float32)
    path = save_model(model, tmp_path / "m.safetensors")
    plot = tmp_path / "ent.png"
    assert main(["inspect", str(path), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split() for line in printed.splitlines() if line.startswith("fc1 ")]
    w = model.fc1.to_dense().detach().double()
    assert len(rows) == len(model.fc1.in_shape) - 1
    for k, row in enumerate(rows):  # layer, type, modes, ratio, bond, rank, entropy, error
        bond, rank, entropy, error = int(row[-4]), int(row[-3]), float(row[-2]), float(row[-1])
        s = np.linalg.svd(unfolding(w, model.fc1.in_shape, model.fc1.out_shape, k).numpy(), compute_uv=False)
        s = s[: model.fc1.ranks[k + 1]]
        assert bond == k + 1 and rank == model.fc1.ranks[k + 1] and row[1] == "MPOLinear"
        assert entropy == pytest.approx(entropy_reference(s), abs=1e-3)
        assert error == pytest.approx(s[-1] / np.linalg.norm(s), rel=1e-3)
    assert main(["inspect", str(path), "--plot", str(plot)]) == 2  # never overwrites
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    capsys.readouterr()
    # a directory holding the model file (train's --out, compress --hf-model's model/): the same report
    run = tmp_path / "run"
    save_model(model, run / "model.safetensors")
    assert main(["inspect", str(run)]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("fc1 ")] == \
        [line for line in printed.splitlines() if line.startswith("fc1 ")]
    assert main(["inspect", str(tmp_path)]) == 2  # no torchtn.safetensors / model.safetensors: the files it has
    assert "name one of its files: m.safetensors" in capsys.readouterr().err


def test_interrupted_job_resumes_to_identical_models(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from torchtn.train import trainer as trainer_module

    args = ["compress", "--epochs", "3", "--finetune-epochs", "3", "--rank", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    real_save = trainer_module.Trainer._save
    fired = []

    def interrupt_mid_finetune(self, optimizer, epoch):
        real_save(self, optimizer, epoch)
        if self.config.desc == "rank-2" and epoch == 1 and not fired:
            fired.append(1)
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "_save", interrupt_mid_finetune)
    out = tmp_path / "cut"
    assert main([*args, "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err and not (out / "rank-2.safetensors").exists()
    # --resume alone: the options left out are the run's own (its epochs and rank here, not the defaults)
    assert main(["compress", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "the run's own settings for the options not given: epochs=3, finetune_epochs=3" in capsys.readouterr().out
    a = load_file(tmp_path / "straight" / "rank-2.safetensors")
    b = load_file(out / "rank-2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an option given with another value than the run's is still refused, by name — a default value too
    assert main(["compress", "--out", str(out), "--resume", "--epochs", "30"]) == 2
    assert "epochs: 3 → 30" in capsys.readouterr().err
    assert main(["compress", "--out", str(out), "--resume", "--ratio", "2"]) == 2  # one of rank/rel-tol/ratio
    assert "ranks: [2] → None" in capsys.readouterr().err


USER_CNN = """
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, width=4, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.head = nn.Linear(width * 7 * 7, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.conv(x).relu()).flatten(1))


def small_cnn(**kwargs):
    return SmallCNN(**kwargs)


NOT_A_MODEL = 3
"""


def test_compress_a_model_of_the_users_own_architecture(tmp_path, capsys, monkeypatch):
    """--arch FILE.py:NAME (or package.module:NAME) with --arch-args compresses a plain nn.Module of the user's that
    torchtn has never seen, from its weights-only state dict, to a ratio, with the per-layer report; every mistake in
    naming it is one line and exit 2 before anything is written."""
    from test_data import make_mnist_dir

    from torchtn.io import load_model
    from torchtn.models.user import build_user_model

    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    source = tmp_path / "user_cnn_arch.py"
    source.write_text(USER_CNN)
    torch.manual_seed(0)
    users_model = build_user_model(f"{source}:SmallCNN", {"width": 4})
    weights = tmp_path / "cnn.pt"
    torch.save(users_model.state_dict(), weights)
    common = ["compress", "--dataset", "mnist", "--data-dir", str(data), "--no-progress"]
    out = tmp_path / "run"
    assert main([*common, "--arch", f"{source}:SmallCNN", "--arch-args", '{"width": 4}', "--model-file", str(weights),
                 "--ratio", "3", "--finetune-epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "entropy S_k per bond" in printed and "head" in printed
    results = json.loads((out / "results.json").read_text())
    row = results["rows"][0]
    assert row["ratio"] >= 3 and 0 <= row["acc_after"] <= 1
    assert results["config"]["arch"].endswith(":SmallCNN") and results["config"]["arch_args"] == {"width": 4}
    start = load_model(out / "dense.safetensors", build_user_model(f"{source}:SmallCNN", {"width": 4}))
    for name, value in users_model.state_dict().items():
        assert torch.equal(start.state_dict()[name], value), name
    # the module form, importable from the working directory; a factory function serves as NAME too
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--arch", "user_cnn_arch:small_cnn", "--model-file", str(weights), "--rank", "2",
                 "--finetune-epochs", "0", "--out", str(tmp_path / "module-form")]) == 0
    capsys.readouterr()
    for arch, extra, message in (
            (f"{tmp_path / 'missing.py'}:SmallCNN", [], "no Python file at"),
            (f"{source}:Missing", [], "defines no Missing"),
            (f"{source}:NOT_A_MODEL", [], "NOT_A_MODEL is not callable (int)"),
            (f"{source}:SmallCNN", ["--arch-args", '{"depth": 2}'], "unexpected keyword argument 'depth'"),
            (f"{source}:SmallCNN", ["--arch-args", '{"num_classes": 3}'], "expected (2, 10) class scores"),
            (f"{source}:SmallCNN", ["--model-file", str(weights), "--arch-args", '{"width": 2}'], "does not fit"),
            ("no_such_module_here:Net", [], "importing no_such_module_here failed (ModuleNotFoundError"),
            ("lenet5", ["--arch-args", "{}"], "only for an architecture of your own")):
        no = tmp_path / "refused"
        assert main([*common, "--arch", arch, *extra, "--rank", "2", "--out", str(no)]) == 2, arch
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not no.exists()
    # a Hugging Face folder is compressed by --hf-model alone: --arch/--model-file with it are refused, not ignored
    assert main(["compress", "--hf-model", str(tmp_path), "--corpus", str(source), "--arch", "lenet5",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "--hf-model compresses the Hugging Face model" in capsys.readouterr().err


def test_compress_a_users_trained_model_file(tmp_path, capsys, monkeypatch):
    """A model trained outside torchtn (a .pt state dict, read weights-only, once) is compressed to a ratio and healed
    by distillation — starting from exactly its weights; a pickle that would run code is refused with one line."""
    from test_data import make_mnist_dir

    import torchtn.experiments.compress as compress_job
    from torchtn.io import load_model
    from torchtn.models import LeNet5

    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    torch.manual_seed(0)
    user = tmp_path / "lenet.pt"
    users_model = LeNet5()
    torch.save(users_model.state_dict(), user)
    out = tmp_path / "run"
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    assert main(["compress", "--dataset", "mnist", "--data-dir", str(data), "--arch", "lenet5", "--model-file",
                 str(user), "--ratio", "4", "--finetune-epochs", "1", "--distill", "0.5", "--out", str(out),
                 "--no-progress"]) == 0
    assert [str(p) for p in reads] == [str(user)]  # preflight's read is the run's starting point
    monkeypatch.setattr(torch, "load", real_load)
    printed = capsys.readouterr().out
    assert "entropy S_k per bond" in printed and "ratio-4" in printed
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["ratio"] >= 4 and 0 <= row["acc_after"] <= 1
    start = load_model(out / "dense.safetensors", compress_job.dense_model(compress_job.CompressConfig(
        dataset="mnist", arch="lenet5"), compress_job.load_dataset("mnist", str(data))))
    for name, value in users_model.state_dict().items():
        assert torch.equal(start.state_dict()[name], value), name
    # the same with the convolutions as kernel TTs (four small convolutions each)
    fast = tmp_path / "kernel-modes"
    assert main(["compress", "--dataset", "mnist", "--data-dir", str(data), "--arch", "lenet5", "--model-file",
                 str(user), "--rank", "3", "--conv-modes", "kernel", "--finetune-epochs", "1", "--out", str(fast),
                 "--no-progress"]) == 0
    capsys.readouterr()
    from torchtn.io import read_metadata

    layers = read_metadata(fast / "rank-3.safetensors")["layers"]
    convs = [entry["spec"] for entry in layers.values() if entry["type"] == "MPOConv2d"]
    assert convs and all(spec["in_shape"][1:] == [5, 5, 1] and spec["out_shape"][:3] == [1, 1, 1] for spec in convs)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"fc1.weight": Evil()}, evil)
    assert main(["compress", "--dataset", "mnist", "--data-dir", str(data), "--arch", "lenet5", "--model-file",
                 str(evil), "--rank", "2", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr()
    assert "weights-only" in err.err and "pwned" not in err.out and not (tmp_path / "no").exists()
    assert main(["compress", "--dataset", "mnist", "--data-dir", str(data), "--arch", "fc2", "--model-file",
                 str(user), "--rank", "2", "--out", str(tmp_path / "no")]) == 2
    assert "does not fit --arch" in capsys.readouterr().err
