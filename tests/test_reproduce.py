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
    resumed = json.loads((out / "results.json").read_text())
    again = resumed["rows"]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]
    # its time counts what the first run trained (the stages' recorded seconds), not only the loading
    assert resumed["seconds"] >= sum(r["seconds"] for r in rows if r["method"] == "scratch")
    capsys.readouterr()
    assert main(["reproduce", "gao2020", "--out", str(out), "--resume", "--no-progress"]) == 0  # its own options
    taken = capsys.readouterr().out
    assert all(f"{k}={v}" in taken for k, v in (("quick", True), ("dataset", "mnist"), ("seeds", 1)))
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]
    assert main([*args[:-3], "--seeds", "2", "--out", str(out), "--resume"]) == 2
    assert "other settings (seeds" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["config"] == {
        "name": "gao2020", "quick": True, "dataset": "mnist", "data_dir": str(data), "seeds": 1}


def test_report_only_rewrites_a_finished_runs_report_from_its_results(tmp_path, capsys):
    """--report-only: report.md and the plots again from results.json — the rows as recorded (here changed by hand, as
    a newer report would draw the same rows otherwise), nothing trained, the results file untouched; the settings
    come from the run (results without a recorded config, as older runs wrote them: from its command)."""
    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    out = tmp_path / "run"
    assert main(["reproduce", "adtn", "--quick", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    for r in results["rows"]:
        if r["layers"] == "dense" and r["model"] == "fc2":
            r["test_accuracy"] = 0.4321
    del results["config"]
    (out / "results.json").write_text(json.dumps(results))
    (out / "accuracy_vs_parameters.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    capsys.readouterr()
    assert main(["reproduce", "adtn", "--report-only", "--out", str(out)]) == 0
    assert "nothing was trained" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "| fc2 | dense | scratch | – | – | 200,704 | 203,264 | 43.21 ± 0.00 |" in text
    assert (out / "accuracy_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text()) == results
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before
    for r in results["rows"]:
        del r["layer_params"]  # a row field this report reads, missing (an older run's rows)
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "results.json").write_text(json.dumps(results))
    for args, words in ((["adtn", "--report-only"], "--report-only needs --out DIR"),
                        (["adtn", "--report-only", "--out", str(tmp_path / "older")], "rows without 'layer_params'"),
                        (["adtn", "--report-only", "--out", str(tmp_path / "none")], "does not exist"),
                        (["gao2020", "--report-only", "--out", str(out)], "results of 'adtn', not of 'gao2020'"),
                        (["adtn", "--report-only", "--quick", "--out", str(out)], "--quick does not combine"),
                        (["adtn", "--report-only", "--dataset", "fashion-mnist", "--out", str(out)],
                         "was measured on mnist")):
        assert main(["reproduce", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_reproduce_refusals(tmp_path, capsys):
    assert main(["reproduce", "nobody2099", "--out", str(tmp_path / "a")]) == 2
    assert "'nobody2099' is not known" in capsys.readouterr().err
    assert main(["reproduce", "gao2020", "--dataset", "digits", "--out", str(tmp_path / "b")]) == 2
    assert "--dataset 'digits' is not allowed for gao2020" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_registry_lists_every_reproduction():
    assert {"gao2020", "dtn", "tnn", "adtn", "vtnn"} <= set(reproductions())


def test_dtn_quick_run_rows_and_report(tmp_path, monkeypatch):
    from torchtn.experiments import dtn

    monkeypatch.setitem(dtn.QUICK, "lengths", (64, 128))
    monkeypatch.setitem(dtn.QUICK, "mqar", ((16, 2),))
    monkeypatch.setitem(dtn.QUICK, "mqar_train", 64)
    monkeypatch.setitem(dtn.QUICK, "rows_train", 48)
    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    out = tmp_path / "run"
    assert main(["reproduce", "dtn", "--quick", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    comp = [r for r in rows if r["task"] == "complexity"]
    assert {(r["model"], r["seq_len"]) for r in comp} == {(m, n) for m in ("softmax", "linear", "tensor")
                                                          for n in (64, 128)}
    assert all(r["seconds"] > 0 and r["peak_mb"] >= 0 for r in comp)
    tasks = [r for r in rows if "test_accuracy" in r]
    assert {(r["task"], r["model"]) for r in tasks} == {(t, m) for t in ("mnist-rows", "mqar")
                                                        for m in ("softmax", "linear", "tensor")}
    params = {r["model"]: r["params"] for r in tasks if r["task"] == "mqar"}
    assert params["tensor"] - params["softmax"] == 2 * 16  # only the per-head RMS gain (2 blocks × head_dim 16)
    report = (out / "report.md").read_text()
    assert "reconstruction" in report and "chunked form ≥ 10× faster" in report
    assert (out / "time_vs_length.png").read_bytes()[:4] == b"\x89PNG"


def test_tnn_quick_run_rows_and_report(tmp_path, monkeypatch):
    from torchtn.experiments import tnn

    for key, value in {"sizes": (48,), "ae_train": 48, "ae_matrix": ((16, 4),), "depths": (2, 4), "depth_train": 48,
                       "transform_train": 48, "transforms": ("dct", "dft")}.items():
        monkeypatch.setitem(tnn.QUICK, key, value)
    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    out = tmp_path / "run"
    assert main(["reproduce", "tnn", "--quick", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    cls = {(r["model"], r["loss"]): r for r in rows if r["experiment"] == "classification"}
    assert {k: r["params"] for k, r in cls.items()} == {("tnn", "tce"): 30_856, ("tnn", "ce"): 30_586,
                                                        ("matrix", "ce"): 31_015, ("matrix-wide", "ce"): 623_290}
    # each classifier under both protocols: the paper's Adam (L2) at one rate for all, and AdamW at each one's own
    both = {(r["protocol"], r["optimizer"], r["model"], r["loss"], r["lr"]) for r in rows
            if r["experiment"] == "classification"}
    assert {b[:4] for b in both} == {(p, o, *k) for p, o in (("paper", "adam"), ("tuned", "adamw")) for k in cls}
    assert {b[4] for b in both if b[0] == "paper"} == {1e-2}
    assert len({r["n_train"] for r in cls.values()}) == 1 and all(0 < r["n_train"] <= 48 and 0 <= r["test_accuracy"] <= 1
                                                                for r in cls.values())
    depth = [r for r in rows if r["experiment"] == "depth"]
    assert [r["depth"] for r in depth] == [2, 4] and all(r["finite"] for r in depth)
    assert {r["transform"] for r in rows if r["experiment"] == "transform"} == {"dct", "dft"}
    assert all(r["test_mse"] > 0 for r in rows if r["experiment"] == "autoencoder")
    report = (out / "report.md").read_text()
    for protocol in ("the paper's settings (Adam + L2, lr 0.01 for all)", "each model at its best rate (AdamW)"):
        assert f"{protocol}, n_train = " in report and "t-NN (t-CE, 30,856) ≥ matched matrix net (31,015)" in report


def test_tnn_cifar_command_smoke_run_on_a_tiny_subset(tmp_path, monkeypatch):
    from test_data import write_cifar

    from torchtn.experiments import tnn

    monkeypatch.setitem(tnn.CIFAR_QUICK, "depths", (1,))
    monkeypatch.setitem(tnn.CIFAR_QUICK, "train", 8)
    out = tmp_path / "run"
    assert main(["reproduce", "tnn", "--quick", "--dataset", "cifar10", "--data-dir",
                 str(write_cifar(tmp_path / "cifar", n=10)), "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["model"], r["params"]) for r in rows} == {("tnn-hamiltonian", 96 * 96 * 32 + 32 + 10 * 96 * 32 + 10 * 32),
                                                         ("matrix-hamiltonian", 3072 * 3072 + 1 + 3072 * 10 + 10)}
    assert "Hamiltonian t-ResNet vs matrix Hamiltonian ResNet" in (out / "report.md").read_text()


def test_adtn_quick_run_rows_and_report(tmp_path, monkeypatch):
    from torchtn.experiments import adtn

    monkeypatch.setitem(adtn.QUICK, "train", None)
    data = make_mnist_dir(tmp_path / "mnist", n_train=48, n_test=20)
    out = tmp_path / "run"
    assert main(["reproduce", "adtn", "--quick", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = {(r["model"], r["layers"], r["depth"], r["method"], r.get("mapping")): r["layer_params"] for r in rows}
    assert got == {("fc2", "dense", None, "scratch", None): 200_704,
                   ("fc2", "adtn", 1, "scratch", "rowmajor"): 16 * 17 + 1, ("fc2", "mpo", 1, "scratch", None): 288,
                   ("fc2", "adtn", 2, "scratch", "rowmajor"): 16 * 2 * 17 + 1, ("fc2", "mpo", 2, "scratch", None): 600,
                   ("fc2", "adtn", 2, "scratch", "interleaved"): 16 * 2 * 17 + 1,
                   ("fc2", "adtn", 2, "compress", "rowmajor"): 16 * 2 * 17 + 1,
                   ("lenet5", "dense", None, "scratch", None): 58_080,
                   ("lenet5", "adtn", 2, "scratch", "rowmajor"): (16 * 2 * 15 + 1) + (16 * 2 * 13 + 1)}
    assert all(r["dataset"] == "mnist" and 0 <= r["test_accuracy"] <= 1 for r in rows)
    healed = next(r for r in rows if r["method"] == "compress")
    # compressed from the trained dense FC2 of the same seed: the fit's error and the accuracy before healing recorded
    assert 0 < healed["fit_error"] < 2 and 0 <= healed["acc_before_heal"] <= 1
    assert healed["epochs"] == adtn.QUICK["heal_epochs"] and healed["seed"] == 0
    text = (out / "report.md").read_text()
    assert "ADTN ≥ MPO at equal parameters" in text and "compress-and-heal of the trained dense FC2" in text
    assert "| fc2 | adtn | compress | 2 | rowmajor | 545 |" in text
    assert "| fc2 | adtn | scratch | 2 | interleaved | 545 |" in text
    assert "depth 2, mapping 'interleaved' (1 seed): within 3 points of dense; ≥ MPO" in text
    assert (out / "accuracy_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    assert "![accuracy vs parameters](accuracy_vs_parameters.png)" in text


def test_vtnn_quick_run_rows_and_report(tmp_path, monkeypatch):
    import dataclasses

    from torchtn.experiments import vtnn

    monkeypatch.setattr(vtnn, "TASKS", tuple(dataclasses.replace(t, quick_epochs=1) for t in vtnn.TASKS))
    data = make_mnist_dir(tmp_path / "mnist", n_train=96, n_test=20)
    out = tmp_path / "run"
    assert main(["reproduce", "vtnn", "--quick", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    tasks = ("linear-regression", "nonlinear-regression", "moons", "circles", "digits", "images")
    assert {(r["model"], r["method"]) for r in rows} == {(t, m) for t in tasks for m in ("dense", "sweep", "backprop")}
    for r in rows:
        key = "test_mse" if "regression" in r["model"] else "test_accuracy"
        assert r[key] >= 0 and r["params"] > 0 and len(r["val_curve"]) == 1
        if r["method"] == "backprop":
            assert r["bond_dims"] == [r["max_rank"]] * (2 if r["model"] != "images" else 3)
        if r["method"] == "sweep":
            assert 2 <= min(r["bond_dims"]) and max(r["bond_dims"]) <= r["max_rank"]
            assert len(r["entropy"]) == len(r["bond_dims"]) and "sweep_history" not in r  # rows stay flat
    digits = {r["method"]: r for r in rows if r["model"] == "digits"}
    assert digits["sweep"]["params"] < digits["dense"]["params"]
    report = (out / "report.md").read_text()
    assert "digits: hybrid trained by sweeps ≥ 95% test accuracy" in report and "within 10% of backprop" in report
    for png in ("sweeps-digits.png", "sweeps-images.png", "entropy_profiles.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
