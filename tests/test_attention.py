"""Tensor Attention and its baselines: the forms agree with each other and with the definitions, written out here
independently of the library (explicit sums over tokens)."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchtn
from torchtn.core.attention import (
    chunk_summaries,
    combine_summaries,
    linear_attention,
    plan_attention,
    softmax_attention,
    softmax_attention_step,
    tensor_attention,
)
from torchtn.core.contraction import set_autotune, strategy_names
from torchtn.models import SequenceClassifier, TokenPredictor

f64 = torch.float64


def qkv(seed: int, lead=(2, 3), n=29, d=5, e=4, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*lead, n, d, generator=g, dtype=f64),
            scale * torch.randn(*lead, n, d, generator=g, dtype=f64),
            torch.randn(*lead, n, e, generator=g, dtype=f64))


def definition(q, k, v, masked=True, normalize=False, decay=None, ridge=0.0, eps=1e-6):
    """Row by row from the sums: o_t = Σ_{i, j ≤ t (i ≤ j if masked)} γ^{(t−i)+(t−j)} (q_t·k_i)(k_i·q_j) v_j
    (+ λ Σ_{j≤t} γ^{t−j} (q_t·q_j) v_j), over the last two dims."""
    n = q.shape[-2]
    g = 1.0 if decay is None else decay
    out = torch.zeros(*q.shape[:-1], v.shape[-1] + 1, dtype=q.dtype)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    for t in range(n):
        acc = 0
        for j in range(t + 1):
            w = sum(g ** ((t - i) + (t - j)) * (q[..., t, :] * k[..., i, :]).sum(-1) * (k[..., i, :] * q[..., j, :]).sum(-1)
                    for i in range(0, (j if masked else t) + 1))
            w = w + ridge * g ** (t - j) * (q[..., t, :] * q[..., j, :]).sum(-1)
            acc = acc + w[..., None] * v1[..., j, :]
        out[..., t, :] = acc
    num, den = out[..., :-1], out[..., -1:]
    return num / (den + eps) if normalize else num


OPTIONS = [dict(masked=m, normalize=z, decay=g, ridge=r)
           for m, z, g, r in itertools.product([True, False], [False, True], [None, 0.85], [0.0, 0.4])]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_parallel_recurrent_and_chunked_forms_equal_the_definition(opts):
    q, k, v = qkv(1, lead=(2,), n=13, d=4, e=3)
    ref = definition(q, k, v, **opts)
    tol = 1e-10 if not opts["normalize"] else 1e-8  # a ratio: its error is the sums' error over the denominator
    scale = ref.abs().max()
    for form, chunk in [("parallel", None), ("recurrent", None), ("chunked", 1), ("chunked", 4), ("chunked", 5),
                        ("chunked", 13), ("chunked", 64), ("auto", None)]:
        out = tensor_attention(q, k, v, form=form, chunk_size=chunk, **opts)
        assert (out - ref).abs().max() <= tol * max(1.0, scale), (form, chunk)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 70), d=st.integers(1, 9), e=st.integers(1, 6),
       chunk=st.integers(1, 40), masked=st.booleans(), decay=st.sampled_from([None, 0.7, 0.97]))
def test_forms_agree_to_1e_10_on_drawn_inputs(seed, n, d, e, chunk, masked, decay):
    q, k, v = qkv(seed, lead=(2,), n=n, d=d, e=e, scale=1.0 / d**0.5)
    par = tensor_attention(q, k, v, form="parallel", masked=masked, decay=decay)
    rec = tensor_attention(q, k, v, form="recurrent", masked=masked, decay=decay)
    chk = tensor_attention(q, k, v, form="chunked", chunk_size=chunk, masked=masked, decay=decay)
    scale = max(1.0, par.abs().max().item())
    assert (rec - par).abs().max() <= 1e-10 * scale
    assert (chk - par).abs().max() <= 1e-10 * scale


def test_masked_form_is_the_lower_triangular_matrix_product():
    q, k, v = qkv(2, lead=(), n=17)
    L = torch.tril(torch.ones(17, 17, dtype=f64))
    A = L * (q @ k.T)
    torch.testing.assert_close(tensor_attention(q, k, v, form="chunked", chunk_size=6), ((A @ A.T) * L) @ v,
                               rtol=0, atol=1e-12)


def test_bidirectional_form():
    q, k, v = qkv(3, lead=(2,), n=11)
    ref = q @ (k.transpose(-1, -2) @ k) @ (q.transpose(-1, -2) @ v)
    torch.testing.assert_close(tensor_attention(q, k, v, causal=False), ref, rtol=0, atol=1e-12)


def test_normalized_form_with_identity_metric_is_linear_attention():
    # k ≡ 0 and ridge 1 make S_t ≡ I (and G, h ≡ 0): o_t = Σ_j (q_t·q_j) v_j / Σ_j q_t·q_j
    q, _, v = qkv(4, lead=(2,), n=15)
    q = q.abs() + 0.1  # positive features keep the denominator away from 0
    out = tensor_attention(q, torch.zeros_like(q), v, normalize=True, ridge=1.0, eps=1e-12)
    torch.testing.assert_close(out, linear_attention(q, q, v, normalize=True, eps=1e-12), rtol=1e-10, atol=1e-12)


def test_state_size_does_not_grow_with_the_sequence():
    sizes = set()
    for n in (8, 64, 512):
        q, k, v = qkv(5, lead=(1, 2), n=n, d=6, e=5)
        _, state = tensor_attention(q, k, v, return_state=True)
        sizes.add(state.numel())
    assert sizes == {2 * (6 * 6 + 2 * 6 * 5 + 2 * 6)}
    _, cache = softmax_attention(*qkv(5, lead=(1, 2), n=64, d=6, e=5), return_state=True)
    assert cache.numel() == 2 * 64 * (6 + 5)  # the KV cache does grow


def test_chunk_summaries_combine_associatively():
    q, k, v = qkv(6, lead=(2,), n=24)
    for decay in (None, 0.9):
        parts = [chunk_summaries(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], decay) for a, b in
                 [(0, 7), (7, 15), (15, 24)]]
        whole = chunk_summaries(q, k, v, decay)
        left = combine_summaries(combine_summaries(parts[0], parts[1], decay), parts[2], decay)
        right = combine_summaries(parts[0], combine_summaries(parts[1], parts[2], decay), decay)
        for name in ("S", "C", "m", "G", "h"):
            torch.testing.assert_close(getattr(left, name), getattr(whole, name), rtol=0, atol=1e-12)
            torch.testing.assert_close(getattr(right, name), getattr(whole, name), rtol=0, atol=1e-12)
        # and the summaries are the state the token loop reaches
        _, state = tensor_attention(q, k, v, form="recurrent", decay=decay, return_state=True)
        torch.testing.assert_close(state.G, whole.G, rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_gradcheck(form):
    q, k, v = (t.requires_grad_() for t in qkv(7, lead=(1,), n=7, d=3, e=2))
    assert torch.autograd.gradcheck(
        lambda a, b, c: tensor_attention(a, b, c, form=form, chunk_size=3, normalize=True, decay=0.9), (q, k, v))


@pytest.mark.parametrize("attention", ["tensor", "linear", "softmax"])
def test_no_output_depends_on_a_later_token(attention):
    torch.manual_seed(0)
    net = torchtn.DeepTensorNetwork(16, 2, 4, attention=attention).double().eval()
    x = torch.randn(2, 20, 16, dtype=f64)
    y = net(x)
    for t in (0, 9, 19):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 16, dtype=f64)
        y2 = net(x2)
        assert torch.equal(y2[:, :t], y[:, :t])
        assert (y2[:, t:] - y[:, t:]).abs().max() > 1e-6  # and the perturbation does reach the later ones


@pytest.mark.parametrize("attention", ["tensor", "linear", "softmax"])
@pytest.mark.parametrize("mode", ["bilinear", "summary"])
def test_step_by_step_decoding_equals_the_whole_sequence(attention, mode):
    torch.manual_seed(1)
    net = torchtn.DeepTensorNetwork(12, 2, 3, attention=attention, interaction_mode=mode,
                                    **({"decay": 0.9} if attention != "softmax" else {})).double().eval()
    x = torch.randn(2, 17, 12, dtype=f64)
    state, ys = None, []
    for t in range(17):
        y_t, state = net.step(x[:, t], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), net(x), rtol=0, atol=1e-12)


def test_prefill_then_step_continues_the_sequence():
    torch.manual_seed(2)
    layer = torchtn.TensorAttention(12, 3, decay=0.95).double()
    x = torch.randn(2, 30, 12, dtype=f64)
    y, state = layer.prefill(x[:, :21])
    for t in range(21, 30):
        y_t, state = layer.step(x[:, t], state)
        torch.testing.assert_close(y_t, layer(x[:, :t + 1])[:, t], rtol=0, atol=1e-12)
    assert state.length == 30


@pytest.mark.parametrize("name", ["TensorAttention", "LinearAttention", "SoftmaxAttention"])
@pytest.mark.parametrize("causal", [True, False])
def test_an_empty_sequence_gives_an_empty_output_and_an_empty_prompt_the_fresh_state(name, causal):
    torch.manual_seed(3)
    layer = getattr(torchtn, name)(12, 3, causal=causal).double()
    x = torch.randn(2, 0, 12, dtype=f64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (2, 0, 12) and x.grad.shape == (2, 0, 12)
    if causal:  # decoding after an empty prompt is decoding from the start
        t = torch.randn(2, 12, dtype=f64)
        _, state = layer.prefill(x)
        torch.testing.assert_close(layer.step(t, state)[0], layer.step(t)[0], rtol=0, atol=0)
        torch.testing.assert_close(layer.step(t, state)[0], layer(t[:, None])[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["TensorAttention", "LinearAttention", "SoftmaxAttention"])
def test_step_refuses_a_state_it_did_not_make(name):
    """A state of another batch size broadcast silently into outputs of that size; another layer's state or a
    stray object failed deep inside."""
    torch.manual_seed(4)
    layer = getattr(torchtn, name)(12, 3).double()
    x = torch.randn(2, 5, 12, dtype=f64)
    _, state = layer.prefill(x)
    with pytest.raises(ValueError, match=r"state\.\w+ is torch.float64 \(2, 3, .*needs torch.float64 \(1, 3, "):
        layer.step(x[:1, 0], state)
    other = "LinearAttention" if name != "LinearAttention" else "TensorAttention"
    for bad in (getattr(torchtn, other)(12, 3).double().prefill(x)[1], {"S": 0}):
        with pytest.raises(TypeError, match=rf"state is a {type(bad).__name__}: expected None .* or the {name}State"):
            layer.step(x[:, 0], bad)
    net = torchtn.DeepTensorNetwork(12, 2, 3, attention=name[:-len("Attention")].lower()).double()
    _, states = net.step(x[:, 0])
    with pytest.raises(TypeError, match=r"state is a list of 1: expected None .* list of 2 per-block states"):
        net.step(x[:, 1], states[:1])  # (zip ran the first block only)
    wider = getattr(torchtn, name)(24, 3).double().prefill(torch.randn(2, 5, 24, dtype=f64))[1]  # head size 8 ≠ 4
    with pytest.raises(ValueError, match="start a new sequence with state=None"):
        layer.step(x[:, 0], wider)


def test_softmax_kv_cache_step():
    q, k, v = qkv(8, lead=(2,), n=9)
    state, outs = None, []
    for t in range(9):
        o, state = softmax_attention_step(q[..., t, :], k[..., t, :], v[..., t, :], state)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, -2), softmax_attention(q, k, v), rtol=0, atol=1e-12)


def test_tensor_interaction_equals_the_dense_bilinear_map():
    torch.manual_seed(3)
    layer = torchtn.TensorInteraction(5, rank=7, bias=False).double()
    x = torch.randn(4, 6, 5, dtype=f64)
    dense = torch.einsum("oab,...a,...b->...o", layer.bilinear_weight(), x, x)
    torch.testing.assert_close(layer(x), dense, rtol=0, atol=1e-12)
    # the summary reading: y_t = P((1/t) Σ_{i≤t} u_i (w_i·u_t))
    s = torchtn.TensorInteraction(5, rank=3, mode="summary").double()
    u, w = s.U(x), s.V(x)
    ref = torch.stack([s.P(sum(u[:, i] * (w[:, i] * u[:, t]).sum(-1, keepdim=True) for i in range(t + 1)) / (t + 1))
                       for t in range(6)], 1)
    torch.testing.assert_close(s(x), ref, rtol=0, atol=1e-12)


def test_planner_registers_the_attention_forms_and_autotunes_them():
    assert set(strategy_names("attention")) == {"auto", "chunked", "recurrent", "parallel"}
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    plan = plan_attention("tensor", q, v)
    assert plan.form == "chunked" and 1 <= plan.chunk <= 300
    set_autotune(True)
    try:
        tuned = plan_attention("tensor", q, v, force="chunked")
    finally:
        set_autotune(None)
    assert tuned.measured_seconds == min(t for _, t in tuned.measurements)
    assert tuned.measured_seconds <= tuned.model_pick_seconds
    with pytest.raises(ValueError, match="form='fast' is not allowed"):
        tensor_attention(q, k, v, form="fast")


@pytest.mark.parametrize("bad, match", [
    (dict(decay=1.5), "decay=1.5 is not allowed"),
    (dict(decay=0.9, causal=False), "needs causal=True"),
    (dict(ridge=-1.0), "ridge=-1.0 is not allowed"),
    (dict(chunk_size=0, form="chunked"), "chunk_size=0 is not allowed"),
])
def test_bad_options_name_the_argument(bad, match):
    q, k, v = qkv(9, lead=(1,), n=5)
    with pytest.raises(ValueError, match=match):
        tensor_attention(q, k, v, **bad)


def test_modules_check_their_inputs_and_options():
    with pytest.raises(ValueError, match="heads=3 is not allowed"):
        torchtn.TensorAttention(16, 3)
    with pytest.raises(ValueError, match="form='loop' is not allowed"):
        torchtn.TensorAttention(16, 4, form="loop")
    with pytest.raises(ValueError, match=r"expected \(batch, n, dim\) with dim=16"):
        torchtn.LinearAttention(16, 4)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="step\\(\\) needs causal=True"):
        torchtn.SoftmaxAttention(16, 4, causal=False).step(torch.randn(2, 16))
    with pytest.raises(ValueError, match="attention='flash' is not allowed"):
        torchtn.DeepTensorNetwork(16, 1, attention="flash")
    with pytest.raises(ValueError, match="max_len=8"):
        TokenPredictor(10, 16, 1, 4, max_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_sequence_models_learn_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(8, 3, dim=16, depth=1, heads=2)
    x = torch.randn(4, 8, 8)
    assert model(x).shape == (4, 3) and model(x.unsqueeze(1)).shape == (4, 3)
    torchtn.save_model(model, tmp_path / "m.safetensors")
    again = torchtn.load_model(tmp_path / "m.safetensors", SequenceClassifier(8, 3, dim=16, depth=1, heads=2))
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: torchtn.TensorAttention(16, heads=2),
                                  lambda: torchtn.LinearAttention(16, heads=2),
                                  lambda: torchtn.SoftmaxAttention(16, heads=2),
                                  lambda: torchtn.TensorAttention(16, heads=2, normalize=True, decay=0.9, ridge=0.1),
                                  lambda: torchtn.DeepTensorNetwork(16, depth=2, heads=2)])
@pytest.mark.parametrize("training", [False, True])
def test_the_token_mixers_export_with_a_dynamic_batch(make, training):
    """torch.export with the batch as a dynamic Dim: one program for every batch size (the attention planner hashed
    the symbolic batch into its plan key and failed: "unhashable type: non-nested SymInt"). The sequence length is
    fixed in such a program (the chunked form's reshapes specialize it)."""
    torch.manual_seed(0)
    model = make().double().train(training)
    with torch.set_grad_enabled(training):
        program = torch.export.export(model, (torch.randn(3, 12, 16, dtype=torch.float64),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},))
        for rows in (1, 7):
            x = torch.randn(rows, 12, 16, dtype=torch.float64)
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-12)
