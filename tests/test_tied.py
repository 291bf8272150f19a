"""Tied weights (one parameter under two layer names): listed, planned, quantized, counted and stored once."""

import pytest
import safetensors
import torch
from torch import nn

from hpcq.artifact import load_artifact, save_artifact
from hpcq.config import KMeansConfig, QuantizeConfig, SweepConfig
from hpcq.errors import QuantizationError
from hpcq.manifest import build_manifest, format_manifest
from hpcq.quantize import Plan, quantize_, resolve_plan
from hpcq.sizes import model_sizes, shared_entries
from hpcq.sweep import plan_tasks


class TiedNet(nn.Module):
    """Two square layers sharing one weight matrix (biases separate), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encode = nn.Linear(16, 16)
        self.decode = nn.Linear(16, 16)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.decode(torch.relu(self.encode(x)))))


EXAMPLE = torch.zeros(1, 16)


def test_manifest_marks_the_tied_layer_and_counts_its_weights_once():
    manifest = build_manifest(TiedNet(), EXAMPLE)
    assert [(row.name, row.tied_to) for row in manifest] == [("encode", ""), ("decode", "encode"), ("head", "")]
    assert sum(row.share_pct for row in manifest) == pytest.approx(100.0)
    assert "weight tied to encode" in format_manifest(manifest)


def test_plan_quantizes_a_tied_weight_once_and_refuses_two_ks():
    manifest = build_manifest(TiedNet(), EXAMPLE)
    plan = resolve_plan(manifest, QuantizeConfig(weights={"all": 4}, biases={}))
    assert plan.weights == {"encode": 4, "head": 4}
    only_alias = resolve_plan(manifest, QuantizeConfig(weights={"decode": 4}, biases={}))
    assert only_alias.weights == {"encode": 4}
    # One tensor, one k: a later rule naming either layer overrides an earlier one, as for any layer.
    overridden = resolve_plan(manifest, QuantizeConfig(weights={"all": 4, "decode": 8}, biases={}))
    assert overridden.weights == {"encode": 8, "head": 4}
    # The sweep measures the shared tensor once, under the first layer.
    tasks = plan_tasks("run", manifest, SweepConfig(ks=(2,), layers="decode,head"))
    assert [t.layer for t in tasks] == ["encode", "head"]


def test_quantize_through_the_alias_changes_both_layers():
    model = TiedNet()
    quantized = quantize_(model, Plan(weights={"decode": 4}), KMeansConfig(), progress=False)
    assert list(quantized) == ["encode.weight"]
    assert model.decode.weight is model.encode.weight
    assert model.encode.weight.unique().numel() <= 4 and not model.encode.weight.requires_grad
    with pytest.raises(QuantizationError, match="one shared tensor"):
        quantize_(TiedNet(), Plan(weights={"decode": 4, "encode": 2}), KMeansConfig(), progress=False)


def test_sizes_and_artifact_store_the_shared_tensor_once(tmp_path):
    model = TiedNet()
    quantized = quantize_(model, Plan(weights={"encode": 4, "head": 2}), KMeansConfig(), progress=False)
    state = model.state_dict()
    assert shared_entries(state) == {"decode.weight": "encode.weight"}
    sizes = model_sizes(state, quantized)
    assert sizes.fp32_bytes == 4 * sum(p.numel() for p in model.parameters())  # parameters() lists it once

    path = tmp_path / "tied.hpcq"
    report = save_artifact(path, model, quantized, model_source={"kind": "test"})
    assert report == sizes
    with safetensors.safe_open(str(path), "pt") as stored:
        names = set(stored.keys())
    assert "decode.weight" not in names and "encode.weight::indices" in names
    loaded = load_artifact(path, build_model=lambda source: TiedNet())
    assert loaded.header["aliases"] == {"decode.weight": "encode.weight"}
    x = torch.randn(8, 16)
    model.eval()
    assert torch.equal(loaded.model(x), model(x))


class DecodeRegisteredFirst(nn.Module):
    """The tied pair registered in the opposite order to the one it runs in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.decode = nn.Linear(16, 16)
        self.encode = nn.Linear(16, 16)
        self.encode.weight = self.decode.weight
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.decode(torch.relu(self.encode(x)))))


class HeadTiedToEmbedding(nn.Module):
    """A classifier head sharing its weight with an embedding, which is not a quantizable layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize(("model_class", "owner", "tied"), [
    (DecodeRegisteredFirst, "decode", {"encode": "decode"}),
    (HeadTiedToEmbedding, "embed", {"head": "embed"}),
])
def test_owner_is_who_named_parameters_reaches_first(model_class, owner, tied):
    model = model_class()
    manifest = build_manifest(model, EXAMPLE)
    assert {row.name: row.tied_to for row in manifest if row.tied_to} == tied
    plan = resolve_plan(manifest, QuantizeConfig(weights={"all": 4}, biases={}))
    tasks = plan_tasks("run", manifest, SweepConfig(ks=(2,), layers="all"))
    assert [t.layer for t in tasks] == list(plan.weights)  # each tensor swept once, under the plan's name
    quantized = quantize_(model, plan, KMeansConfig(), progress=False)
    assert f"{owner}.weight" in quantized and len(quantized) == len(plan.weights)
    assert model_sizes(model.state_dict(), quantized).fp32_bytes == 4 * sum(p.numel() for p in model.parameters())
