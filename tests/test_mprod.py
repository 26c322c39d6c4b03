"""The ⋆M product and t-layers against independent computations: scipy's DCT, numpy's FFT, explicit loops."""
import re

import numpy as np
import pytest
import scipy.fft
import torch

import torchtn
from torchtn.core.mprod import dct_matrix, mprod, mtran, t_eye, t_svd, t_svd_truncate, transform
from torchtn.layers.tlayers import TAntisymmetric, THamiltonian, TLinear, TResidual
from torchtn.models.tnn import (
    TNN,
    HamiltonianTNN,
    MatrixNet,
    TAutoencoder,
    matrix_baseline,
    t_cross_entropy,
    tubal_scores,
)

f64 = torch.float64
TRANSFORMS = ["dct", "dft", "identity", "orthogonal", "user"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def M_of(name, n):
    return rand(n, n, seed=99) + 3 * torch.eye(n, dtype=f64) if name == "user" else name


def reference_mprod(A, B, M):
    """Numpy: transform every tube with the matrix M (or FFT), multiply slice by slice in a loop, transform back."""
    a, b = A.numpy(), B.numpy()
    if isinstance(M, np.ndarray):
        ah, bh = a @ M.T, b @ M.T
    else:  # "dft"
        ah, bh = np.fft.fft(a, axis=-1), np.fft.fft(b, axis=-1)
    ch = np.stack([ah[:, :, k] @ bh[:, :, k] for k in range(a.shape[-1])], axis=-1)
    if isinstance(M, np.ndarray):
        return np.linalg.solve(M, ch.reshape(-1, M.shape[0]).T).T.reshape(ch.shape)
    return np.fft.ifft(ch, axis=-1).real


@pytest.mark.parametrize("n", [6, 520])  # matrix DCT and the FFT-based one
def test_dct_is_scipys_orthonormal_dct_ii(n):
    x = rand(4, n)
    ref = torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))
    T = transform("dct", n)
    torch.testing.assert_close(T.forward(x), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.inverse(T.forward(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct_matrix(n) @ dct_matrix(n).T, torch.eye(n, dtype=f64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dct", "dft", "user", "dct520"])
def test_mprod_agrees_with_an_independent_computation(name):
    n = 520 if name == "dct520" else 7
    A, B = rand(4, 3, n, seed=1), rand(3, 5, n, seed=2)
    if name == "dft":
        ref = reference_mprod(A, B, "dft")
        M = "dft"
    elif name == "user":
        M = M_of("user", n)
        ref = reference_mprod(A, B, M.numpy())
    else:
        ref = reference_mprod(A, B, scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0))
        M = "dct"
    torch.testing.assert_close(mprod(A, B, M), torch.from_numpy(ref), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_algebra_associativity_identity_and_mimetic_transpose(name):
    n = 6
    M = M_of(name, n)
    A, B, C = rand(4, 3, n, seed=3), rand(3, 5, n, seed=4), rand(5, 2, n, seed=5)
    torch.testing.assert_close(mprod(mprod(A, B, M), C, M), mprod(A, mprod(B, C, M), M), rtol=0, atol=1e-10)
    torch.testing.assert_close(mprod(t_eye(4, M, n), A, M), A, rtol=0, atol=1e-10)
    torch.testing.assert_close(mprod(A, t_eye(3, M, n), M), A, rtol=0, atol=1e-10)
    torch.testing.assert_close(mtran(mprod(A, B, M), M), mprod(mtran(B, M), mtran(A, M), M), rtol=0, atol=1e-10)


def test_identity_transform_is_facewise_products():
    A, B = rand(4, 3, 5), rand(3, 2, 5, seed=1)
    ref = torch.stack([A[:, :, k] @ B[:, :, k] for k in range(5)], dim=-1)
    torch.testing.assert_close(mprod(A, B, "identity"), ref, rtol=0, atol=1e-12)


def test_dft_product_is_circular_convolution_of_tubes():
    A, B = rand(2, 3, 9, seed=6), rand(3, 4, 9, seed=7)
    ref = torch.zeros(2, 4, 9, dtype=f64)
    for i in range(2):
        for j in range(4):
            for s in range(3):
                for k in range(9):
                    ref[i, j, k] += sum(A[i, s, q] * B[s, j, (k - q) % 9] for q in range(9))
    torch.testing.assert_close(mprod(A, B, "dft"), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["dct", "dft", "orthogonal"])
def test_t_svd_reconstructs_and_its_truncation_is_optimal(name):
    A = rand(6, 5, 8, seed=8)
    U, S, V = t_svd(A, name)
    torch.testing.assert_close(mprod(mprod(U, S, name), mtran(V, name), name), A, rtol=0, atol=1e-10)
    for k in (1, 2, 4):
        Ak = t_svd_truncate(A, k, name)
        err = torch.linalg.norm(A - Ak)
        # Eckart–Young: no other tensor of tubal rank ≤ k does better; try products X ⋆ Y of random k-wide factors
        # fitted by least squares in the transform domain, and the truncation of a perturbed A
        for seed in range(5):
            other = t_svd_truncate(A + 0.3 * rand(6, 5, 8, seed=seed + 20), k, name)
            assert err <= torch.linalg.norm(A - other) + 1e-12
        # and the error is the discarded singular values' (orthonormal transforms preserve the norm)
        T = transform(name, 8)
        s = torch.linalg.svdvals(T.forward(A).movedim(-1, 0))
        scale = 8 if name == "dft" else 1  # the unnormalized DFT scales squared norms by n
        torch.testing.assert_close(err**2, (s[:, k:] ** 2).sum() / scale, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,n", [("dct", 6), ("dct", 520), ("dft", 7), ("user", 6), ("identity", 5)])
def test_complex_operands_keep_their_imaginary_parts(name, n):
    """Complex tensors: ⋆M is linear over the complex numbers, so A ⋆ B splits into the real and imaginary parts'
    four real products; the t-SVD reconstructs a complex tensor (the DFT's inverse must not drop the imaginary part)."""
    M = M_of(name, n)
    Ar, Ai, Br, Bi = rand(3, 4, n, seed=1), rand(3, 4, n, seed=2), rand(4, 2, n, seed=3), rand(4, 2, n, seed=4)
    A, B = torch.complex(Ar, Ai), torch.complex(Br, Bi)
    ref = torch.complex(mprod(Ar, Br, M) - mprod(Ai, Bi, M), mprod(Ar, Bi, M) + mprod(Ai, Br, M))
    out = mprod(A, B, M)
    assert out.dtype == torch.complex128
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    U, S, V = t_svd(A, M)
    torch.testing.assert_close(mprod(mprod(U, S, M), mtran(V, M), M), A, rtol=0, atol=1e-9)
    torch.testing.assert_close(t_svd_truncate(A, 3, M), A, rtol=0, atol=1e-9)  # full tubal rank: exact


def test_operands_must_be_floating_point_and_mixed_precisions_promote():
    A, B = rand(3, 4, 5), rand(4, 2, 5, seed=1)
    for f in (lambda: mprod(A.long(), B.long()), lambda: mtran(A.int()), lambda: t_svd(A.long())):
        with pytest.raises(TypeError, match="dtype torch.int.*floating-point or complex"):
            f()  # (a DCT cast to integers is zeros: before, a silent all-zero result)
    out = mprod(A, B.float())
    assert out.dtype == f64
    torch.testing.assert_close(out, mprod(A, B.float().double()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="a user transform must be a real matrix"):
        mprod(A, B, torch.eye(5, dtype=torch.complex128))


def test_data_transform_and_bad_transforms():
    X = rand(50, 9, seed=9)
    T = transform("data", data=X)
    torch.testing.assert_close(T.matrix @ T.matrix.T, torch.eye(9, dtype=f64), rtol=0, atol=1e-10)
    # its rows are the left singular vectors of the tubes: M X's rows have the singular values as norms, descending
    torch.testing.assert_close((T.matrix @ X.T).norm(dim=1), torch.linalg.svdvals(X.T), rtol=1e-10, atol=1e-12)
    few = transform("data", data=X[:3])  # fewer tubes than n: still a full orthogonal n × n matrix
    torch.testing.assert_close(few.matrix @ few.matrix.T, torch.eye(9, dtype=f64), rtol=0, atol=1e-10)
    many = transform("data", data=torch.randn(10000, 20, 28))  # 200,000 tubes: no 200,000² V (320 GB) is made
    assert many.matrix.shape == (28, 28)
    with pytest.raises(ValueError, match="M='dst' is not allowed"):
        transform("dst", 4)
    with pytest.raises(ValueError, match="singular"):
        transform(torch.ones(3, 3, dtype=f64))
    with pytest.raises(ValueError, match="needs data"):
        transform("data", 4)
    with pytest.raises(ValueError, match="do not chain"):
        mprod(rand(2, 3, 4), rand(2, 3, 4))


@pytest.mark.parametrize("name,n", [(name, 6) for name in TRANSFORMS] + [("dct", 520), ("dft", 5)])
def test_t_linear_is_the_star_m_product_in_the_paper_layout(name, n):
    """Every way the layer runs (slice-major for the identity and orthogonal matrices, the half spectrum for the DFT
    of real tubes — odd and even n —, the paper's layout for the FFT-based DCT and non-orthogonal M) gives
    W ⋆M X + B, in training and in eval (cached W in the transform domain), and its gradients pass finite
    differences."""
    torch.manual_seed(0)
    layer = TLinear(5, 3, n, M=M_of(name, n)).double()
    x = rand(7, 5, n, seed=10)  # (batch, features, tubes)
    ref = mprod(layer.weight, x.transpose(0, 1), layer.T) + layer.bias  # W ⋆ X + B on (features, batch, tubes)
    torch.testing.assert_close(layer(x), ref.transpose(0, 1), rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), ref.transpose(0, 1), rtol=0, atol=1e-10)
    layer.train()
    # after a cast the named transform is rebuilt at the new dtype (no float64 matrix converted at every call)
    torch.testing.assert_close(layer.float()(x.float()), ref.transpose(0, 1).float(), rtol=1e-4, atol=1e-4)
    assert layer.T.matrix is None or layer.T.matrix.dtype == torch.float32
    # half precision: PyTorch's FFTs have no bfloat16 kernels, so the FFT-based transforms run in float32 and cast back
    for half in (torch.bfloat16, torch.float16):
        y = layer.to(half)(x.to(half))
        assert y.dtype == half
        torch.testing.assert_close(y.double(), ref.transpose(0, 1), rtol=0.05, atol=0.05 * ref.abs().max().item())
        assert mprod(layer.weight, x.to(half).transpose(0, 1), layer.T).dtype == half
    layer.double()
    if n < 512:
        x = x[:2].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda inp, w, b: torch.func.functional_call(
            layer, {"weight": w, "bias": b}, (inp,)), (x, layer.weight, layer.bias))


@pytest.mark.parametrize("layer", [TLinear(28, 10, 28), TResidual(28, 28), TAntisymmetric(28, 28),
                                   THamiltonian(28, 28, 2), HamiltonianTNN(28, 28, 2)])
def test_t_layers_take_images_and_name_the_shape_they_were_given(layer):
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(layer(x), layer(x[:, 0]), rtol=0, atol=0)  # (batch, 1, H, W) as (batch, H, W)
    for bad in (torch.randn(4, 3, 28, 28), torch.randn(4, 27, 28)):  # three channels: 84 features, not 28
        with pytest.raises(ValueError, match=rf"x has shape {re.escape(str(tuple(bad.shape)))}: expected"):
            layer(bad)


def test_hamiltonian_t_resnet_is_exactly_reversible():
    torch.manual_seed(1)
    net = THamiltonian(6, 8, depth=16, width=9, h=0.5).double()
    y0 = rand(4, 6, 8, seed=11)
    y, z = net.forward_states(y0)
    back_y, back_z = net.inverse(y, z)
    torch.testing.assert_close(back_y, y0, rtol=0, atol=1e-10)
    assert back_z.abs().max() <= 1e-10


def test_antisymmetric_layer_uses_the_minus_sign():
    torch.manual_seed(2)
    layer = TAntisymmetric(5, 6, gamma=1e-3).double()
    K = layer.T.forward(layer.operator()).movedim(-1, 0)  # transform-domain slices of W − Wᵀ − γI
    torch.testing.assert_close(K + K.transpose(-1, -2), -2e-3 * torch.eye(5, dtype=f64).expand(6, 5, 5),
                               rtol=0, atol=1e-12)


def test_parameter_counts_equal_the_papers():
    assert sum(p.numel() for p in TNN(head="tce").parameters()) == 30_856
    assert sum(p.numel() for p in TNN(head="ce").parameters()) == 30_586
    assert sum(p.numel() for p in matrix_baseline(TNN(head="tce"), 784, 10).parameters()) == 31_015
    assert sum(p.numel() for p in MatrixNet(784, (784,), 10).parameters()) == 623_290
    assert sum(p.numel() for p in THamiltonian(96, 32, 1).parameters()) == 96 * 96 * 32 + 32


def test_tubal_scores_and_t_cross_entropy():
    out = rand(3, 4, 5, seed=12)
    T = transform("dct", 5)
    logp = torch.log_softmax(torch.from_numpy(scipy.fft.dct(out.numpy(), norm="ortho", axis=-1)), dim=1)
    scores = tubal_scores(out, T)
    torch.testing.assert_close(scores, -(logp**2).sum(-1) / 10, rtol=0, atol=1e-12)
    y = torch.tensor([0, 3, 1])
    torch.testing.assert_close(t_cross_entropy(scores, y), -scores[torch.arange(3), y].mean())
    with pytest.raises(ValueError, match=r"scores has shape \(3, 4, 5\).*go through tubal_scores first"):
        t_cross_entropy(out, y)  # the head's raw tubes, not its scores
    with pytest.raises(ValueError, match="real transform"):
        tubal_scores(out, transform("dft", 5))


@pytest.mark.parametrize("layer", [
    lambda: TLinear(4, 3, 5, M="orthogonal"), lambda: TResidual(4, 5, M="dft"),
    lambda: TAntisymmetric(4, 5, gamma=1e-2), lambda: THamiltonian(4, 5, 3, width=6, M="identity"),
    lambda: TLinear(4, 3, 5, M=torch.randn(5, 5) + 3 * torch.eye(5)),
])
def test_registered_t_layers_save_load_and_inspect(tmp_path, layer, capsys):
    torch.manual_seed(3)
    model = torch.nn.Sequential(layer())
    x = torch.randn(2, 4, 5)
    torchtn.save_model(model, tmp_path / "m.safetensors")
    skeleton = torch.nn.Sequential(torch.nn.Identity())
    again = torchtn.load_model(tmp_path / "m.safetensors", skeleton)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    from torchtn.cli import main

    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert type(model[0]).__name__ in shown and f"tubes={model[0].tubes}" in shown


def test_models_train_a_step_and_the_autoencoder_keeps_shapes():
    torch.manual_seed(4)
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    for model in (TNN(), TNN(head="ce", M="dft")):
        loss = (t_cross_entropy if model.head_kind == "tce" else torch.nn.functional.cross_entropy)(model(x), y)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert TAutoencoder()(x[:, 0]).shape == (8, 28, 28)


def test_t_linear_caches_its_transformed_weight_in_eval_and_notices_updates():
    torch.manual_seed(5)
    layer = TLinear(5, 3, 6).double().eval()
    x = rand(4, 5, 6, seed=13)
    with torch.no_grad():
        first = layer(x)
        layer.weight.add_(0.1)  # an optimizer-style in-place update
        second = layer(x)
    ref = mprod(layer.weight.detach(), x.transpose(0, 1), layer.T) + layer.bias.detach()
    torch.testing.assert_close(second, ref.transpose(0, 1), rtol=0, atol=1e-12)
    assert (second - first).abs().max() > 1e-3
