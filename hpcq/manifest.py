"""The layer manifest: every convolution and fully connected layer, numbered from 1 in forward order.

The paper counts layers the way they run: for torchvision's VGG-16, layers 1-13 are the convolutions and
14-16 the fully connected layers; for ResNet-50 the stem convolution is 1, then each bottleneck's conv1,
conv2, conv3 and (in the first block of a stage) its shortcut convolution ``downsample.0``, 53 convolutions
in all, then the classifier as 54. BatchNorm and other layers stay float and get no number.

The order is the order in which the layers first run on an example input (forward hooks), so a model
that registers modules in another order than it calls them is still numbered as it runs. Without an
example input, registration order is used.

A layer whose weight is the very tensor of another module's weight (tied weights) keeps its number but
is marked ``tied_to`` the module that owns it (the first one ``named_parameters()`` reaches it from): the
shared tensor is stored, counted, swept and quantized once.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hpcq.errors import ConfigError

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
TYPE_ALIASES = {"conv": ("Conv1d", "Conv2d", "Conv3d"), "fc": ("Linear",), "linear": ("Linear",)}


@dataclass(frozen=True)
class LayerInfo:
    """One numbered layer of the manifest."""

    number: int
    name: str
    type: str
    weight_count: int
    bias_count: int
    share_pct: float
    tied_to: str = ""

    def to_dict(self) -> dict:
        """A JSON-able dict of the row."""
        return asdict(self)


def _execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE_TYPES):
            handles.append(
                module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name) if name not in order else None)
            )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(example_input)
            except RuntimeError as exc:
                raise ConfigError(
                    f"the model does not run on an example input of shape {tuple(example_input.shape[1:])} "
                    f"({str(exc).splitlines()[0]}); set model.input_shape (or --input-shape) to its C,H,W, "
                    "e.g. 3,224,224"
                ) from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order


def parameter_owners(model: nn.Module) -> dict[str, str]:
    """Every parameter name, aliases of a shared (tied) tensor included -> the name ``named_parameters()``
    lists that tensor under (the first one it reaches it from)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(param), name)
            for name, param in model.named_parameters(remove_duplicate=False)}


def build_manifest(model: nn.Module, example_input: torch.Tensor | None = None) -> list[LayerInfo]:
    """Number the model's convolution and linear layers in forward order (see the module docstring)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)}
    names = list(modules)
    if example_input is not None:
        ran = _execution_order(model, example_input)
        # Layers that never ran on the example keep their registration order, after the ones that did.
        names = ran + [n for n in names if n not in ran]
    total = sum(p.numel() for p in model.parameters()) or 1  # parameters() lists a tied tensor once
    # A shared tensor belongs to the first module named_parameters() reaches it from (registration order,
    # as state_dict() and quantize_ see it), which may come later in forward order, or not be a layer here.
    owners = parameter_owners(model)
    rows = []
    for number, name in enumerate(names, start=1):
        module = modules[name]
        weight_count = module.weight.numel()
        bias_count = module.bias.numel() if module.bias is not None else 0
        owner = owners[f"{name}.weight"].rsplit(".", 1)[0]
        tied_to = "" if owner == name else owner
        # A tied layer's weights are already counted with their owner.
        counted = (0 if tied_to else weight_count) + bias_count
        rows.append(
            LayerInfo(
                number=number,
                name=name,
                type=type(module).__name__,
                weight_count=weight_count,
                bias_count=bias_count,
                share_pct=100.0 * counted / total,
                tied_to=tied_to,
            )
        )
    return rows


def shared_weight_layers(manifest: Sequence[LayerInfo]) -> dict[str, str]:
    """Every layer -> the layer that stands for its weight tensor: itself, or for tied weights the owner
    when the owner is a layer here, else the first layer (in manifest order) tied to that owner."""
    names = {row.name for row in manifest}
    first_of_owner: dict[str, str] = {}
    for row in manifest:
        if row.tied_to and row.tied_to not in names:
            first_of_owner.setdefault(row.tied_to, row.name)
    return {row.name: (row.tied_to and (row.tied_to if row.tied_to in names else first_of_owner[row.tied_to]))
            or row.name for row in manifest}


_RANGE = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def _match_one(selector: str, manifest: Sequence[LayerInfo]) -> list[LayerInfo]:
    selector = selector.strip()
    match = _RANGE.match(selector)
    if match:
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first > last or first < 1 or last > len(manifest):
            raise ConfigError(
                f"layer range {selector!r} is outside the manifest: the model has layers 1-{len(manifest)}"
            )
        return [row for row in manifest if first <= row.number <= last]
    lowered = selector.lower()
    if lowered == "all":
        return list(manifest)
    if lowered.startswith("type:") or lowered in TYPE_ALIASES:
        wanted = selector.split(":", 1)[-1]
        types = TYPE_ALIASES.get(wanted.lower(), (wanted,))
        return [row for row in manifest if row.type in types]
    return [row for row in manifest if row.name == selector or fnmatch.fnmatchcase(row.name, selector)]


def select_layers(manifest: Sequence[LayerInfo], selectors: Iterable[str] | str) -> list[LayerInfo]:
    """Layers matched by any selector, in manifest order.

    A selector is a number or range (``14``, ``14-15``, ``13-49``), a comma list of those, an exact layer
    name, a glob over names (``classifier.*``), or a type (``conv``, ``fc``/``linear``, ``type:Conv2d``).
    A selector that matches nothing is an error that lists what exists.
    """
    if isinstance(selectors, str):
        selectors = [selectors]
    chosen: set[int] = set()
    for group in selectors:
        for selector in str(group).split(","):
            if not selector.strip():
                continue
            matched = _match_one(selector, manifest)
            if not matched:
                names = ", ".join(row.name for row in manifest[:12])
                raise ConfigError(
                    f"layer selector {selector!r} matches no layer; the model has layers 1-{len(manifest)} "
                    f"(names like {names}{', ...' if len(manifest) > 12 else ''}; types conv, fc). "
                    "Run `hpcq layers MODEL` to list them."
                )
            chosen.update(row.number for row in matched)
    return [row for row in manifest if row.number in chosen]


def format_manifest(manifest: Sequence[LayerInfo]) -> str:
    """The manifest as an aligned text table, as ``hpcq layers`` prints it."""
    width = max([len(r.name) for r in manifest] + [4])
    lines = [f"{'#':>3}  {'name':<{width}}  {'type':<7}  {'weights':>11}  {'biases':>7}  {'share %':>7}"]
    for r in manifest:
        tied = f"  weight tied to {r.tied_to}" if r.tied_to else ""
        lines.append(
            f"{r.number:>3}  {r.name:<{width}}  {r.type:<7}  {r.weight_count:>11,}  {r.bias_count:>7,}  "
            f"{r.share_pct:>7.2f}{tied}"
        )
    total = sum((0 if r.tied_to else r.weight_count) + r.bias_count for r in manifest)
    lines.append(f"{len(manifest)} layers, {total:,} weights and biases in them")
    return "\n".join(lines)
