"""Load a classifier from a torchvision name, a factory plus checkpoint, or an hpcq artifact.

A model source is a small JSON-able dict, so that a job (or an artifact's header) can rebuild the
architecture without pickling the model:

- ``{"kind": "torchvision", "name": "vgg16", "weights": "DEFAULT"}``: ``torchvision.models.get_model``;
  ``weights`` is a torchvision weights enum name (``"IMAGENET1K_V1"``, ``"DEFAULT"``) or ``None``.
- ``{"kind": "factory", "factory": "pkg.module:function", "kwargs": {...}, "checkpoint": "path.pt"}``.
- ``{"kind": "artifact", "path": "model.hpcq"}``: a compressed hpcq file.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcq.errors import ModelError

log = logging.getLogger(__name__)

SOURCE_KINDS = ("torchvision", "factory", "artifact")


def parse_model_source(text: str) -> dict[str, Any]:
    """Turn a command-line model string into a model source dict.

    ``vgg16`` or ``vgg16@IMAGENET1K_V1`` -> torchvision; ``pkg.mod:fn`` (optionally ``pkg.mod:fn=ckpt.pt``)
    -> factory; a path ending in ``.hpcq`` -> artifact.
    """
    if text.endswith(".hpcq"):
        return {"kind": "artifact", "path": text}
    if ":" in text:
        factory, _, checkpoint = text.partition("=")
        source: dict[str, Any] = {"kind": "factory", "factory": factory, "kwargs": {}}
        if checkpoint:
            source["checkpoint"] = checkpoint
        return source
    name, _, weights = text.partition("@")
    return {"kind": "torchvision", "name": name, "weights": weights or None}


def _resolve_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"factory {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for factory {spec!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ModelError(f"module {module_name!r} has no attribute {attr!r} (factory {spec!r})") from None
    if not callable(factory):
        raise ModelError(f"factory {spec!r} is not callable")
    return factory


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = [m for m in available if name.lower()[:3] in m][:8]
        raise ModelError(f"unknown torchvision model {name!r}; close names: {close or available[:10]}")
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"torchvision model {name!r} has no weights {weights!r}: {exc}") from exc


def build_architecture(model_source: Mapping[str, Any]) -> nn.Module:
    """Build the model's architecture with freshly initialised (not pretrained) parameters."""
    kind = model_source.get("kind")
    if kind == "torchvision":
        return _torchvision_model(model_source["name"], None)
    if kind == "factory":
        factory = _resolve_factory(model_source["factory"])
        return factory(**dict(model_source.get("kwargs") or {}))
    if kind == "artifact":
        from hpcq.artifact import load_artifact

        return load_artifact(Path(model_source["path"])).model
    raise ModelError(f"model source kind {kind!r} is not one of {SOURCE_KINDS}")


def load_checkpoint_into(model: nn.Module, checkpoint: Path) -> None:
    """Load a state dict from ``checkpoint`` into ``model`` without running pickled code."""
    if not checkpoint.is_file():
        raise ModelError(f"checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"checkpoint {checkpoint} needs code execution to load (it pickles more than tensors); "
            f"re-save it as a plain state dict: torch.save(model.state_dict(), path). Detail: {exc}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"checkpoint {checkpoint} cannot be read (truncated or not a torch file): {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelError(f"checkpoint {checkpoint} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"checkpoint {checkpoint} does not fit the architecture: {str(exc).splitlines()[0]} "
            f"{_describe_mismatch(model.state_dict(), state)}"
        ) from exc


def _describe_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, Any]) -> str:
    missing = [k for k in expected if k not in got][:5]
    unexpected = [k for k in got if k not in expected][:5]
    shapes = [
        f"{k}: model {tuple(v.shape)} vs checkpoint {tuple(got[k].shape)}"
        for k, v in expected.items()
        if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(v.shape)
    ][:5]
    return f"(missing {missing}, unexpected {unexpected}, shape mismatches {shapes})"


def load_model(model_source: Mapping[str, Any]) -> nn.Module:
    """Load the model a source describes, with its trained weights, in eval mode."""
    kind = model_source.get("kind")
    if kind == "torchvision":
        model = _torchvision_model(model_source["name"], model_source.get("weights"))
    elif kind == "factory":
        checkpoint = model_source.get("checkpoint")
        model = build_architecture(model_source) if checkpoint else None
        if checkpoint:
            load_checkpoint_into(model, Path(checkpoint))
        else:
            # Built under a fixed seed, so teacher and students of a run start from the same weights even when
            # the factory initialises randomly (a factory may also load trained weights itself).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = build_architecture(model_source)
            log.warning("factory %s has no checkpoint: its weights are whatever the factory makes (seed 0)",
                        model_source["factory"])
    elif kind == "artifact":
        model = build_architecture(model_source)
    else:
        raise ModelError(f"model source kind {kind!r} is not one of {SOURCE_KINDS}")
    return model.eval()
