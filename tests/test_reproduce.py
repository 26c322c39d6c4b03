"""`torchtn reproduce`: the registry, the results format of conventions.md, resume and refusals."""
import json

from test_data import make_mnist_dir

from torchtn.cli import main
from torchtn.experiments.registry import reproductions


def test_registry_lists_gao2020():
    rep = reproductions()["gao2020"]
    assert rep.default_dataset == "fashion-mnist" and "mnist" in rep.datasets


def test_quick_run_on_mnist_files_writes_the_shared_results_format(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    out = tmp_path / "run"
    args = ["reproduce", "gao2020", "--quick", "--dataset", "mnist", "--data-dir", str(data), "--seeds", "1",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"experiment", "command", "machine", "versions", "seconds", "rows"} <= set(results)
    assert results["experiment"] == "gao2020" and "--quick" in results["command"]
    rows = results["rows"]
    assert {(r["model"], r["layers"], r["method"]) for r in rows} == {
        ("fc2", "dense", "scratch"), ("fc2", "mpo", "scratch"), ("fc2", "mpo", "compress"),
        ("lenet5", "dense", "scratch"), ("lenet5", "mpo", "scratch"), ("lenet5", "mpo", "compress")}
    for r in rows:
        assert r["dataset"] == "mnist" and r["seed"] == 0 and 0 <= r["test_accuracy"] <= 1 and r["params"] > 0
    fc2_d4 = [r for r in rows if r["model"] == "fc2" and r["rank"] == 4]
    assert all(r["mpo_weights"] == 1_760 and abs(r["rho_mpo_over_dense"] - 1_760 / 203_264) < 1e-12 for r in fc2_d4)
    lenet = [r for r in rows if r["model"] == "lenet5" and r["layers"] == "mpo"]
    assert all(r["mpo_weights"] == 2_860 and r["model_ratio"] > 10 for r in lenet)
    assert all(len(r["entropy_fc1"]) == 3 for r in lenet)
    report = (out / "report.md").read_text()
    assert "lenet5 MPO D=4-4-2 (scratch)" in report and "ρ = MPO / dense" in report
    for png in ("accuracy_vs_parameters.png", "entropy_per_bond.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # resuming a finished run loads every stage and gives the same rows; other settings are refused
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]
    capsys.readouterr()
    assert main([*args[:-3], "--seeds", "2", "--out", str(out), "--resume"]) == 2
    assert "other settings (seeds" in capsys.readouterr().err


def test_reproduce_refusals(tmp_path, capsys):
    assert main(["reproduce", "nobody2099", "--out", str(tmp_path / "a")]) == 2
    assert "'nobody2099' is not known" in capsys.readouterr().err
    assert main(["reproduce", "gao2020", "--dataset", "digits", "--out", str(tmp_path / "b")]) == 2
    assert "--dataset 'digits' is not allowed for gao2020" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
