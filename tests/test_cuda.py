"""CUDA paths: the same math on a GPU as on the CPU, plans and autotuning on the device, training on ``--device``.

Every test here is skipped where PyTorch sees no GPU (CI has none); they run on a GPU machine with plain ``pytest``.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from torchtn import MPOConv2d, MPOLinear, load_model, save_model
from torchtn.core import plan_tt_linear, set_autotune
from torchtn.data import load_digits
from torchtn.models import FC2
from torchtn.train import TrainConfig, Trainer, evaluate
from torchtn.train.device import resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='gpu' is not allowed"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="indices 0"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_more_processes_per_node_than_gpus(monkeypatch):
    """Under torchrun with more processes on a node than GPUs, "auto" trains on the CPU (gloo) and "cuda" names the
    process that has no GPU of its own (a machine with one GPU is simulated where there is none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1\) needs GPU 1 and this machine has 1 CUDA GPU.*"
                                         r"at most 1 process\(es\) per node"):
        resolve_device("cuda", name="--device")


@cuda
@pytest.mark.parametrize("training", [False, True])
def test_mpo_linear_on_cuda_equals_cpu_in_float64(training):
    torch.manual_seed(0)
    cpu = MPOLinear(96, 60, 5, in_shape=(4, 4, 6), out_shape=(3, 4, 5)).double().train(training)
    gpu = MPOLinear(96, 60, 5, in_shape=(4, 4, 6), out_shape=(3, 4, 5)).double().train(training)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(37, 96, dtype=torch.float64, requires_grad=training)
    xg = x.detach().cuda().requires_grad_(training)
    y, yg = cpu(x), gpu(xg)
    assert yg.device.type == "cuda"
    torch.testing.assert_close(yg.cpu(), y, rtol=0, atol=1e-10)
    if training:
        y.square().sum().backward()
        yg.square().sum().backward()
        torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=0, atol=1e-9)
        for a, b in zip(cpu.cores, gpu.cores):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=0, atol=1e-9)


@cuda
def test_plans_are_keyed_on_the_device_and_use_its_cost_model():
    args = ((4, 8, 8, 4), (4, 4, 4, 4), (1, 8, 8, 8, 1), 64)
    on_cpu = plan_tt_linear(*args, device="cpu")
    on_gpu = plan_tt_linear(*args, device="cuda")
    assert on_gpu is plan_tt_linear(*args, device="cuda")  # cached per device
    assert on_gpu is not on_cpu
    layer = MPOLinear(1024, 256, 8, in_shape=(4, 8, 8, 4), out_shape=(4, 4, 4, 4)).cuda().eval()
    with torch.no_grad():
        y = layer(torch.randn(64, 1024, device="cuda"))
    assert y.device.type == "cuda" and torch.isfinite(y).all()


@cuda
def test_autotuning_on_cuda_times_the_candidates_and_keeps_the_fastest():
    set_autotune(True)
    try:
        plans = [plan_tt_linear((4, 7, 7, 4), (4, 4, 4, 4), (1, 4, 4, 4, 1), 64, device="cuda", training=t)
                 for t in (False, True)]
    finally:
        set_autotune(None)
    for p in plans:
        assert p.measured_seconds is not None and len(p.measurements) >= 2
        assert p.measured_seconds <= p.model_pick_seconds
        assert p.measured_seconds == min(t for _, t in p.measurements)


@cuda
@pytest.mark.parametrize("contraction", ["rebuild", "patches"])
def test_mpo_conv2d_on_cuda_equals_conv2d_with_the_rebuilt_kernel(contraction):
    torch.manual_seed(0)
    groups = 2 if contraction == "rebuild" else 1  # the patches path is for groups=1
    conv = MPOConv2d(8, 12, 3, stride=2, padding=1, dilation=2, groups=groups, rank=4,
                     contraction=contraction).double().cuda()
    x = torch.randn(5, 8, 11, 9, dtype=torch.float64, device="cuda")
    ref = F.conv2d(x, conv.to_dense(), conv.bias, stride=2, padding=1, dilation=2, groups=groups)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_trainer_on_a_device_learns_resumes_and_writes_files_that_load_on_the_cpu(tmp_path, device):
    data = load_digits().flattened()
    cfg = TrainConfig(epochs=6, batch_size=64, lr=1e-2, progress=False)

    def build():
        torch.manual_seed(0)
        return FC2(64, hidden=64, layers="mpo", rank=4)

    model = build()
    Trainer(model, cfg, checkpoint=tmp_path / "a.safetensors", device=device).fit(data)
    assert next(model.parameters()).device.type == device
    _, acc = evaluate(model, data.x_test, data.y_test)
    assert acc > 0.85  # 0.92 on the CPU and on an H200
    # resume from the mid-run checkpoint on the GPU: same end point as the straight run
    def stop_after_two(record):
        if record.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(build(), cfg, checkpoint=tmp_path / "b.safetensors", device=device,
                on_epoch_end=stop_after_two).fit(data)
    resumed = build()
    Trainer(resumed, cfg, checkpoint=tmp_path / "b.safetensors", device=device).fit(data, resume=True)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # a model file written from the GPU loads into a CPU skeleton with the same outputs
    save_model(model, tmp_path / "m.safetensors")
    cpu = load_model(tmp_path / "m.safetensors", FC2(64, hidden=64, layers="mpo", rank=4)).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cpu(data.x_test[:50]), model(data.x_test[:50].to(device)).cpu(), rtol=1e-5,
                                   atol=1e-5)


@cuda
def test_cli_trains_on_the_gpu(tmp_path):
    from torchtn.cli import main

    out = tmp_path / "run"
    assert main(["train", "--arch", "fc2", "--layers", "mpo", "--rank", "4", "--epochs", "6", "--lr", "1e-2",
                 "--device", "cuda", "--no-progress", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["test_accuracy"] > 0.8


@cuda
@pytest.mark.parametrize("form", ["chunked", "recurrent", "parallel"])
def test_tensor_attention_on_cuda_equals_cpu(form):
    from torchtn.core.attention import tensor_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g, dtype=torch.float64) / 3 for _ in range(3))
    cpu = tensor_attention(q, k, v, form=form, chunk_size=16, decay=0.95)
    gpu = tensor_attention(q.cuda(), k.cuda(), v.cuda(), form=form, chunk_size=16, decay=0.95)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)


@cuda
def test_deep_tensor_network_decodes_on_cuda():
    import torchtn

    torch.manual_seed(0)
    net = torchtn.DeepTensorNetwork(16, 2, 4).double().cuda().eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64, device="cuda")
    state, ys = None, []
    for t in range(12):
        y, state = net.step(x[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), net(x), rtol=0, atol=1e-10)


@cuda
@pytest.mark.parametrize("M", ["dct", "dft", "orthogonal"])
def test_t_layers_on_cuda_equal_cpu(M):
    from torchtn.layers import THamiltonian, TLinear

    torch.manual_seed(0)
    layer = TLinear(6, 5, 7, M=M).double()
    x = torch.randn(4, 6, 7, dtype=torch.float64)
    ref = layer(x)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), ref, rtol=0, atol=1e-10)
    ham = THamiltonian(6, 7, 8, M=M).double().cuda()
    y, z = ham.forward_states(x.cuda())
    back, _ = ham.inverse(y, z)
    torch.testing.assert_close(back.cpu(), x, rtol=0, atol=1e-10)


@cuda
def test_sweep_training_on_cuda_equals_cpu_in_float64():
    import dataclasses

    from torchtn.models import HybridMLP
    from torchtn.train.sweep import SweepConfig

    digits = load_digits().first(512)
    data = dataclasses.replace(digits, **{k: getattr(digits, k).double() for k in ("x_train", "x_val", "x_test")})
    models = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = HybridMLP(64, 64, 10, rank=2, hidden_shape=(4, 4, 4)).double()
        cfg = TrainConfig(epochs=1, batch_size=256, lr=3e-3, optimizer="sweep", progress=False,
                          sweep=SweepConfig(max_rank=8))
        trainer = Trainer(model, cfg, device=device)
        trainer.fit(data)
        models[device] = (model, trainer.sweeper.history)
    (cpu, h_cpu), (gpu, h_gpu) = models["cpu"], models["cuda"]
    assert cpu.tn.ranks == gpu.tn.ranks and [r["ranks"] for r in h_cpu] == [r["ranks"] for r in h_gpu]
    # the SVD's singular vectors are fixed only up to signs, which may differ between devices: compare the weights
    assert torch.allclose(cpu.tn.to_dense(), gpu.tn.to_dense().cpu(), atol=1e-8)
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert b.device.type == "cuda"
        if not name.startswith("tn.cores"):
            assert torch.allclose(a, b.cpu(), atol=1e-8), name


@cuda
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("unitary", [False, True])
def test_adtn_linear_on_cuda_equals_cpu_in_float64(training, unitary):
    from torchtn import ADTNLinear

    torch.manual_seed(0)
    cpu = ADTNLinear(48, 20, depth=3, unitary=unitary, dtype=torch.float64).train(training)
    gpu = ADTNLinear(48, 20, depth=3, unitary=unitary, dtype=torch.float64)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().train(training)
    x = torch.randn(9, 48, dtype=torch.float64)
    y, yg = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(yg.cpu(), y, rtol=0, atol=1e-10)
    if training:
        y.square().sum().backward()
        yg.square().sum().backward()
        for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-9, atol=1e-10, msg=name)


@cuda
@pytest.mark.parametrize("training", [False, True])
def test_mpo_embedding_on_cuda_equals_cpu_in_float64(training):
    from torchtn import MPOEmbedding

    torch.manual_seed(0)
    table = torch.nn.Embedding(360, 24, padding_idx=3).double()
    cpu = MPOEmbedding.from_dense(table, rank=6).train(training)
    gpu = MPOEmbedding.from_dense(table, rank=6)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().train(training)
    ids = torch.randint(0, 360, (5, 11))
    ids[0, :3] = 3
    y, yg = cpu(ids), gpu(ids.cuda())
    torch.testing.assert_close(yg.cpu(), y, rtol=0, atol=1e-10)
    if training:
        y.square().sum().backward()
        yg.square().sum().backward()
        for a, b in zip(cpu.core_list(), gpu.core_list()):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=0, atol=1e-9)


@cuda
def test_mpo_embedding_refuses_out_of_range_ids_on_cuda_with_a_device_side_assert():
    # a device-side assert poisons the CUDA context of its process: run it in a fresh one
    import subprocess
    import sys

    code = ("import torch; from torchtn import MPOEmbedding\n"
            "m = MPOEmbedding.from_dense(torch.nn.Embedding(100, 8), rank=4).cuda().eval()\n"
            "with torch.no_grad():\n    m(torch.tensor([1, 2, 100], device='cuda'))\n"
            "torch.cuda.synchronize()\nprint('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no error" not in proc.stdout
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]


@cuda
def test_mpo_linear_compiles_on_cuda_without_graph_breaks():
    torch.manual_seed(0)
    layer = MPOLinear(256, 128, 8, in_shape=(4, 8, 8), out_shape=(4, 4, 8)).cuda()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(32, 256, device="cuda", requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in layer.cores)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)


@cuda
def test_tensorize_on_cuda_keeps_the_device_and_matches_the_cpu_in_float64():
    from torchtn import tensorize

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).double()
    on_cpu, report_cpu = tensorize(dense, rank=6)
    on_gpu, report_gpu = tensorize(dense.cuda(), rank=6)
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    assert [r.ranks for r in report_cpu.layers] == [r.ranks for r in report_gpu.layers]
    x = torch.randn(7, 64, dtype=torch.float64)
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), on_cpu(x), rtol=0, atol=1e-9)


def _encoder() -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, dtype=torch.float64)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@cuda
@pytest.mark.parametrize("method", ["mpo", "adtn"])
def test_parametrized_attention_on_cuda_equals_cpu_and_its_file_loads_on_the_cpu(tmp_path, method):
    """tensorize holds nn.MultiheadAttention's projections as parametrizations: on the GPU they give the CPU's
    outputs and gradients (train and eval, where PyTorch may take its fused attention path), and a file saved from
    the GPU loads into a fresh dense encoder on the CPU."""
    import copy

    from torchtn import tensorize

    torch.manual_seed(0)
    kwargs = {"ratio": 3} if method == "mpo" else {"method": "adtn", "depth": 2, "fit_steps": 20}
    cpu, _ = tensorize(_encoder(), **kwargs)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    y, yg = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(yg.cpu(), y, rtol=0, atol=1e-9)
    y.square().sum().backward()
    yg.square().sum().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        assert b.device.type == "cuda"
        if a.numel():  # (a parametrization's emptied dense original gets no gradient)
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-8, atol=1e-9, msg=name)
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=0, atol=1e-9)
        path = save_model(gpu, tmp_path / "encoder.safetensors")
        fresh = load_model(path, _encoder()).eval()
        torch.testing.assert_close(fresh(x), cpu(x), rtol=0, atol=1e-9)


@cuda
def test_cli_trains_a_users_own_architecture_as_mpos_on_the_gpu(tmp_path):
    from torchtn.cli import main
    from torchtn.io import read_metadata

    source = tmp_path / "digit_net.py"
    source.write_text("from torch import nn\n\n\nclass DigitNet(nn.Sequential):\n"
                      "    def __init__(self, hidden=32):\n"
                      "        super().__init__(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n")
    out = tmp_path / "run"
    assert main(["train", "--arch", f"{source}:DigitNet", "--arch-args", '{"hidden": 256}', "--layers", "mpo",
                 "--rank", "4", "--epochs", "6", "--lr", "3e-3", "--device", "cuda", "--no-progress",
                 "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["test_accuracy"] > 0.5
    assert "MPOLinear" in {e["type"] for e in read_metadata(out / "model.safetensors")["layers"].values()}
