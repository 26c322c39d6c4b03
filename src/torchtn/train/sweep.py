"""DMRG-style sweep training of MPO layers (Jahromi & Orús, "Variational tensor neural networks"; spec/vtnn.md §1.2).

For every sweepable TT layer (``MPOLinear``) the sweep visits the bonds left→right then right→left. At each bond the two
neighbouring cores are merged into one two-site tensor ``Θ`` (:mod:`torchtn.core.twosite`), ``Θ`` takes local gradient
steps, and a truncated SVD splits it back — at most ``max_rank`` singular values, none below ``cutoff·s_1`` — so the
bond dimension follows the data. The MPO stays in mixed-canonical form (the split leaves the orthogonality centre on the
site the sweep moves to), which makes the truncation error of ``Θ`` the error of the whole weight. Every other
parameter (dense layers of a hybrid model, biases, layers the sweep does not handle) is updated by the trainer's
ordinary optimizer in the same step. The bond spectra, entropies and truncation errors are recorded at every sweep.

The paper leaves these choices open (spec/vtnn.md marks them [RECON]); each is an option of :class:`SweepConfig`, with
the defaults in brackets: two-site or one-site updates [two-site]; local steps per visit
[1]; local optimizer [plain SGD]; sweeps per batch, per bond or per epoch [a full sweep every batch]; local gradients
from one forward pass per batch, or the whole network recomputed after every local update [one pass]; local gradient by
autograd or by manual environment contraction [autograd].
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._checks import check_choice, check_positive_int, check_positive_real
from ..core.tt import bond_caps, spectrum_entropy
from ..core.twosite import local_grad_from_weight_grad, merge_two_site, move_centre, split_two_site, with_two_site
from ..functional import mpo_linear
from ..layers.tt_layer import TTLayer

__all__ = ["SweepConfig", "Sweeper", "sweepable_layers"]

SCHEDULES = ("batch", "bond", "epoch")
LOCAL_OPTIMIZERS = ("sgd", "adam")
GRADIENTS = ("autograd", "manual")


@dataclass
class SweepConfig:
    """Options of sweep training (stored with every checkpoint).

    ``max_rank``: bond-dimension cap; ``cutoff``: drop singular values ``s_i ≤ cutoff·s_1`` (0 keeps all up to the
    cap); ``sites``: 2 — two-site updates split by a truncated SVD (bonds adapt), 1 — one-site updates with the centre
    moved by an untruncated SVD (bonds fixed; ``max_rank`` and ``cutoff`` unused), the spec's ablation; ``lr``: step size of the local updates; ``local_steps``: gradient steps on ``Θ`` per visit (with
    ``recompute=False`` the local objective is linear in ``Θ``, so more steps act as a larger step);
    ``local_optimizer``: ``"sgd"`` or ``"adam"`` (a fresh Adam on ``Θ`` at every visit); ``schedule``: ``"batch"`` — a
    full left→right→left sweep every mini-batch, ``"bond"`` — one bond per mini-batch, the sweep spanning
    ``2(d−1)`` batches, ``"epoch"`` — one sweep per epoch, the bonds spread evenly over its batches; ``recompute``:
    ``False`` — every local gradient of a batch comes from that batch's one forward/backward pass (the layer's input
    and output gradient are kept, the rest of the network is held at that linearization); ``True`` — the whole
    network is recomputed for every local gradient (exact, DMRG-like, ``2(d−1)``× the cost); ``gradient``:
    ``"autograd"`` or ``"manual"`` (environment contraction of the layer's dense weight gradient).
    """

    max_rank: int = 16
    cutoff: float = 0.0
    sites: int = 2
    lr: float = 0.05
    local_steps: int = 1
    local_optimizer: str = "sgd"
    schedule: str = "batch"
    recompute: bool = False
    gradient: str = "autograd"

    def __post_init__(self) -> None:
        check_positive_int("max_rank", self.max_rank)
        if self.sites not in (1, 2):
            raise ValueError(f"sites={self.sites!r} is not allowed: expected 2 (two-site updates, adaptive bonds) or "
                             f"1 (one-site updates, fixed bonds)")
        if not (isinstance(self.cutoff, (int, float)) and 0.0 <= self.cutoff < 1.0):
            raise ValueError(f"cutoff={self.cutoff!r} is not allowed: expected a relative singular-value cutoff "
                             f"in [0, 1)")
        check_positive_real("lr", self.lr)
        check_positive_int("local_steps", self.local_steps)
        check_choice("local_optimizer", self.local_optimizer, LOCAL_OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.recompute, bool):
            raise TypeError(f"recompute={self.recompute!r} is not allowed: expected True or False")
        check_choice("gradient", self.gradient, GRADIENTS)


def sweepable_layers(model: nn.Module) -> dict[str, TTLayer]:
    """The layers a sweep trains, by name: every TT layer whose forward runs on any chain of cores of its matrix
    (``sweepable``; today ``MPOLinear``), that has at least one bond and whose cores are not frozen (a layer with
    every core at ``requires_grad=False`` is left as it is, as an optimizer would leave it)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, TTLayer) and getattr(m, "sweepable", False) and len(m.core_list()) >= 2
            and any(c.requires_grad for c in m.core_list())}


class _Capture:
    """Forward hooks that keep a layer's input and output of the last forward pass (the output retains its grad) and
    count the calls since :meth:`reset` (a layer called twice in one pass would leave only its last call here)."""

    def __init__(self, layer: nn.Module) -> None:
        self.handles = [layer.register_forward_pre_hook(self._pre), layer.register_forward_hook(self._post)]
        self.reset()

    def reset(self) -> None:
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.calls = 0

    def _pre(self, module, args):
        x = args[0]
        if torch.is_grad_enabled() and not x.requires_grad:  # so that the output carries a gradient
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def _post(self, module, args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            output.retain_grad()
            self.x, self.y = args[0].detach(), output
            self.calls += 1
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_one_call(name: str, cap: _Capture, needs_grad: bool) -> None:
    """The local gradient reads the layer's one input and output gradient of this batch."""
    if cap.calls == 0 or (needs_grad and cap.y.grad is None):
        raise RuntimeError(f"sweep: layer {name!r} took no part in this batch's backward pass; every sweepable layer "
                           f"must be used in the loss")
    if cap.calls > 1:
        raise RuntimeError(f"sweep: layer {name!r} ran {cap.calls} times in this batch's forward pass, and the local "
                           f"gradient would see only its last call; a layer used more than once needs "
                           f"SweepConfig(recompute=True, gradient='autograd')")


class Sweeper:
    """Sweep training of a model's MPO layers; used by :class:`~torchtn.train.Trainer` with ``optimizer="sweep"``.

    Layers are looked up by name at every use (loading a checkpoint replaces them). :meth:`attach` freezes their cores
    for the ordinary optimizer and hooks them; :meth:`canonicalize` brings each into mixed-canonical form with the
    centre at site 0 (a fresh run); :meth:`update` runs this batch's share of the sweep; :meth:`detach` undoes
    :meth:`attach`. ``history`` holds one record per layer at step 0 and after every completed sweep: the step, the bond
    dimensions, the entropies and the truncation errors of every bond at its last visit.
    """

    def __init__(self, model: nn.Module, config: SweepConfig) -> None:
        self.model = model
        self.config = config
        self.names = list(sweepable_layers(model))
        if not self.names:
            raise ValueError("optimizer='sweep' needs a model with at least one MPOLinear layer of two or more cores "
                             f"that are not frozen (found none in {type(model).__name__}); build it with MPO layers "
                             f"or tensorize it first")
        for name in self.names:  # a sweep replaces the cores: none may be held by pruning or a parametrization
            self.layer(name)._plain_cores(f"trained by sweeps ({name!r})")
        self.history: list[dict] = []
        self._captures: dict[str, _Capture] = {}
        self._last: dict[str, dict[int, tuple[int, float, float]]] = {n: {} for n in self.names}
        self._lr = config.lr

    # ------------------------------------------------------------------ set-up
    def layer(self, name: str) -> TTLayer:
        return self.model.get_submodule(name)

    def attach(self) -> None:
        for name in self.names:
            layer = self.layer(name)
            for p in layer.core_list():
                p.requires_grad_(False)
            self._captures[name] = _Capture(layer)

    def detach(self) -> None:
        """Remove the hooks; the cores need gradients again (a swept layer's cores were trainable: frozen layers are
        not swept)."""
        for name, cap in self._captures.items():
            cap.remove()
            for p in self.layer(name).core_list():
                p.requires_grad_(True)
        self._captures.clear()

    def canonicalize(self) -> None:
        """Mixed-canonical form with the orthogonality centre at site 0 (cores 1 … d−1 right-orthogonal), and the
        step-0 record of every layer (its initial bonds and entropies)."""
        for name in self.names:
            layer = self.layer(name)
            layer.set_cores(layer.tt.right_canonical().cores)
            self._last[name] = {b.bond - 1: (b.rank, b.entropy, 0.0) for b in layer.bond_report()}
            self._record(name, 0)

    # ------------------------------------------------------------------ the sweep
    def visits(self, num_cores: int) -> list[tuple[int, str]]:
        """One sweep: ``(where, where the centre goes)`` left→right, then right→left. Two-site: ``where`` is the bond
        (sites ``b``, ``b+1``); one-site: the site (``0 … d−2`` going right, ``d−1 … 1`` going left)."""
        first = range(num_cores - 1)
        back = reversed(first) if self.config.sites == 2 else range(num_cores - 1, 0, -1)
        return [(b, "right") for b in first] + [(b, "left") for b in back]

    def _positions(self, length: int, step: int, index: int, steps_per_epoch: int) -> range:
        schedule = self.config.schedule
        if schedule == "batch":
            return range(length)
        if schedule == "bond":
            p = step % length
            return range(p, p + 1)
        return range(math.ceil(index * length / steps_per_epoch), math.ceil((index + 1) * length / steps_per_epoch))

    def update(self, step: int, index: int, steps_per_epoch: int, batch_loss: Callable[[], torch.Tensor], *,
               lr_scale: float = 1.0) -> bool:
        """This batch's visits for every layer (after the trainer's forward/backward and ordinary step). ``step`` is
        the global step, ``index`` the batch within its epoch; ``batch_loss()`` recomputes the loss of this batch;
        ``lr_scale`` multiplies ``config.lr`` (the trainer's schedule). Returns whether any bond dimension changed."""
        self._lr = self.config.lr * lr_scale
        changed = False
        try:
            for name in self.names:
                layer = self.layer(name)
                sequence = self.visits(len(layer.core_list()))
                positions = self._positions(len(sequence), step, index, steps_per_epoch)
                if not len(positions):
                    continue
                ranks = layer.ranks
                weight_grad = None
                for p in positions:
                    where, centre = sequence[p]
                    weight_grad = self._visit(name, layer, where, centre, batch_loss, weight_grad)
                    if p == len(sequence) - 1:
                        self._record(name, step + 1)
                changed |= layer.ranks != ranks
        finally:  # the next batch's forward pass captures afresh (a layer it skips is not served this batch's)
            for cap in self._captures.values():
                cap.reset()
        return changed

    def _visit(self, name: str, layer: TTLayer, where: int, centre: str, batch_loss: Callable[[], torch.Tensor],
               weight_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Local steps on the two-site tensor at bond ``where`` (or the core at site ``where``), then the split (or
        the centre's move) towards ``centre``. Returns the layer's dense weight gradient for reuse, if one was made."""
        c = self.config
        cores = layer.core_list()
        two = c.sites == 2
        local = (merge_two_site(cores, where) if two else cores[where]).detach().clone().requires_grad_(True)
        chain = with_two_site(cores, where, local) if two else [*cores[:where], local, *cores[where + 1:]]
        adam = torch.optim.Adam([local], lr=self._lr) if c.local_optimizer == "adam" else None
        for _ in range(c.local_steps):
            if c.recompute:
                weight_grad = None  # the network is recomputed: nothing from before this local step holds
            grad, weight_grad = self._local_grad(name, layer, chain, where, local, batch_loss, weight_grad)
            with torch.no_grad():
                if adam is None:
                    local -= self._lr * grad
                else:
                    local.grad = grad
                    adam.step()
        new = list(cores)
        local = local.detach()
        if two:
            (m1, n1), (m2, n2) = cores[where].shape[1:3], cores[where + 1].shape[1:3]
            cap = min(c.max_rank, bond_caps(layer.tt.in_shape, layer.tt.out_shape)[where])
            split = split_two_site(local, ((m1, n1), (m2, n2)), max_rank=cap, cutoff=c.cutoff, centre=centre)
            new[where], new[where + 1] = split.left, split.right
            bond, record = where, (split.rank, split.entropy, split.truncation_error)
        else:
            other = where + 1 if centre == "right" else where - 1
            new[where], new[other], s = move_centre(local, cores[other], centre)
            bond, record = min(where, other), (int(s.shape[0]), float(spectrum_entropy(s)), 0.0)
        layer.set_cores(new)
        self._last[name][bond] = record
        return weight_grad if not c.recompute else None

    def _local_grad(self, name: str, layer: TTLayer, chain: list[torch.Tensor], site: int, local: torch.Tensor,
                    batch_loss: Callable[[], torch.Tensor],
                    weight_grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``∂L/∂(local tensor)`` — ``chain[site]`` is it — and the layer's dense weight gradient, when the manual
        gradient formed it."""
        c = self.config
        cap = self._captures[name]
        if c.recompute:
            cap.reset()
            with layer.cores_override(chain):
                loss = batch_loss()
            if c.gradient == "autograd":
                return torch.autograd.grad(loss, local)[0], None
            _check_one_call(name, cap, needs_grad=False)
            delta = torch.autograd.grad(loss, cap.y)[0]
            x = cap.x
        else:
            _check_one_call(name, cap, needs_grad=True)
            x, delta = cap.x, cap.y.grad
            if c.gradient == "autograd":  # ∂/∂(local) of the layer's linearized loss Σ δ·(x W(local)ᵀ)
                with torch.enable_grad():
                    y = mpo_linear(x, chain)
                    return torch.autograd.grad((y * delta).sum(), local)[0], None
        if weight_grad is None:
            weight_grad = delta.reshape(-1, delta.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return local_grad_from_weight_grad([t.detach() for t in chain], site, weight_grad), weight_grad

    def _record(self, name: str, step: int) -> None:
        last = self._last[name]
        bonds = sorted(last)
        self.history.append({"step": step, "layer": name, "ranks": [last[b][0] for b in bonds],
                             "entropy": [round(last[b][1], 6) for b in bonds],
                             "truncation_error": [float(f"{last[b][2]:.4g}") for b in bonds]})

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"config": asdict(self.config), "history": self.history}

    def load_state(self, state: dict) -> None:
        self.history = list(state.get("history", []))
