"""The layer registry: every registered layer type saves, loads, tensorizes and is inspected through one registration."""
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from torchtn import ADTNConv2d, ADTNLinear, MPOConv2d, MPOEmbedding, MPOLinear, load_model, save_model, tensorize
from torchtn.cli import main
from torchtn.layers import (
    ComputedWeight,
    TAntisymmetric,
    THamiltonian,
    TLinear,
    TResidual,
    TTLayer,
    adtn_parametrize,
    layer_types,
    mpo_parametrize,
    register_layer,
    type_name,
)
from torchtn.layers import registry as registry_module

# One example per registered type: adding a layer type without adding it here fails test_every_type_has_an_example.
EXAMPLES = {
    "MPOLinear": lambda: MPOLinear(48, 20, 3, dtype=torch.float64),
    "MPOConv2d": lambda: nn.Sequential(nn.Unflatten(1, (3, 4, 4)), MPOConv2d(3, 5, 3, padding=1, rank=3,
                                                                               dtype=torch.float64),
                                       nn.Flatten(), nn.Linear(80, 20, dtype=torch.float64)),
    "TLinear": lambda: _tubes(TLinear(6, 5, 8, M="orthogonal", dtype=torch.float64), 40),
    "TResidual": lambda: _tubes(TResidual(6, 8, M="dft", dtype=torch.float64), 48),
    "TAntisymmetric": lambda: _tubes(TAntisymmetric(6, 8, gamma=1e-3, dtype=torch.float64), 48),
    "THamiltonian": lambda: _tubes(THamiltonian(6, 8, 2, width=7, M="identity", dtype=torch.float64), 48),
    "ADTNLinear": lambda: ADTNLinear(48, 20, depth=2, activation="tanh", dtype=torch.float64),
    "MPOEmbedding": lambda: nn.Sequential(_Ids(), MPOEmbedding(50, 5, rank=3, dtype=torch.float64), nn.Flatten(),
                                          nn.Linear(20, 20, dtype=torch.float64)),
    "ADTNConv2d": lambda: nn.Sequential(nn.Unflatten(1, (3, 4, 4)), ADTNConv2d(3, 5, 3, padding=1, depth=2,
                                                                                 dtype=torch.float64),
                                        nn.Flatten(), nn.Linear(80, 20, dtype=torch.float64)),
    # parametrizations of a plain module's tensor: the skeleton below holds the dense nn.Linear
    "ADTNParametrization": lambda: _parametrized(lambda m: adtn_parametrize(m, "weight", depth=2)),
    "MPOParametrization": lambda: _parametrized(lambda m: mpo_parametrize(m, "weight", rank=3)),
}


def _parametrized(how) -> nn.Module:
    linear = nn.Linear(48, 20, dtype=torch.float64)
    how(linear)
    return linear


class _Ids(nn.Module):
    """48 features -> 4 token ids in [0, 50) (for the embedding example)."""

    def forward(self, x):
        return (x[:, :4].abs() * 7).long() % 50


def _tubes(layer: nn.Module, out_features: int) -> nn.Module:
    """48 features as (6 features, tubes of 8) through a t-product layer, then a dense map to 20."""
    return nn.Sequential(nn.Unflatten(1, (6, 8)), layer, nn.Flatten(), nn.Linear(out_features, 20,
                                                                                  dtype=torch.float64))


def _layer_and_its_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The registered layer of type ``name`` from its example (seeded), and a batch of its own input (float64)."""
    torch.manual_seed(0)
    block = EXAMPLES[name]()
    layer = next(m for m in block.modules() if type(m).__name__ == name)
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    block(torch.randn(5, 48, dtype=torch.float64))
    hook.remove()
    return layer, seen[0].detach()


def test_every_type_has_an_example():
    assert set(layer_types()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_summary_of_a_model_in_memory_is_what_inspect_prints_for_its_file(tmp_path, capsys, name):
    """torchtn.summary(model) gives, for every layer type, the tables `torchtn inspect` prints for the saved model —
    one code path (torchtn.summary.layer_tables) for both — headed by the model's class and parameter count."""
    from torchtn import summary

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]())
    text = summary(model)
    assert text.splitlines()[0] == f"Sequential with {sum(p.numel() for p in model.parameters()):,} parameters"
    path = save_model(model, tmp_path / "m.safetensors")
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    assert text.splitlines()[1:] == capsys.readouterr().out.splitlines()[1:]
    # the registered layer, at its place in the model ("1", or "1.<child>" inside the example's block)
    assert any(line.split()[0].split(".")[0] == "1" for line in text.splitlines()[3:] if line.strip())


def test_summary_of_a_bare_layer_and_of_a_model_without_tensor_networks():
    from torchtn import summary

    text = summary(MPOLinear(16, 16, 2))
    assert text.splitlines()[0] == "MPOLinear with 64 parameters"
    assert [line.split()[0] for line in text.splitlines()[3:6]] == ["(model)"] * 3  # three bonds
    assert summary(nn.Linear(3, 3)).splitlines() == ["Linear with 12 parameters", "no tensor-network layers"]
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        summary({})


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip_save_load_same_outputs(tmp_path, name):
    block = EXAMPLES[name]()  # a layer of this type, maybe inside a small block (48 features in, 20 out)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), block)
    path = save_model(model, tmp_path / "m.safetensors")
    skeleton = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]())
    for _, m in skeleton.named_modules():  # a skeleton of dense modules where the file has registered layers
        for child_name, child in list(m.named_children()):
            if isinstance(child, MPOLinear):
                setattr(m, child_name, nn.Linear(child.in_features, child.out_features, dtype=torch.float64))
            elif isinstance(child, MPOConv2d):
                setattr(m, child_name, child.to_conv())
            elif parametrize.is_parametrized(child):
                setattr(m, child_name, nn.Linear(child.in_features, child.out_features, dtype=torch.float64))
    load_model(path, skeleton)
    assert {type(m).__name__ for m in skeleton.modules()} == {type(m).__name__ for m in model.modules()}
    x = torch.randn(5, 48, dtype=torch.float64)
    assert torch.equal(skeleton(x), model(x))
    assert main(["inspect", str(path)]) == 0


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_compiles_as_one_graph(name):
    """torch.compile with fullgraph=True (any graph break is an error) gives the eager outputs and gradients, in
    training and in eval (where layers cache what they rebuild)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]())
    x = torch.randn(5, 48, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=1e-12)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model(x).square().sum().backward()
    assert len(grads) > 1
    for g, p in zip(grads, (p for p in model.parameters() if p.grad is not None)):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_compiles_as_one_graph_with_dynamic_shapes(name):
    """torch.compile(dynamic=True, fullgraph=True): the planners price symbolic sizes without a graph break (the
    convolution's choice of way broke the graph there, and Inductor then failed on the rest), for two batch sizes,
    in training and in eval."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for batch in (3, 7):
        x = torch.randn(batch, 48, dtype=torch.float64)
        model.train()
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-12)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_exports_and_tracing_leaves_its_caches_alone(name):
    """torch.export of the eval model (no gradients: where layers cache what they rebuild) gives the eager outputs,
    and the eager model still runs afterwards (a cache filled while tracing would hold fake tensors: the DCT matrix
    of a t-layer did, and ADTN's cache key read a fake tensor's data pointer). The program also decomposes to core
    ATen ops (``run_decompositions``: what ONNX export and lowering run first; it failed on the t-layers, whose
    kept-tensor blocks left empty grad-mode regions in the trace)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).eval()
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        fresh = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).eval()
        fresh.load_state_dict(model.state_dict())
        program = torch.export.export(fresh, (x,))
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(program.run_decompositions().module()(x), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_exports_with_a_dynamic_batch(name, training):
    """torch.export with the batch as a dynamic Dim — what AOTInductor and ExecuTorch deployments ask — gives one
    program for every batch size, equal to eager at another size (the planner's int(batch) specialized the MPO
    layers' graphs to the example's batch, which torch.export refuses for a dynamic dimension)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).train(training)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.set_grad_enabled(training):
        program = torch.export.export(model, (torch.randn(5, 48, dtype=torch.float64),),
                                      dynamic_shapes=({0: batch},))
        for rows in (3, 17):
            x = torch.randn(rows, 48, dtype=torch.float64)
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mapping", ["kernel", "matrix"])
def test_a_convolution_exports_with_dynamic_batch_height_and_width(mapping):
    """The convolution's planner prices its ways (rebuild, patches, four small convolutions) on the example's sizes
    without guarding on them: one program for every batch and image size."""
    torch.manual_seed(0)
    conv = MPOConv2d(6, 8, 3, padding=1, rank=3, mapping=mapping, dtype=torch.float64).eval()
    dims = {0: torch.export.Dim("batch", min=1, max=512), 2: torch.export.Dim("h", min=4, max=128),
            3: torch.export.Dim("w", min=4, max=128)}
    with torch.no_grad():
        program = torch.export.export(conv, (torch.randn(4, 6, 8, 8, dtype=torch.float64),), dynamic_shapes=(dims,))
        x = torch.randn(3, 6, 12, 20, dtype=torch.float64)
        torch.testing.assert_close(program.module()(x), conv(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_exports_to_onnx_and_onnxruntime_agrees(name):
    """torch.onnx.export(dynamo=True) with a dynamic batch, run by onnxruntime at two batch sizes, equals eager (in
    float32). (The TResidual example's DFT product runs in real arithmetic while traced: ONNX has no complex
    matmul, and its export failed.)"""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).float().eval()
    with torch.no_grad():
        program = torch.onnx.export(model, (torch.randn(5, 48),), dynamo=True, dynamic_shapes=({0: "batch"},),
                                    verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    for batch in (5, 3):
        x = torch.randn(batch, 48)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_under_activation_checkpointing_and_in_an_ema_model(name):
    """torch.utils.checkpoint (reentrant: its first forward runs without gradients, where layers cache; and not)
    gives the gradients of a plain pass; an AveragedModel (EMA) whose averages change in place between eval calls
    computes with its current parameters (caches follow them)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]())
    x = torch.randn(5, 48, dtype=torch.float64)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for reentrant in (True, False):
        model.zero_grad()
        checkpoint(model, x.clone().requires_grad_(), use_reentrant=reentrant).square().sum().backward()
        for n, p in model.named_parameters():
            if n in plain:
                torch.testing.assert_close(p.grad, plain[n], rtol=1e-12, atol=1e-12)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        with torch.no_grad():
            ema(x)  # caches filled with the averages of now
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.update_parameters(model)
    reference = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).eval()
    reference.load_state_dict(ema.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ema(x), reference(x), rtol=0, atol=1e-12)
        assert not torch.allclose(ema(x), model.eval()(x))  # (the averages are not the trained weights)


# the CPU everywhere; CUDA too where PyTorch sees a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if not n.endswith("Parametrization") and
                                       n != "MPOEmbedding"))  # (those take PyTorch's own layer's input / token ids)
def test_every_layer_type_refuses_an_input_of_another_dtype_or_no_dimensions_in_one_line(name):
    """A float32 layer given float64 or integer input (outside autocast), or a 0-d tensor, raises an error naming
    the dtypes or the shape — not a matmul's "expected m1 and m2 to have the same dtype" or an IndexError from inside
    the contraction; the same input in the layer's dtype runs."""
    layer, x = _layer_and_its_input(name)
    layer.float()
    assert layer(x.float()).dtype == torch.float32
    with pytest.raises(TypeError, match=r"input has dtype torch.float64, the layer's parameters torch.float32"):
        layer(x)
    with pytest.raises(TypeError, match=r"input has dtype torch.int64.*cast the input \(x.to\(torch.float32\)\)$"):
        layer(x.long())
    with pytest.raises(ValueError, match=r"shape \(\): expected"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_takes_an_empty_batch(name, device):
    """A batch of zero rows gives zero rows, as PyTorch's layers do (the planner priced an empty batch as a division
    by zero, the embedding's and the patch convolution's reshapes could not infer a size from zero elements)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).to(device)
    empty = torch.randn(0, 48, dtype=torch.float64, device=device)
    y = model(empty)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(empty).shape == (0, 20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_runs_in_bfloat16_and_under_autocast(name, device):
    """A bfloat16 model (``.to(torch.bfloat16)``) and a float32 one under autocast give outputs close to float64
    and bfloat16 gradients for every parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).to(device)
    x = torch.randn(5, 48, dtype=torch.float64, device=device)
    ref = model(x).detach()
    half = model.to(torch.bfloat16)
    y = half(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in half.parameters()
               if p.grad is not None)
    single = model.float()
    with torch.autocast(device, dtype=torch.bfloat16):
        z = single(x.float())
    for out in (y, z):
        err = (out.double() - ref).norm() / ref.norm()
        # (the embedding example draws its token ids from the first layer's bfloat16 outputs: other ids, other rows)
        assert name == "MPOEmbedding" or err < 0.05, err


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if not n.startswith("T")))
def test_a_computed_weight_refuses_assignment_and_a_write_into_it_never_goes_unnoticed(name):
    """Every layer whose weight is computed (MPO cores, ADTN gates; as a layer or a parametrization): assigning to
    ``weight`` names the layer and ``from_dense``; writing into a weight that was read (eval, kept between calls)
    raises at the next read — once; the read after that is right again; the layer's outputs never change (readers get
    a copy — a parametrization's, a new one at every read — so not even a write through ``.data`` reaches them)."""
    torch.manual_seed(0)
    model = EXAMPLES[name]().eval()
    holder = next(m for m in model.modules() if isinstance(m, ComputedWeight) or parametrize.is_parametrized(m))
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        truth = holder.weight.clone()
        if isinstance(holder, ComputedWeight):
            kind = type(holder).__name__
            with pytest.raises(AttributeError, match=rf"{kind}\.weight is read-only.*{kind}\.from_dense"):
                holder.weight = nn.Parameter(torch.zeros_like(truth))
        holder.weight.mul_(0)
        with pytest.raises(RuntimeError, match="changed in place after it was read"):
            holder.weight
        torch.testing.assert_close(holder.weight, truth, rtol=0, atol=0)  # once: the next read is right again
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        holder.weight.data.mul_(0)  # readers get a copy: even a write through .data stays there
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        if not isinstance(holder, ComputedWeight):  # a parametrization's readers get a new copy at every read
            torch.testing.assert_close(holder.weight, truth, rtol=0, atol=0)
        kept = holder.weight  # a copy its reader keeps is watched while the module reads on
        model(x)
        kept.add_(1)
        with pytest.raises(RuntimeError, match="changed in place after it was read"):
            holder.weight if isinstance(holder, ComputedWeight) else model(x)  # (a parametrized module reads it)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_densify_turns_every_layer_type_back_into_pytorchs_own(name):
    """densify (in place, here on a deep copy): each layer with a dense counterpart becomes it, each parametrized
    tensor a plain parameter — the same outputs, no torchtn module left; t-product layers, which have none, stay.
    The original still runs (a deep copy of a parametrized module shares PyTorch's generated class)."""
    import copy

    from torch.nn.utils import parametrize as torch_parametrize

    from torchtn.layers import densify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48, dtype=torch.float64), EXAMPLES[name]()).eval()
    x = torch.randn(5, 48, dtype=torch.float64)
    dense = copy.deepcopy(model)
    done = densify(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-10)
        assert model(x).shape == (5, 20)
    left = [type(m).__name__ for m in dense.modules() if type_name(m) is not None]
    if name.startswith("T"):
        assert not done and left == [name]
    else:
        assert [type(layer).__name__ for layer in done.values()] == [name] and not left
        assert not any(torch_parametrize.is_parametrized(m) for m in dense.modules())


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if not n.endswith("Parametrization")))
def test_a_model_that_is_itself_a_layer_is_densified_by_densify_model_and_refused_by_densify(name):
    """densify works in place, so it cannot replace the model itself: a registered layer given as the model is
    refused in one line (it was left as it was, silently); densify_model returns its dense counterpart (the same
    outputs) — or the layer itself where it has none (t-product layers)."""
    from torchtn.layers import densify, densify_model

    torch.manual_seed(0)
    layer = next(m for m in EXAMPLES[name]().modules() if type(m).__name__ == name)
    dense, done = densify_model(layer)
    if not hasattr(layer, "to_dense_module") or name.startswith("T"):
        assert dense is layer and done == {}
        assert densify(layer) == {}
        return
    assert type(dense).__module__.startswith("torch.nn") and done == {"": layer}
    w = dense.weight
    torch.testing.assert_close(w, layer.weight.detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=rf"the model is itself a {name}: take model.to_dense_module\(\)"):
        densify(layer)
    assert densify(layer, skip=lambda n, m: True) == {}


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if not n.endswith("Parametrization")))
def test_a_model_that_is_itself_a_layer_saves_loads_and_is_inspected(tmp_path, capsys, name):
    """save_model(layer): the file records the model itself as the layer (it recorded no layer: inspect said "no
    tensor-network layers" and a dense skeleton could not take the file); load_model returns the layer, with the
    skeleton's dtype, and the same outputs."""
    from torchtn.layers import densify_model

    layer, x = _layer_and_its_input(name)
    path = save_model(layer, tmp_path / "layer.safetensors")
    skeleton = densify_model(layer)[0]
    # a dense skeleton where the layer has a counterpart; else any module: it gives the device and dtype only
    skeleton = nn.Linear(1, 1, dtype=torch.float64) if skeleton is layer else skeleton.to(torch.float64)
    loaded = load_model(path, skeleton)
    assert type(loaded) is type(layer) and loaded is not layer
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    assert "(model)" in capsys.readouterr().out
    from torchtn.io import ModelFileError

    with pytest.raises(ModelFileError, match=rf"a single {name} layer, but the given model is a Sequential holding"):
        load_model(path, nn.Sequential(skeleton))
    blank = _layer_and_its_input(name)[0]  # a layer of the same type as the skeleton (it holds submodules too)
    with torch.no_grad():
        for p in blank.parameters():
            p.zero_()
    torch.testing.assert_close(load_model(path, blank)(x), layer(x), rtol=0, atol=0)


def test_a_file_recording_the_model_as_a_layer_and_layers_inside_it_is_refused(tmp_path):
    from safetensors.torch import save_file

    from torchtn.io import ModelFileError

    model = nn.Sequential(MPOLinear(16, 16, 2))
    path = save_model(model, tmp_path / "m.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["layers"][""] = meta["layers"]["0"]
    lying = tmp_path / "lying.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, lying, metadata={"torchtn": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="records the model itself as a MPOLinear layer and 1 more layer"):
        load_model(lying, nn.Sequential(nn.Linear(16, 16)))


def test_checking_a_file_builds_its_layers_without_making_values(tmp_path):
    """Files' layers are first built on the meta device to check their shapes; initializing them there (PyTorch's
    meta randn, a product with a scalar) imports sympy and the compiler stack, ~1 s of every cold load or inspect.
    Read every type's file in a fresh process, save and load a model, and check that none of that was imported."""
    import subprocess
    import sys

    paths = [str(save_model(nn.Sequential(nn.Linear(48, 48), EXAMPLES[name]()), tmp_path / f"{name}.safetensors"))
             for name in sorted(EXAMPLES)]
    code = ("import sys, torchtn\n"
            f"for path in {paths!r}:\n    torchtn.io.load_layers(path)\n"
            # (save_model / load_model look for a torch.compile wrapper without importing torch._dynamo for it)
            f"path = torchtn.save_model(torchtn.MPOLinear(16, 16, 2), {str(tmp_path / 'r.safetensors')!r})\n"
            "torchtn.load_model(path, torchtn.MPOLinear(16, 16, 2))\n"
            "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_layer_type_and_disagreeing_tensors_give_clear_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    model = nn.Sequential(MPOLinear(16, 16, 2))
    path = save_model(model, tmp_path / "m.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}

    meta["layers"]["0"]["type"] = "QuantumLinear"
    bad = tmp_path / "unknown.safetensors"
    save_file(tensors, bad, metadata={"torchtn": json.dumps(meta)})
    with pytest.raises(ValueError, match="layer type 'QuantumLinear' \\(at '0'\\) is not a registered torchtn layer"):
        load_model(bad, nn.Sequential(nn.Linear(16, 16)))
    assert main(["inspect", str(bad)]) == 2
    assert "QuantumLinear" in capsys.readouterr().err

    meta["layers"]["0"]["type"] = "MPOLinear"
    assert model[0].ranks == (1, 2, 2, 2, 1)
    meta["layers"]["0"]["spec"]["ranks"] = [1, 2, 3, 2, 1]  # valid ranks, but not those of the tensors
    lying = tmp_path / "lying.safetensors"
    save_file(tensors, lying, metadata={"torchtn": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"tensor '0.cores.1' has shape \(2, 2, 2, 2\) but .* needs \(2, 2, 2, 3\)"):
        load_model(lying, nn.Sequential(nn.Linear(16, 16)))
    assert main(["inspect", str(lying)]) == 2
    assert "disagree with their recorded layout" in capsys.readouterr().err


def test_files_of_torchtn_0_1_still_load(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(MPOLinear(16, 16, 2))
    old_meta = {"format": "torchtn-model/1", "mpo_layers": {"0": {"in_shape": [2, 2, 2, 2], "out_shape": [2, 2, 2, 2],
                                                                  "ranks": list(model[0].ranks), "bias": True}}}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"torchtn": json.dumps(old_meta)})
    assert model[0].in_shape == (2, 2, 2, 2)
    skeleton = load_model(path, nn.Sequential(nn.Linear(16, 16)))
    x = torch.randn(3, 16)
    assert torch.equal(skeleton(x), model(x))


class Scale(nn.Module):
    """A dense module of a toy kind: y = x Wᵀ (no bias)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        return x @ self.w.T


def test_a_new_layer_type_is_one_registration(tmp_path, capsys):
    """Register a new TT layer: save, load, tensorize and inspect all work without editing any torchtn module."""

    @register_layer("ToyTT", converts=(Scale,))
    class ToyTT(TTLayer):
        def __init__(self, cores):
            super().__init__()
            from torchtn.core import TTMatrix

            self._init_cores(TTMatrix(cores))

        def forward(self, x):
            return self.tt.linear(x)

        def layout(self):
            return {"out_shape": list(self.tt.out_shape), "in_shape": list(self.tt.in_shape), "ranks": list(self.ranks)}

        @classmethod
        def from_layout(cls, spec, *, device=None, dtype=None):
            r = spec["ranks"]
            return cls([torch.zeros(r[k], m, n, r[k + 1], device=device, dtype=dtype)
                        for k, (m, n) in enumerate(zip(spec["out_shape"], spec["in_shape"]))])

        @staticmethod
        def dense_matrix(module):
            return module.w.detach()

        @staticmethod
        def tt_shapes_for(module, in_shape=None, out_shape=None):
            return (in_shape or (4, 4)), (out_shape or (4, 4))

        @classmethod
        def from_tt(cls, module, tt):
            return cls(tt.cores)

    try:
        torch.manual_seed(0)
        model = nn.Sequential(Scale(16), nn.ReLU(), nn.Linear(16, 4))
        new, report = tensorize(model, rank=16, allow_larger=True)  # full rank: exact
        assert isinstance(new[0], ToyTT) and isinstance(new[2], MPOLinear)
        assert [r.layer_type for r in report.layers] == ["ToyTT", "MPOLinear"]
        x = torch.randn(3, 16)
        assert torch.allclose(new(x), model(x), atol=1e-5)
        path = save_model(new, tmp_path / "toy.safetensors")
        skeleton = load_model(path, nn.Sequential(Scale(16), nn.ReLU(), nn.Linear(16, 4)))
        assert isinstance(skeleton[0], ToyTT) and torch.equal(skeleton(x), new(x))
        assert main(["inspect", str(path)]) == 0
        assert "ToyTT" in capsys.readouterr().out
        # a name or a dense type another class holds is not taken over silently (files, tensorize would change)
        with pytest.raises(ValueError, match=r"cannot register Other: the name 'MPOLinear' \(MPOLinear\) and "
                                             r"Linear \(converted to MPOLinear\) taken already; pass replace=True"):
            register_layer("MPOLinear", converts=(nn.Linear,))(type("Other", (ToyTT,), {}))
        assert registry_module.layer_type("MPOLinear") is MPOLinear
        assert registry_module.converter_for(nn.Linear(2, 2)) is MPOLinear
        register_layer("ToyTT", converts=(Scale,))(ToyTT)  # the same class again: nothing taken over
    finally:
        registry_module._TYPES.pop("ToyTT", None)
        registry_module._CONVERTS.pop(Scale, None)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_built_on_meta_is_made_whole_by_reset_parameters(name):
    """PyTorch's deferred initialization: build on the meta device, ``to_empty`` (memory, no values), then
    ``reset_parameters()`` on every module. Every parameter and buffer must then hold what the same reset gives a
    layer built normally (nothing left uninitialized), and the outputs must be finite."""
    def reset_all(model: nn.Module, seed: int) -> None:
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    torch.manual_seed(0)
    normal = EXAMPLES[name]()
    if name == "MPOParametrization":  # the TT-SVD of the tensor it holds: there are no values on meta to decompose
        with torch.device("meta"), pytest.raises(ValueError, match="meta device .*TT-SVD needs the weights"):
            EXAMPLES[name]()
        return
    with torch.device("meta"):
        deferred = EXAMPLES[name]()
    assert all(p.is_meta for p in deferred.parameters())
    deferred = deferred.to_empty(device="cpu")
    reset_all(normal, 1)
    reset_all(deferred, 1)
    for (key, a), b in zip(normal.state_dict().items(), deferred.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name}: {key} not reset")
    x = torch.randn(5, 48, dtype=torch.float64)
    assert torch.isfinite(deferred(x)).all()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks recorded as constants, as for any layer
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")  # deprecated in torch 2.13, still used
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_can_be_traced_by_torch_jit(name):
    """``torch.jit.trace`` records one graph and checks it against a second run (in another grad mode): the layers'
    caches and grad-mode-dependent plans made that check fail ("Graphs differed across invocations"). Traced, each
    layer gives the eager outputs on new inputs and the eager gradients."""
    torch.manual_seed(0)
    model = EXAMPLES[name]().eval()
    x = torch.randn(5, 48, dtype=torch.float64)
    traced = torch.jit.trace(model, x)
    other = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), model(other), rtol=1e-10, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    eager = torch.autograd.grad(model(other).square().sum(), params, allow_unused=True)
    mine = torch.autograd.grad(traced(other).square().sum(), params, allow_unused=True)
    for a, b in zip(eager, mine):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_runs_under_torch_func_transforms(name):
    """``torch.func``: an ensemble of stacked models run by ``vmap`` over ``functional_call`` (their caches keyed on
    storage and the ADTN's custom autograd Function failed under it), and per-example gradients by
    ``vmap(grad(...))`` — each equal to running the models / examples one by one."""
    import copy

    from torch.func import functional_call, grad, stack_module_state, vmap

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(EXAMPLES[name]().eval())
    x = torch.randn(4, 48, dtype=torch.float64)
    if not name.endswith("Parametrization"):  # (torch.nn.utils.parametrize makes a class per instance: no stacking)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        out = vmap(lambda p, b, inp: functional_call(base, (p, b), (inp,)), in_dims=(0, 0, None))(params, buffers, x)
        with torch.no_grad():
            torch.testing.assert_close(out, torch.stack([m(x) for m in models]), rtol=1e-10, atol=1e-12)
    model = models[0]
    own = {k: v.detach() for k, v in model.named_parameters()}
    frozen = {k: v for k, v in model.named_buffers()}

    def loss(p, inp):
        return functional_call(model, (p, frozen), (inp[None],)).square().sum()

    per_example = vmap(grad(loss), in_dims=(None, 0))(own, x)
    for i in range(len(x)):
        one = torch.autograd.grad(model(x[i:i + 1]).square().sum(), list(model.parameters()), allow_unused=True)
        for (key, batched), g in zip(per_example.items(), one):
            torch.testing.assert_close(batched[i], torch.zeros_like(batched[i]) if g is None else g, rtol=1e-9,
                                       atol=1e-12, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_layer_type_serves_inference_mode_and_later_calls_alike(name):
    """``torch.inference_mode()`` — PyTorch's fastest inference — filled the layers' caches with inference tensors,
    which have no version counter to key a cache on and cannot be saved for backward: every later call outside it
    failed (an input gradient in eval, a training step). Kept tensors are now normal tensors, made without history."""
    torch.manual_seed(0)
    model = EXAMPLES[name]().eval()
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.inference_mode():
        first = model(x)
        assert torch.equal(model(x), first)  # and a second call inside, from the caches
    with torch.no_grad():
        torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    for p in model.parameters():
        p.requires_grad_(False)
    probe = x.clone().requires_grad_(True)  # an input gradient from the frozen model in eval (a saliency map)
    out = model(probe)
    torch.testing.assert_close(out.detach(), first, rtol=1e-12, atol=1e-12)
    if out.requires_grad:  # (the embedding example's ids do not depend on the input)
        out.square().sum().backward()
        assert probe.grad is not None and torch.isfinite(probe.grad).all()
    model.train().requires_grad_(True)
    model(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.numel())
    with torch.inference_mode():
        assert torch.isfinite(model.eval()(x)).all()


def test_a_pruned_models_file_loads_into_a_plain_model_as_the_weights_it_computed_with(tmp_path):
    """save_model of a model with a pruned nn.Linear (weight_orig + weight_mask) loads into the unpruned skeleton
    (it did not fit), and into a skeleton pruned the same way as it was."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear(48, 20, 3), nn.ReLU(), nn.Linear(20, 5))
    prune.l1_unstructured(model[2], "weight", amount=0.4)
    x = torch.randn(4, 48)
    path = save_model(model, tmp_path / "pruned.safetensors")
    plain = load_model(path, nn.Sequential(nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 5)))
    assert torch.equal(plain[2].weight, model[2].weight) and "2.weight_mask" not in plain.state_dict()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    same = nn.Sequential(nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 5))
    prune.random_unstructured(same[2], "weight", amount=0.4)
    same = load_model(path, same)
    assert torch.equal(same[2].weight_mask, model[2].weight_mask)
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
