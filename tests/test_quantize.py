"""quantize_: plans, in-place quantization, frozen layers, round trip through the artifact."""

import pytest
import torch
import torchvision

from hpcq.artifact import load_artifact, save_artifact
from hpcq.config import KMeansConfig, QuantizeConfig
from hpcq.errors import ConfigError, QuantizationError
from hpcq.manifest import build_manifest
from hpcq.quantize import Plan, quantize_, resolve_plan, trainable_parameter_names
from hpcq.sizes import model_sizes
from hpcq.zoo import fashion_vgg

from .conftest import SMALL_KWARGS


def small_model():
    torch.manual_seed(0)
    return fashion_vgg(**SMALL_KWARGS).eval()


def test_paper_plans_resolve_on_torchvision_models():
    vgg = build_manifest(torchvision.models.vgg16(), torch.zeros(1, 3, 224, 224))
    plan = resolve_plan(vgg, QuantizeConfig(weights={"14-15": 32}, biases={"all": 1}))
    assert plan.weights == {"classifier.0": 32, "classifier.3": 32}
    assert len(plan.biases) == 16 and set(plan.biases.values()) == {1}
    resnet = build_manifest(torchvision.models.resnet50(), torch.zeros(1, 3, 224, 224))
    plan = resolve_plan(resnet, QuantizeConfig(weights={"13-49": 256}, biases={"all": 1}))
    assert len(plan.weights) == 37 and plan.biases == {"fc": 1}  # ResNet convolutions have no bias


def test_later_rules_override_earlier_ones_and_bad_selectors_fail():
    manifest = build_manifest(small_model(), torch.zeros(1, 1, 28, 28))
    plan = resolve_plan(manifest, QuantizeConfig(weights={"all": 8, "fc": 4, "7": 16}, biases={}))
    assert [plan.weights[r.name] for r in manifest] == [8, 8, 8, 8, 4, 4, 16]
    with pytest.raises(ConfigError, match="outside the manifest"):
        resolve_plan(manifest, QuantizeConfig(weights={"12": 8}))
    with pytest.raises(ConfigError, match="matches no layer"):
        resolve_plan(manifest, QuantizeConfig(weights={"head.*": 8}))
    with pytest.raises(ConfigError, match="selects no parameter"):
        resolve_plan(manifest, QuantizeConfig(weights={}, biases={}))


def test_quantize_in_place_freezes_and_limits_distinct_values():
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = Plan(weights={"classifier.1": 4, "features.3": 2}, biases={"classifier.1": 1})
    quantized = quantize_(model, plan, KMeansConfig(), progress=False)
    params = dict(model.named_parameters())
    assert set(quantized) == {"classifier.1.weight", "features.3.weight", "classifier.1.bias"}
    for name, qt in quantized.items():
        assert torch.equal(params[name].detach(), qt.dequantize())
        assert params[name].unique().numel() <= qt.k
        assert not params[name].requires_grad
    assert params["classifier.1.bias"].unique().numel() == 1
    assert torch.equal(params["classifier.4.weight"], before["classifier.4.weight"])
    trainable = trainable_parameter_names(model)
    assert "classifier.4.weight" in trainable and "classifier.1.weight" not in trainable


def test_quantized_model_round_trips_through_the_artifact_exactly(tmp_path):
    model = small_model()
    plan = Plan(weights={"classifier.1": 16, "classifier.4": 8, "features.0": 3}, biases={"classifier.1": 1})
    quantized = quantize_(model, plan, KMeansConfig(), progress=False)
    source = {"kind": "factory", "factory": "hpcq.zoo:fashion_vgg", "kwargs": SMALL_KWARGS}
    sizes = save_artifact(tmp_path / "m.hpcq", model, quantized, model_source=source, plan=plan.to_dict())
    loaded = load_artifact(tmp_path / "m.hpcq")  # rebuilt through hpcq.models.build_architecture
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.header["plan"] == plan.to_dict()
    assert sizes.bitpacked_bytes < sizes.fp32_bytes
    assert sizes == model_sizes(model.state_dict(), quantized)


def test_plan_naming_a_missing_parameter_fails():
    with pytest.raises(QuantizationError, match="does not have"):
        quantize_(small_model(), Plan(weights={"nope": 4}), KMeansConfig(), progress=False)


def test_faiss_backend_through_quantize():
    model = small_model()
    quantized = quantize_(model, Plan(weights={"classifier.1": 8}), KMeansConfig(method="faiss", niter=10),
                          progress=False)
    assert quantized["classifier.1.weight"].k == 8
