"""What a model's tensor-network layers are: the tables ``torchtn inspect FILE`` prints for a file's layers and
:func:`summary` for a model in memory — per registered layer its type and parameters, and per bond of each
tensor train its rank, entanglement entropy and the error one rank less would cause."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ._modules import unwrapped
from .io import tensor_name
from .layers import type_name
from .report import format_table

__all__ = ["summary", "layer_tables"]

LEGEND = ("ratio = dense weight entries / core entries; entropy in nats (ln r for a flat spectrum); error = ‖W − W'‖/‖W‖ "
          "if that bond alone lost one rank")


def registered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` for every registered torchtn layer or parametrization in ``model`` (``model`` itself
    included, under ``""``, when it is one)."""
    return {name: m for name, m in model.named_modules() if type_name(m) is not None}


def layer_tables(layers: Mapping[str, nn.Module]) -> tuple[list[str], dict[str, list[float]]]:
    """The text blocks describing ``layers`` (``{name: registered layer}``, names as in a ``state_dict``) and, for
    plotting, the entropy per bond of each tensor train (``{name: [S_1, …]}``).

    Blocks: layers without tensor-train bonds (t-product layers, ADTNs, …) as type, layout, parameters and — where a
    layer states it — what its count holds; then one row per bond of every tensor train, and the legend.
    """
    if not layers:
        return ["no tensor-network layers"], {}
    networks = {name: layer.tt_matrices() for name, layer in layers.items()}
    blocks = []
    plain = [(tensor_name(name), type_name(layer),
              ", ".join(f"{k}={v}" for k, v in layer.layout().items()),
              sum(p.numel() for p in layer.parameters()), _counted(layer))
             for name, layer in layers.items() if not networks[name]]
    if plain:
        counted = any(row[-1] for row in plain)
        blocks.append(format_table(["layer", "type", "layout", "parameters",
                                    *(["what is counted"] if counted else [])],
                                   [row if counted else row[:-1] for row in plain]))
        if len(plain) == len(layers):
            return blocks, {}
    rows, entropies = [], {}
    for name, nets in networks.items():
        for label, tt in nets.items():
            base = tensor_name(name)
            full = f"{base}.{label}" if label else base
            info = tt.to(dtype=torch.float64).bond_report()
            if not info:  # one core: the dense matrix, no bond
                rows.append((full, type_name(layers[name]), f"{tt.out_shape}←{tt.in_shape}",
                             round(tt.compression_ratio, 1), "–", "one core", "–", "–"))
                continue
            entropies[full] = [b.entropy for b in info]
            for b in info:
                rows.append((full, type_name(layers[name]), f"{tt.out_shape}←{tt.in_shape}",
                             round(tt.compression_ratio, 1), b.bond, b.rank, round(b.entropy, 4), b.next_rank_error))
    blocks.append(format_table(["layer", "type", "modes (out←in)", "ratio", "bond", "rank", "entropy S_k",
                                "error at rank−1"], rows))
    blocks.append(LEGEND)
    return blocks, entropies


def summary(model: nn.Module) -> str:
    """A readable summary of ``model``'s tensor-network layers — the tables ``torchtn inspect`` prints for a saved
    file, for a model in memory: ``print(torchtn.summary(model))``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrapped(model)
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        blocks, _ = layer_tables(registered_layers(model))
    return "\n".join([f"{type(model).__name__} with {total:,} parameters", *blocks])


def _counted(layer: nn.Module) -> str:
    """A layer's parameter accounting, for layers that state it (ADTNs: gates + scale + bias, against the dense
    entries they replace); empty otherwise."""
    report = getattr(layer, "param_report", None)
    if not report:
        return ""
    parts = [f"{report[k]:,} {k}" for k in ("gates", "scale", "bias") if report.get(k)]
    live = f"; {report['live']:,} of the generator's {report['generator']:,} can change the weight" \
        if report.get("live", report.get("generator")) != report.get("generator") else ""
    return f"{' + '.join(parts)} (for {report['dense_weight']:,} dense weights{live})"
