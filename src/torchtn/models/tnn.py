"""t-NN models (Newman, Horesh, Avron, Kilmer): classifiers, Hamiltonian t-ResNets, autoencoders, and the
parameter-matched matrix networks they are compared with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..core.mprod import Transform
from ..layers.tlayers import THamiltonian, TLinear, as_tubes

__all__ = ["TNN", "HamiltonianTNN", "TAutoencoder", "MatrixNet", "MatrixAutoencoder", "tubal_scores",
           "t_cross_entropy", "matrix_baseline", "count_params"]


def _tanh_between(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layers`` in turn with ``tanh`` between them (none after the last)."""
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < len(layers) - 1:
            x = torch.tanh(x)
    return x


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tubal_scores(outputs: torch.Tensor, T: Transform) -> torch.Tensor:
    """Tubal softmax scores ``(batch, classes, tubes) -> (batch, classes)``: in the transform domain, log-softmax
    over the classes in every slice, then ``s_c = −(1/2n) Σ_k log p̂_c[k]²`` (the reference code's ``t_cross_entropy``;
    the class whose log-probability tube is closest to 0 wins). Needs a real transform."""
    if T.is_complex:
        raise ValueError("the tubal softmax needs a real transform (dct, identity, orthogonal, data, a real matrix), "
                         "not 'dft'; use head='ce' with the DFT")
    logp = torch.log_softmax(T.forward(outputs), dim=1)
    return -logp.square().sum(-1) / (2 * outputs.shape[-1])


def t_cross_entropy(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The t-cross-entropy loss of :func:`tubal_scores`: the mean of ``−s_y`` (the scores are not renormalized).
    ``scores (batch, classes)`` — what a t-CE :class:`TNN` returns — and ``targets (batch,)`` class indices."""
    if scores.dim() != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: t_cross_entropy takes tubal scores (batch, "
                         f"classes); a t-linear head's outputs (batch, classes, tubes) go through tubal_scores first")
    return F.nll_loss(scores, targets)


class TNN(nn.Module):
    """t-NN classifier on images ``(batch, H, W)`` / ``(batch, C, H, W)`` (``C·H`` features, tubes of length ``W``):
    t-linear layers ``features → hidden… `` with ``tanh``, then the head: ``"tce"`` a t-linear layer to
    ``num_classes`` read by :func:`tubal_scores` (train with :func:`t_cross_entropy`), or ``"ce"`` flatten + dense
    (train with cross-entropy). Outputs ``(batch, num_classes)`` scores either way (argmax = the prediction)."""

    def __init__(self, features: int = 28, tubes: int = 28, hidden: tuple[int, ...] = (28,), num_classes: int = 10,
                 *, head: str = "tce", M: str | torch.Tensor = "dct", data: torch.Tensor | None = None) -> None:
        super().__init__()
        self.head_kind = check_choice("head", head, ("tce", "ce"))
        self._config = dict(name="tnn", features=features, tubes=tubes, hidden=tuple(hidden),
                            num_classes=num_classes, head=head, M=M if isinstance(M, str) else "matrix")
        sizes = [features, *hidden]
        self.layers = nn.ModuleList([TLinear(a, b, tubes, M=M, data=data) for a, b in zip(sizes, sizes[1:])])
        if head == "tce":
            self.head = TLinear(sizes[-1], num_classes, tubes, M=self.layers[0].T if self.layers else M, data=data)
        else:
            self.head = nn.Linear(sizes[-1] * tubes, num_classes)

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_tubes(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        if self.head_kind == "ce":
            return self.head(x.flatten(1))
        return tubal_scores(self.head(x), self.head.T)


class HamiltonianTNN(nn.Module):
    """A Hamiltonian t-ResNet (``depth`` leapfrog steps on ``features × tubes``) and a t-CE or flatten+CE head."""

    def __init__(self, features: int = 28, tubes: int = 28, depth: int = 4, num_classes: int = 10, *,
                 h: float = 0.25, width: int | None = None, head: str = "tce", M: str | torch.Tensor = "dct") -> None:
        super().__init__()
        self.head_kind = check_choice("head", head, ("tce", "ce"))
        self.body = THamiltonian(features, tubes, depth, width=width, h=h, M=M)
        self.head = (TLinear(features, num_classes, tubes, M=M) if head == "tce"
                     else nn.Linear(features * tubes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the body's (features, tubes): (96, 32) for a CIFAR image as a t-NN, (3072, 1) for its matrix counterpart
        features, tubes = self.body.features, self.body.tubes
        if x.dim() < 2 or x[0].numel() != features * tubes:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected a batch of {features}·{tubes} = "
                             f"{features * tubes} values each (images or (batch, {features}, {tubes}))")
        y = self.body(x.reshape(x.shape[0], features, tubes))
        return self.head(y.flatten(1)) if self.head_kind == "ce" else tubal_scores(self.head(y), self.head.T)


class TAutoencoder(nn.Module):
    """t-NN autoencoder on ``(batch, features, tubes)``: t-linear ``features → widths… → latent`` and back, ``tanh``
    between layers, linear output. Returns the reconstruction with the input's shape."""

    def __init__(self, features: int = 28, tubes: int = 28, widths: tuple[int, ...] = (20, 10), *,
                 M: str | torch.Tensor = "dct") -> None:
        super().__init__()
        sizes = [features, *widths]
        self.encoder = nn.ModuleList([TLinear(a, b, tubes, M=M) for a, b in zip(sizes, sizes[1:])])
        rev = sizes[::-1]
        self.decoder = nn.ModuleList([TLinear(a, b, tubes, M=M) for a, b in zip(rev, rev[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tanh_between(nn.ModuleList([*self.encoder, *self.decoder]), as_tubes(x)).reshape(x.shape)


class MatrixNet(nn.Module):
    """The matrix counterpart: flatten, dense layers with ``tanh``, dense output ``(batch, num_classes)``."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (39,), num_classes: int = 10) -> None:
        super().__init__()
        sizes = [check_positive_int("in_features", in_features), *hidden, num_classes]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tanh_between(self.layers, x.flatten(1))


class MatrixAutoencoder(nn.Module):
    """Dense autoencoder ``in → widths… → latent → …widths → in`` with ``tanh`` (the paper's matrix AEs)."""

    def __init__(self, in_features: int = 784, widths: tuple[int, ...] = (560, 10)) -> None:
        super().__init__()
        sizes = [in_features, *widths]
        rev = sizes[::-1]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in [*zip(sizes, sizes[1:]), *zip(rev, rev[1:])]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tanh_between(self.layers, x.flatten(1)).reshape(x.shape)


def matrix_baseline(model: nn.Module, in_features: int, num_classes: int) -> MatrixNet:
    """A one-hidden-layer :class:`MatrixNet` whose parameter count is the closest to ``model``'s (the width
    ``w`` minimizing ``|in·w + w + w·c + c − P|``; for the paper's 30,856-parameter t-NN on 784 inputs: ``w = 39``,
    31,015 parameters)."""
    target = count_params(model)
    w = max(1, round((target - num_classes) / (in_features + 1 + num_classes)))
    best = min((max(1, w + d) for d in (-1, 0, 1)),
               key=lambda k: abs(in_features * k + k + k * num_classes + num_classes - target))
    return MatrixNet(in_features, (best,), num_classes)
