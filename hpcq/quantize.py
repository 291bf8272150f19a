"""Apply a quantization plan to a model in place: every planned parameter becomes codebook values."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from hpcq.config import KMeansConfig, QuantizeConfig
from hpcq.errors import ConfigError, QuantizationError
from hpcq.kmeans import fit_codebook
from hpcq.manifest import LayerInfo, parameter_owners, select_layers, shared_weight_layers
from hpcq.qtensor import QuantizedTensor

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Plan:
    """Number of centroids per layer, for weights and for biases (layer name -> k)."""

    weights: dict[str, int] = field(default_factory=dict)
    biases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return {"weights": dict(self.weights), "biases": dict(self.biases)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        """Inverse of ``to_dict``."""
        return cls(weights={str(k): int(v) for k, v in data.get("weights", {}).items()},
                   biases={str(k): int(v) for k, v in data.get("biases", {}).items()})

    def parameters(self) -> dict[str, int]:
        """Parameter name (``layer.weight`` / ``layer.bias``) -> k."""
        out = {f"{name}.weight": k for name, k in self.weights.items()}
        out.update({f"{name}.bias": k for name, k in self.biases.items()})
        return out


def _resolve(manifest: Sequence[LayerInfo], rules: Mapping, with_bias: bool) -> dict[str, int]:
    # Tied weights: every layer sharing one weight tensor stands for it under one name, so a later rule
    # that names any of them overrides earlier ones for the shared tensor.
    stands_for = {row.name: row.name for row in manifest} if with_bias else shared_weight_layers(manifest)
    chosen: dict[str, int] = {}
    for selector, k in rules.items():
        rows = select_layers(manifest, str(selector))
        for row in rows:
            if with_bias and row.bias_count == 0:
                continue
            chosen[stands_for[row.name]] = int(k)
    order = {row.name: row.number for row in manifest}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))


def resolve_plan(manifest: Sequence[LayerInfo], config: QuantizeConfig) -> Plan:
    """Turn the spec's selector -> k rules into a per-layer plan (later rules override earlier ones)."""
    plan = Plan(weights=_resolve(manifest, config.weights, False), biases=_resolve(manifest, config.biases, True))
    if not plan.weights and not plan.biases:
        raise ConfigError("the quantization plan selects no parameter; set quantize.weights, e.g. {'14-15': 32}")
    return plan


def quantize_tensor(values: torch.Tensor, k: int, kmeans: KMeansConfig,
                    sample_weight: torch.Tensor | None = None) -> QuantizedTensor:
    """Fit a k-centroid codebook to one tensor and return it quantized."""
    fit = fit_codebook(
        values, k, method=kmeans.method, sample_weight=sample_weight, bins=kmeans.bins, niter=kmeans.niter,
        seed=kmeans.seed, max_points_per_centroid=kmeans.max_points_per_centroid, device=kmeans.device,
    )
    indices = torch.from_numpy(fit.assignments).reshape(values.shape)
    return QuantizedTensor(codebook=torch.from_numpy(fit.centroids), indices=indices)


def apply_quantized_(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> None:
    """Write each quantized tensor's values into the model's parameter and freeze that parameter."""
    params = dict(model.named_parameters())
    for name, qt in quantized.items():
        if name not in params:
            raise QuantizationError(f"the model has no parameter {name!r} to quantize")
        param = params[name]
        with torch.no_grad():
            param.copy_(qt.dequantize().to(param.device, param.dtype))
        param.requires_grad_(False)


def quantize_(
    model: nn.Module,
    plan: Plan,
    kmeans: KMeansConfig,
    sample_weights: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, QuantizedTensor]:
    """Quantize the planned parameters of ``model`` in place and freeze them.

    Returns the quantized tensors by parameter name (``classifier.0.weight``); the model's parameters hold
    their dequantized values afterwards. ``sample_weights`` optionally weigh each value's error per parameter.
    """
    params = dict(model.named_parameters())
    targets = _shared_parameters_once(model, plan.parameters())
    missing = [name for name in targets if name not in params]
    if missing:
        raise QuantizationError(f"the plan names parameters the model does not have: {missing[:5]}")
    quantized: dict[str, QuantizedTensor] = {}
    for name, k in tqdm(targets.items(), desc="quantize", unit="tensor", disable=not progress):
        weight = None if sample_weights is None else sample_weights.get(name)
        try:
            quantized[name] = quantize_tensor(params[name].detach(), k, kmeans, weight)
        except QuantizationError as exc:
            raise QuantizationError(f"{name}: {exc}") from exc
        log.debug("quantized %s to k=%d", name, k)
    apply_quantized_(model, quantized)
    return quantized


def _shared_parameters_once(model: nn.Module, targets: Mapping[str, int]) -> dict[str, int]:
    """The plan's parameter names, with every alias of a shared (tied) parameter replaced by the name
    ``named_parameters()`` lists it under; an alias and its owner planned with different k is an error."""
    alias_to_owner = parameter_owners(model)
    resolved: dict[str, int] = {}
    for name, k in targets.items():
        owner = alias_to_owner.get(name, name)
        if resolved.setdefault(owner, k) != k:
            raise QuantizationError(
                f"{name} and {owner} are one shared tensor (tied weights) but are planned with different "
                f"numbers of centroids ({k} and {resolved[owner]}); give them the same k"
            )
    return resolved


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that still train (the non-quantized ones)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
