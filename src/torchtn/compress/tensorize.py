"""``tensorize``: replace a model's dense layers by registered torchtn layers initialized by TT-SVD.

Which dense module becomes which layer is the layer registry's business (:func:`torchtn.layers.register_layer`,
``converts=``): today ``nn.Linear → MPOLinear``; each new layer type adds its rule there, not here.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_ratio,
    check_rel_tol,
)
from .._modules import check_not_pruned, replace_submodule, unwrapped
from ..core import TTMatrix, bond_caps, inner_ranks, tt_compression_ratio, tt_num_params
from ..core.adtn import MAPPINGS, adtn_num_params, adtn_qubits
from ..core.weighting import Weighting, two_core_shapes
from ..io import ROOT_NAME, tensor_name
from ..layers.mpo_linear import MPOLinear
from ..layers.mpo_parametrize import MPOParametrization, TensorSite, attention_sites
from ..layers.registry import converter_for, densify_model, put_back
from ..report import format_table
from .calibration import LayerStats, sensitive

__all__ = ["tensorize", "TensorizeReport", "LayerReport", "allocate_ranks"]

Skip = Iterable[str] | Callable[[str, nn.Module], bool]


@dataclass
class LayerReport:
    """What happened to one dense layer (its weight read as an ``(out_features, in_features)`` matrix)."""

    name: str
    out_features: int
    in_features: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    params_before: int  # weight + bias
    params_after: int
    rel_error: float  # ‖W − W_tt‖_F / ‖W‖_F
    bias_params: int = 0  # parameters besides the cores: the bias; a table's exact rows
    layer_type: str = "MPOLinear"
    entropies: tuple[float, ...] = ()  # entanglement entropy per inner bond (nats)
    weight_params: int | None = None  # parameters replacing the weight, for layers that are not TT-matrices (ADTN)
    output_error: float | None = None  # calibrated layers: relative error of the layer's outputs on the calibration data
    depth: int | None = None  # ADTN layers: brick layers of the generator

    @property
    def compression_ratio(self) -> float:
        """Layer parameters (weight + bias) dense / tensorized."""
        return self.params_before / self.params_after

    @property
    def weight_ratio(self) -> float:
        """Weight entries / core entries (bias excluded), as the layer's ``compression_ratio``."""
        if self.weight_params is not None:
            return self.out_features * self.in_features / self.weight_params
        return tt_compression_ratio(self.in_shape, self.out_shape, self.ranks)


@dataclass
class TensorizeReport:
    """Per-layer results plus whole-model parameter counts; ``print(report)`` shows a table."""

    layers: list[LayerReport]
    params_before: int
    params_after: int
    skipped: list[str] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """Whole-model dense parameters / tensorized parameters (≥ 1 means smaller)."""
        return self.params_before / self.params_after

    def table(self) -> str:
        calibrated = any(r.output_error is not None for r in self.layers)
        rows = [
            (tensor_name(r.name), r.layer_type, f"{r.out_features}×{r.in_features}", f"{r.out_shape}←{r.in_shape}" if r.out_shape
             else "–", str(r.ranks) if r.depth is None else f"depth {r.depth}",
             r.params_before, r.params_after, round(r.compression_ratio, 1), r.rel_error,
             *([("–" if r.output_error is None else r.output_error)] if calibrated else []),
             " ".join(f"{max(e, 0.0):.2f}" for e in r.entropies))
            for r in self.layers
        ]
        body = format_table(
            ["layer", "type", "shape", "modes (out←in)", "ranks", "params before", "params after", "ratio",
             "rel. error", *(["output error (calibration)"] if calibrated else []), "entropy S_k per bond"], rows)
        lines = [body, f"whole model: {self.params_before:,} → {self.params_after:,} parameters, "
                       f"compression ratio {self.compression_ratio:.2f}× (dense / tensorized, all parameters counted)"]
        if any(r.depth is not None for r in self.layers):
            lines.append("ADTN layers: params after = gates 16·depth·(Q−1) + 1 scale (+ the bias, as the dense layer's), "
                         "Q = ⌈log2(weight entries)⌉, of which the first layer's first half-layer uses 4 entries per "
                         "gate (it acts on the fixed start; param_report['live']); rel. error is the fit's "
                         "‖W_adtn − W‖/‖W‖")
        if self.skipped:
            # (a model that is itself the one layer has the name "")
            lines.append("not converted: " + ", ".join(ROOT_NAME + s if not s or s.startswith(" ") else s
                                                       for s in self.skipped))
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) | {"compression_ratio": r.compression_ratio, "weight_ratio": r.weight_ratio}
                           for r in self.layers],
                "params_before": self.params_before, "params_after": self.params_after,
                "compression_ratio": self.compression_ratio, "skipped": list(self.skipped)}


def _tensorize_adtn(model: nn.Module, depth: int, fit_steps: int, skip: Skip, unitary: bool, mapping: str,
                    allow_larger: bool) -> tuple[nn.Module, TensorizeReport]:
    """The ``method="adtn"`` branch of :func:`tensorize`."""
    from ..layers.adtn import ADTNConv2d, ADTNLinear, adtn_parametrize

    check_positive_int("depth", depth)
    check_nonnegative_int("fit_steps", fit_steps)
    new = copy.deepcopy(model)
    skip_fn = _skipper(skip)
    new, previous = densify_model(new, skip_fn)  # torchtn layers the model holds already: compressed anew, from their map
    inside_mha = _inside_mha(new)
    tied = _tied(new)
    targets, skipped, unsupported = [], [], []
    kind = parametrize.type_before_parametrizations  # a weight-normed nn.Linear is a "ParametrizedLinear"
    for n, m in new.named_modules():
        if issubclass(kind(m), (nn.Linear, nn.Conv2d)) and n not in inside_mha:
            if skip_fn(n, m):
                skipped.append(n)
            elif reason := _tie_reason(n, tied):
                unsupported.append(f"{n} ({reason})")
            elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                unsupported.append(f"{n} (padding_mode={m.padding_mode!r}: ADTN convolutions pad with zeros)")
            else:
                _check_has_values(n, m)
                targets.append((n, m))
        elif issubclass(kind(m), nn.Embedding) and not skip_fn(n, m):
            unsupported.append(f"{n} (nn.Embedding: ADTNs hold Linear and Conv2d weights)")
    all_sites = [(n, site, m) for name, m in new.named_modules() if isinstance(m, nn.MultiheadAttention)
                 for n, site in attention_sites(name, m)]
    sites = [(n, site) for n, site, m in all_sites if not skip_fn(n, m)]
    skipped += [n for n, _, m in all_sites if skip_fn(n, m)] + unsupported + _parametrized_elsewhere(new)
    if not targets and not sites:
        raise ValueError("the model has no layer that tensorize(method='adtn') can convert (nn.Linear, nn.Conv2d with "
                         "zero padding, nn.MultiheadAttention; after skip)")

    def held(name: str, module: nn.Module | TensorSite, weight: torch.Tensor) -> int:  # what a generator replaces
        return _replaced_params(name, module, weight.numel(), previous)

    def larger(name: str, module: nn.Module | TensorSite, weight: torch.Tensor) -> bool:  # no smaller: stays
        q = adtn_qubits(tuple(weight.shape), mapping)
        return not allow_larger and adtn_num_params(q, depth) >= held(name, module, weight)

    kept = [n for n, m in targets if larger(n, m, m.weight)] + [n for n, site in sites if larger(n, site, site.value)]
    targets = [(n, m) for n, m in targets if n not in kept]
    sites = [(n, site) for n, site in sites if n not in kept]
    for name in kept:  # a torchtn layer stays as it was
        if name in previous:
            new = put_back(new, name, previous[name])
    if fit_steps:
        _check_finite([(n, m.weight) for n, m in targets] + [(n, site.value) for n, site in sites], "fitting an ADTN")
    before = sum(p.numel() for p in model.parameters())
    rows = []
    for name, site in sites:  # read directly by the attention: generated in place (a parametrization)
        dense = site.value.detach().clone()
        generator = adtn_parametrize(site.owner, site.tensor, depth, fan_in=dense[0].numel(), unitary=unitary,
                                     mapping=mapping, seed=0)  # as from_dense's: the caller's RNG is left alone
        err = generator.fit(dense, fit_steps)
        rows.append(LayerReport(name, dense.shape[0], dense[0].numel(), (), (), (), held(name, site, dense),
                                generator.num_params, err, 0, "ADTNParametrization",
                                weight_params=generator.num_params, depth=depth))
    for name, module in targets:
        cls = ADTNLinear if isinstance(module, nn.Linear) else ADTNConv2d
        layer, err = cls.from_dense(module, depth, steps=fit_steps, unitary=unitary, mapping=mapping)
        new = replace_submodule(new, name, layer)  # (the model itself when it is the one layer: name "")
        w = module.weight
        bias = 0 if module.bias is None else module.bias.numel()
        rows.append(LayerReport(name, w.shape[0], w[0].numel(), (), (), (), held(name, module, w) + bias,
                                layer.generator.num_params + bias, err, bias, cls.__name__,
                                weight_params=layer.generator.num_params, depth=depth))
    after = sum(p.numel() for p in new.parameters())
    return new, TensorizeReport(_in_module_order(rows, model), before, after, skipped + kept)


def _check_finite(weights: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Name the first layer whose weight holds NaN or infinite entries (a diverged training run?), which ``what``
    cannot take."""
    for name, w in weights:
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {name!r} holds NaN or infinite weights (a diverged training run?): {what} needs "
                             f"finite entries")


def _replaced_params(name: str, module: nn.Module | TensorSite, entries: int,
                     previous: Mapping[str, nn.Module]) -> int:
    """The parameters a new layer at ``name`` replaces (bias excluded): what the torchtn layer :func:`densify` took
    out there held (cores, gates and scale, exact rows), else what a parametrization of the dense ``weight`` keeps
    (``weight_norm``'s ``g`` and ``v``, …), else the weight's ``entries``."""
    if name in previous:
        layer = previous[name]
        bias = getattr(layer, "bias", None)
        return sum(p.numel() for p in layer.parameters()) - (bias.numel() if isinstance(bias, torch.Tensor) else 0)
    if isinstance(module, nn.Module) and parametrize.is_parametrized(module, "weight"):
        return sum(p.numel() for p in module.parametrizations["weight"].parameters())
    return entries


def _parametrized_elsewhere(model: nn.Module) -> list[str]:
    """The attention projection matrices that a parametrization holds still (another library's, or a torchtn one
    that ``skip`` kept) and that are left alone, named with it for the report's "not converted" line."""
    return [f"{full} (held by {' + '.join(type(p).__name__ for p in site.owner.parametrizations[site.tensor])} "
            f"already)" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for full, site in attention_sites(name, m, parametrized=True)]


def _in_module_order(rows: list[LayerReport], model: nn.Module) -> list[LayerReport]:
    """``rows`` sorted as ``model.named_modules()`` lists their layers (an attention tensor at its owner's place)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def place(row: LayerReport) -> tuple[int, str]:
        owner = row.name.rsplit(".", 1)[0] if "." in row.name else ""
        return order.get(row.name, order.get(owner, len(order))), row.name

    return sorted(rows, key=place)


def _skipper(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if callable(skip):
        return skip
    if isinstance(skip, str):
        skip = [skip]
    patterns = list(skip)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip must be module-name patterns (str) or a callable, got an entry {p!r}")
    return lambda name, _m: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_skip(model: nn.Module, skip: Skip) -> None:
    """A ``skip`` pattern that names nothing in the model is a typo that would convert what the user meant to keep:
    each must match a submodule's or a parameter's name (``"att.in_proj_weight"``)."""
    if callable(skip):
        return
    _skipper(skip)  # the types
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()] + [
        f"{n}.{t}" if n else t for n, m in model.named_modules() if parametrize.is_parametrized(m)
        for t in m.parametrizations]  # a tensor a parametrization holds, by the name it is read under
    for pattern in [skip] if isinstance(skip, str) else list(skip):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            some = ", ".join(n for n, _ in list(model.named_children())[:6])
            raise ValueError(f"skip pattern {pattern!r} matches no module or parameter of the model (its top-level "
                             f"modules: {some or 'none'}; nested ones are dotted paths such as 'encoder.layer.0.fc'; "
                             f"globs such as 'classifier*' match too)")


def _inside_mha(model: nn.Module) -> set[str]:
    """Names of the layers inside ``nn.MultiheadAttention`` modules: it reads ``out_proj.weight`` directly, so they
    must stay dense."""
    return {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for c, _ in m.named_children()}


def _targets(model: nn.Module, skip: Skip) -> tuple[list[tuple[str, nn.Module | TensorSite, type]], list[str]]:
    """``(name, dense module, layer class)`` to convert (by the registry's rules), and the names of those kept dense.
    An ``nn.MultiheadAttention`` reads its projection matrices directly (never through a submodule's ``forward``),
    so each comes as a :class:`~torchtn.layers.mpo_parametrize.TensorSite`, held by an ``MPOParametrization``."""
    skip_fn = _skipper(skip)
    inside_mha = _inside_mha(model)
    tied = _tied(model)
    chosen, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for site_name, site in attention_sites(name, module):
                if skip_fn(site_name, module):
                    kept.append(site_name)
                else:
                    chosen.append((site_name, site, MPOParametrization))
            continue
        cls = converter_for(module)
        if cls is not None and name not in inside_mha:  # out_proj: its weight is one of the attention's sites
            reason = _tie_reason(name, tied) or getattr(cls, "cannot_convert", lambda m: None)(module)
            if skip_fn(name, module):
                kept.append(name)
            elif reason is not None:
                kept.append(f"{name} ({reason})")
            else:
                _check_has_values(name, module)
                chosen.append((name, module, cls))
    return chosen, kept


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """For every module whose ``weight`` is a parameter other modules hold too (a language model's input table and
    output head, tied): the names of those others."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(name)
    return {name: [n for n in names if n != name] for names in holders.values() if len(set(names)) > 1
            for name in names}


def _tie_reason(name: str, tied: dict[str, list[str]]) -> str | None:
    others = tied.get(name)
    return None if not others else (f"its weight is {', '.join(others)}'s too (tied): an MPO would untie them, and "
                                    f"the other module would keep the dense weight")


def _check_has_values(name: str, module: nn.Module) -> None:
    """A layer to convert must hold its weights: not a lazy module before its first forward pass, not on meta."""
    for p in module.parameters(recurse=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) is not initialized yet (a lazy module): run "
                             f"one forward pass before tensorize")
        if p.is_meta:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) is on the meta device (no values): load its "
                             f"weights before tensorize")


def allocate_ranks(spectra: Sequence[Sequence[torch.Tensor]], shapes: Sequence[tuple[Sequence[int], Sequence[int]]],
                   budget: int) -> list[list[int]]:
    """Choose every layer's inner ranks so that the cores hold at most ``budget`` entries in total.

    Start from the ranks the spectra allow and repeatedly drop, across all layers and bonds, the singular value whose
    discarding costs the least squared error per parameter saved (``s² / Δparams``) — the budget goes where the
    spectra are largest — then give back, while they fit, the dropped values worth most per parameter, so the
    budget is used up to the last step that fits. ``spectra[l][k]``: singular values at bond ``k`` of layer ``l``; ``shapes[l]``:
    ``(in_shape, out_shape)``. Raises ``ValueError`` if even rank 1 everywhere exceeds the budget.
    """
    ranks = [[1] + [len(s) for s in layer] + [1] for layer in spectra]

    def params(li: int) -> int:
        return tt_num_params(shapes[li][0], shapes[li][1], ranks[li])

    minimum = sum(tt_num_params(i, o, [1] * (len(i) + 1)) for i, o in shapes)
    if minimum > budget:
        raise ValueError(f"the parameter budget of {budget:,} core entries is below the {minimum:,} that rank 1 needs")
    total = sum(params(li) for li in range(len(ranks)))
    sq = [[(s.double() ** 2).tolist() for s in layer] for layer in spectra]
    while total > budget:
        best = None
        for li, layer in enumerate(ranks):
            before = params(li)
            for k in range(1, len(layer) - 1):
                r = layer[k]
                if r <= 1:
                    continue
                layer[k] = r - 1
                saved = before - params(li)
                layer[k] = r
                if saved <= 0:
                    continue
                score = sq[li][k - 1][r - 1] / saved
                if best is None or score < best[0]:
                    best = (score, li, k, saved)
        if best is None:
            break
        _, li, k, saved = best
        ranks[li][k] -= 1
        total -= saved
    # fill the slack the last removals left: give back the singular values worth most per parameter that still fit
    maxima = [[1] + [len(s) for s in layer] + [1] for layer in spectra]
    while True:
        best = None
        for li, layer in enumerate(ranks):
            before = params(li)
            for k in range(1, len(layer) - 1):
                r = layer[k]
                if r >= maxima[li][k]:
                    continue
                if sq[li][k - 1][r] <= 1e-24 * sq[li][k - 1][0]:
                    continue  # an exactly-zero singular value: no capacity worth the parameters
                layer[k] = r + 1
                added = params(li) - before
                layer[k] = r
                if added <= 0 or total + added > budget:
                    continue
                score = sq[li][k - 1][r] / added
                if best is None or score > best[0]:
                    best = (score, li, k, added)
        if best is None:
            break
        _, li, k, added = best
        ranks[li][k] += 1
        total += added
    return [r[1:-1] for r in ranks]


def _fit_budget(before: int, ratio: float, weights: list[torch.Tensor], sizes: list[int], layer_shapes: list,
                active: list[int], allocation: str = "absolute") -> dict[int, TTMatrix]:
    """TT-SVDs of the ``active`` layers whose cores together fit the whole-model budget of ``before / ratio``
    (``sizes``: the dense parameters each layer's cores replace)."""
    fixed = before - sum(sizes[li] for li in active)
    budget = math.floor(before / ratio) - fixed
    if budget <= 0:
        raise ValueError(f"ratio={ratio:g} is unreachable: the {fixed:,} parameters that stay dense already exceed "
                         f"{before:,}/{ratio:g} = {before / ratio:,.0f}")
    first = {}
    for li in active:  # no layer can use more than the whole budget: cap the initial decomposition
        i, o = layer_shapes[li]
        caps = bond_caps(i, o)
        r = 1
        while r < max(caps) and tt_num_params(i, o, [1, *(min(r + 1, c) for c in caps), 1]) <= budget:
            r += 1
        first[li] = TTMatrix.from_dense(weights[li], i, o, max_rank=r)
    try:
        spectra = [first[li].spectra() for li in active]
        if allocation == "relative":  # every layer's spectrum in units of its own norm: equal relative errors
            spectra = [[s / torch.linalg.vector_norm(weights[li].double()) for s in layer]
                       for li, layer in zip(active, spectra)]
        chosen = allocate_ranks(spectra, [layer_shapes[li] for li in active], budget)
    except ValueError as err:
        raise ValueError(f"ratio={ratio:g} is unreachable: {err}") from None
    return {li: first[li].round(max_rank=r) for li, r in zip(active, chosen)}


def _weightings(model: nn.Module, targets: list, calibration: Mapping[str, LayerStats],
                shapes: Mapping[str, tuple]) -> dict[int, Weighting]:
    """The data-aware norm of every converted layer that has calibration statistics, by its index in ``targets``."""
    names = dict(model.named_modules())
    unknown = sorted(set(calibration) - set(names))
    if unknown:
        raise ValueError(f"calibration names modules the model does not have: {unknown[:5]}")
    out = {}
    for li, (name, module, _) in enumerate(targets):
        if name not in calibration:
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ValueError(f"calibration for {name!r}: only nn.Linear and nn.Embedding layers are calibrated, "
                             f"not {type(module).__name__}")
        if name in shapes:
            raise ValueError(f"{name!r} has both shapes= and calibration: a calibrated layer is a two-core MPO")
        try:
            weighting = calibration[name].weighting()
            weighting.check(*two_core_shapes(*module.weight.shape))
        except ValueError as err:
            raise ValueError(f"calibration for {name!r} cannot be used for the layer: {err}") from None
        out[li] = weighting
    return out


def _exact_ids(targets: list, calibration: Mapping[str, LayerStats], weightings: Mapping[int, Weighting],
               exact_rows: int | float | None) -> dict[int, torch.Tensor]:
    """Per calibrated table (by index in ``targets``), the ids whose rows stay exact: the most looked-up ones —
    ``exact_rows`` of them (an int), or as many as cover that fraction of the calibration lookups (a float)."""
    if exact_rows is None:
        return {}
    if isinstance(exact_rows, bool) or not ((isinstance(exact_rows, int) and exact_rows >= 1)
                                            or (isinstance(exact_rows, float) and 0 < exact_rows < 1)):
        raise ValueError(f"exact_rows={exact_rows!r} is not allowed: expected a number of rows >= 1 or a fraction "
                         f"of the lookups in (0, 1)")
    tables = [li for li, (_, m, _) in enumerate(targets) if li in weightings and isinstance(m, nn.Embedding)]
    if not tables:
        raise ValueError("exact_rows needs calibrated nn.Embedding layers: their lookup counts choose the rows")
    out = {}
    for li in tables:
        name, module, _ = targets[li]
        counts = calibration[name].row_counts.detach().double().cpu()
        order = torch.argsort(counts, descending=True, stable=True)
        if isinstance(exact_rows, int):
            k = exact_rows
        else:
            covered = counts[order].cumsum(0) / counts.sum().clamp_min(1e-300)
            k = int((covered < exact_rows).sum()) + 1
        out[li] = order[:min(k, module.num_embeddings - 1)]
    return out


def _modes(targets: list, shapes: Mapping | None, previous: dict[str, nn.Module],
           conv_modes: str) -> dict[str, tuple]:
    """``{name: (in_shape, out_shape)}`` of the layers whose modes are not the default: the caller's ``shapes``,
    an ``MPOLinear`` compressed anew keeping its own, and — with ``conv_modes="kernel"`` — each convolution's
    kernel modes."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {n for n, _, _ in targets}
    if unknown:
        raise ValueError(f"shapes names layers that are not converted: {sorted(unknown)}")
    for name, layer in previous.items():
        if isinstance(layer, MPOLinear):
            shapes.setdefault(name, (layer.in_shape, layer.out_shape))
    if conv_modes == "kernel":
        from ..layers.mpo_conv import kernel_modes

        for name, module, _ in targets:
            if isinstance(module, nn.Conv2d) and name not in shapes:
                shapes[name] = kernel_modes(module.in_channels // module.groups, module.out_channels,
                                            module.kernel_size)
    return shapes


def _rank_caps(rank, targets: list, layer_shapes: list) -> list:
    """Each target's bond caps from ``rank`` (one cap, per-bond caps, or ``{layer name: caps}``; ``None``: no cap),
    validated against its modes so that a bad value is reported under its own name."""
    if isinstance(rank, Mapping):
        unknown = set(rank) - {n for n, _, _ in targets}
        if unknown:
            raise ValueError(f"rank names layers that are not converted: {sorted(unknown)}")
        per_layer = [rank.get(name) for name, _, _ in targets]
    else:
        per_layer = [rank] * len(targets)
    return [None if r is None else inner_ranks(r, i, o, name="rank") for r, (i, o) in zip(per_layer, layer_shapes)]


def _smaller_only(truncate: Callable[[list[int]], dict[int, TTMatrix]], sizes: list[int],
                  allow_larger: bool) -> tuple[dict[int, TTMatrix], list[int], list[int]]:
    """``truncate`` the layers, then again without those whose TT-matrix is not smaller than what it replaces (a
    shared budget then goes to the others), until none grows (or ``allow_larger``). Returns the TT-matrices, the
    layers that become tensor networks and those kept as they were."""
    active, grew_all = list(range(len(sizes))), []
    while True:
        tts = truncate(active)
        grew = [li for li in active if tts[li].num_params >= sizes[li]]
        if allow_larger or not grew:
            return tts, active, grew_all
        active = [li for li in active if li not in grew]
        grew_all += grew
        if not active:
            return tts, active, grew_all


def tensorize(
    model: nn.Module,
    rank: int | Sequence[int] | Mapping[str, int | Sequence[int]] | None = None,
    rel_tol: float | None = None,
    ratio: float | None = None,
    skip: Skip = (),
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    allow_larger: bool = False,
    *,
    method: str = "mpo",
    depth: int = 2,
    fit_steps: int = 500,
    unitary: bool = False,
    mapping: str = "rowmajor",
    allocation: str | None = None,
    conv_modes: str = "matrix",
    calibration: Mapping[str, LayerStats] | None = None,
    exact_rows: int | float | None = None,
) -> tuple[nn.Module, TensorizeReport]:
    """A copy of ``model`` with its dense layers replaced by registered torchtn layers (TT-SVD of the trained weights).

    The rules come from the layer registry: ``nn.Linear`` → ``MPOLinear``, ``nn.Conv2d`` → ``MPOConv2d``,
    ``nn.Embedding`` → ``MPOEmbedding``; the projection matrices of an ``nn.MultiheadAttention`` (which reads them
    directly) are parametrized in place by ``MPOParametrization`` (:func:`~torchtn.layers.mpo_parametrize`).

    Give ``rank`` (cap on every bond; or ``{layer name: cap}`` per layer, layers not named then keep their full
    rank) and/or ``rel_tol`` (per-layer relative Frobenius error bound), or ``ratio``: a
    whole-model compression ``dense parameters / tensorized parameters``, reached by sharing one budget across the
    layers by their spectra (:func:`allocate_ranks`) — ``allocation="absolute"`` minimizes the total squared error
    of all weights, ``"relative"`` measures each layer's singular values in units of its own norm, so no layer is
    sacrificed for a larger-normed one (for pretrained transformers, whose layers differ in scale); the default,
    ``None``, is ``"relative"`` for a calibration without output sensitivity (each layer's weighted error is then in
    its own units) and ``"absolute"`` otherwise. ``skip``: module-name glob patterns (``"classifier*"``) or a
    callable ``(name, module) -> bool`` for layers to keep dense (a pattern that matches no module or parameter is
    refused: a typo would convert what it meant to keep); ``shapes``: ``{name: (in_shape, out_shape)}`` to
    override the default balanced 4-mode factorization; ``conv_modes="kernel"``: every ``nn.Conv2d`` not named in
    ``shapes`` gets the modes of its 4-D kernel's TT over ``(C_in, kh, kw, C_out)``, which run as four small
    convolutions (:func:`~torchtn.layers.mpo_conv.kernel_modes`). ``calibration`` (:func:`~torchtn.compress.calibrate`'s
    statistics, by layer name): those ``nn.Linear`` and ``nn.Embedding`` layers are truncated in the norm of their
    output error on the calibration data (inputs' Gram matrix; rows' lookup counts; with ``calibrate(output=)`` also
    the output's sensitivity, so the error is the model output's) — data-aware low-rank, held as a two-core MPO
    (:mod:`torchtn.core.weighting`) — with ``rel_tol`` and the ``ratio`` budget's spectra measured in that norm too;
    the report adds each layer's output error (relative, in that norm). ``exact_rows`` (calibrated tables only):
    the most looked-up rows stay exact beside the MPO of the others (:class:`~torchtn.layers.MPOEmbedding`'s
    ``exact_rows``) — that many rows (an int) or as many as cover that fraction of the lookups (a float in (0, 1));
    they count against ``ratio``'s budget as dense parameters. A layer whose MPO would hold as many parameters as
    the dense layer or more stays dense (the report says so; with ``ratio`` the budget is then shared by the others) unless
    ``allow_larger`` (e.g. for an exact full-rank conversion). Returns ``(new_model, report)``; the input is not
    modified.

    torchtn layers the model holds already (not ``skip``-ped) are compressed anew from the map they compute
    (:func:`~torchtn.layers.registry.densify`): an ``MPOLinear`` keeps its modes, so a smaller rank is the TT-SVD of
    its own matrix at them; a layer whose new form would not be smaller than it is now stays as it was; ``ratio``
    counts from the parameters the model holds now. Layers with no dense counterpart (t-product layers) stay.

    ``method="adtn"``: every ``nn.Linear`` and ``nn.Conv2d`` (after ``skip``) becomes an ``ADTNLinear`` /
    ``ADTNConv2d`` of ``depth`` brick layers (an ``nn.MultiheadAttention``'s projections: ``adtn_parametrize``),
    its generator first fitted to the trained weight (``fit_steps`` Adam steps; ``0``: no fit, the generators start
    fresh at PyTorch's variance, to train from scratch); the report's ``rel. error`` is that fit's; ``unitary``:
    orthogonal gates; ``mapping``: how the generated vector becomes the weight (``"rowmajor"``, ``"axes"``,
    ``"interleaved"``; :class:`~torchtn.layers.ADTNGenerator`). A layer whose generator would hold as many
    parameters as its weight or more stays dense (listed in the report), unless ``allow_larger``. Heal the model by
    fine-tuning afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrapped(model)  # a compiled or DDP-wrapped model: the one it wraps (its layers' own names)
    check_choice("method", method, ("mpo", "adtn"))
    check_not_pruned(model, "tensorized")  # (its copy would fail deep inside PyTorch)
    if allocation is None:
        allocation = "relative" if calibration and not sensitive(calibration) else "absolute"
    check_choice("allocation", allocation, ("absolute", "relative"))
    check_choice("conv_modes", conv_modes, ("matrix", "kernel"))
    check_skip(model, skip)
    if method == "adtn":
        if rank is not None or rel_tol is not None or ratio is not None or shapes:
            raise ValueError("method='adtn' takes depth= and fit_steps=, not rank=, rel_tol=, ratio= or shapes=")
        return _tensorize_adtn(model, depth, fit_steps, skip, check_choice("unitary", unitary, (False, True)),
                               check_choice("mapping", mapping, MAPPINGS), allow_larger)
    if unitary or mapping != "rowmajor":
        what = "unitary=True" if unitary else f"mapping={mapping!r}"
        raise ValueError(f"{what} is for method='adtn' (ADTN generators), not for MPO layers")
    rel_tol = check_rel_tol("rel_tol", rel_tol)
    ratio = check_ratio("ratio", ratio)
    if ratio is not None and (rank is not None or rel_tol is not None):
        raise ValueError("give either ratio, or rank and/or rel_tol — not both kinds")
    if ratio is None and rank is None and rel_tol is None:
        raise ValueError("tensorize needs rank=, rel_tol= or ratio= to know how much to compress")
    new = copy.deepcopy(model)
    # torchtn layers the model holds already are compressed anew, from the map they compute; an MPOLinear keeps its
    # modes (so a smaller rank is the TT-SVD of its own matrix at the same modes, as rounding would give)
    new, previous = densify_model(new, _skipper(skip))
    targets, kept = _targets(new, skip)
    kept += _parametrized_elsewhere(new)
    if not targets:
        from ..layers.registry import convertible_types

        kinds = ", ".join(sorted(f"nn.{c.__name__}" for c in convertible_types()))
        raise ValueError(f"the model has no layer that tensorize can convert ({kinds}; after skip)")
    shapes = _modes(targets, shapes, previous, conv_modes)
    weightings = _weightings(new, targets, calibration or {}, shapes)
    exact = _exact_ids(targets, calibration or {}, weightings, exact_rows)
    whole_weightings = dict(weightings)  # the errors of a table with exact rows are reported over all its rows
    rest: dict[int, torch.Tensor] = {}  # the rows the MPO of such a table holds
    for li, ids in exact.items():
        keep = torch.ones(targets[li][1].num_embeddings, dtype=torch.bool)
        keep[ids] = False
        rest[li] = keep.nonzero().squeeze(1)
        weightings[li] = weightings[li].rows(rest[li])
    layer_shapes = [two_core_shapes(len(rest[li]) if li in rest else module.weight.shape[0], module.weight.shape[1])
                    if li in weightings else cls.tt_shapes_for(module, *shapes.get(name, (None, None)))
                    for li, (name, module, cls) in enumerate(targets)]
    rank_caps = _rank_caps(rank, targets, layer_shapes)
    before = sum(p.numel() for p in model.parameters())
    def matrix(li: int, module: nn.Module, cls: type) -> torch.Tensor:
        """What layer ``li``'s cores hold: the registry's matrix, or a calibrated layer's weight (a table's MPO rows)."""
        if li not in weightings:
            return cls.dense_matrix(module)
        w = module.weight.detach()
        return w[rest[li].to(w.device)] if li in rest else w

    weights = [matrix(li, module, cls) for li, (_, module, cls) in enumerate(targets)]
    _check_finite([(name, w) for (name, _, _), w in zip(targets, weights)], "TT-SVD")
    # calibrated layers are truncated (and their budget shared) in the weighted space, and mapped back below
    fitted = [weightings[li].apply(w) if li in weightings else w for li, w in enumerate(weights)]
    # the parameters the cores replace (an embedding's matrix may be padded to a factorizable size: not counted)
    # (a layer compressed anew replaces what it held: never more than that, and so counted in the ratio's budget)
    sizes = [_replaced_params(name, module, cls.replaced_params(module) if hasattr(cls, "replaced_params")
                              and li not in rest else w.numel(), previous)
             for li, ((name, module, cls), w) in enumerate(zip(targets, weights))]

    def truncate(active: list[int]) -> dict[int, TTMatrix]:
        """The TT-matrices of the ``active`` layers, by rank / tolerance or by the shared budget, mapped back from
        the weighted space of calibrated layers."""
        if ratio is None:
            tts = {li: TTMatrix.from_dense(fitted[li], *layer_shapes[li], max_rank=rank_caps[li], rel_tol=rel_tol)
                   for li in active}
        else:
            tts = _fit_budget(before, ratio, fitted, sizes, layer_shapes, active, allocation)
        return {li: weightings[li].undo(tt).to(dtype=weights[li].dtype) if li in weightings else tt
                for li, tt in tts.items()}

    tts, active, grew = _smaller_only(truncate, sizes, allow_larger)
    larger = [targets[li][0] for li in grew]  # layers kept dense because their MPO would not be smaller
    rows = []
    for li in active:
        (name, module, cls), tt, (i, o), w = targets[li], tts[li], layer_shapes[li], weights[li]
        layer = cls.from_tt(module, tt, exact_ids=exact[li]) if li in exact else cls.from_tt(module, tt)
        if not isinstance(module, TensorSite):  # a site is parametrized in place by from_tt
            new = replace_submodule(new, name, layer)  # (the model itself when it is the one layer: name "")
        approx = tt.to_dense()
        if li in exact:  # measured over the whole table, its exact rows included
            w, approx = module.weight.detach(), layer.weight.detach()
        err = float(torch.linalg.vector_norm((approx - w).double()) / torch.linalg.vector_norm(w.double()))
        nb = sum(p.numel() for p in layer.parameters()) - tt.num_params  # bias, a table's exact rows
        out_err = whole_weightings[li].error(w, approx) if li in weightings else None
        rows.append(LayerReport(name, w.shape[0], w.shape[1], o, i, tt.ranks, sizes[li] + nb, tt.num_params + nb,
                                err, nb, cls.__name__, tuple(float(e) for e in tt.entanglement_entropy()),
                                output_error=out_err))
    for name in larger:  # a torchtn layer whose new MPO would not be smaller stays as it was
        if name in previous:
            new = put_back(new, name, previous[name])
    after = sum(p.numel() for p in new.parameters())
    kept += [f"{name} (as it was: its new MPO would not be smaller)" if name in previous
             else f"{name} (its MPO would not be smaller)" for name in larger]
    return new, TensorizeReport(rows, before, after, kept)

