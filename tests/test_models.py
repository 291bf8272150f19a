"""Model loading from the three kinds of source, and its errors."""

import pickle

import pytest
import torch

from hpcq.errors import ModelError
from hpcq.models import load_model, parse_model_source
from hpcq.zoo import fashion_vgg

from .conftest import SMALL_KWARGS


def factory_source(checkpoint, **kwargs):
    return {"kind": "factory", "factory": "hpcq.zoo:fashion_vgg", "kwargs": kwargs or SMALL_KWARGS,
            "checkpoint": str(checkpoint)}


def test_factory_with_checkpoint_loads_its_weights(small_checkpoint):
    model = load_model(factory_source(small_checkpoint))
    state = torch.load(small_checkpoint, weights_only=True)
    assert torch.equal(model.state_dict()["classifier.1.weight"], state["classifier.1.weight"])
    assert not model.training


def test_parse_model_source():
    assert parse_model_source("vgg16") == {"kind": "torchvision", "name": "vgg16", "weights": None}
    assert parse_model_source("resnet50@IMAGENET1K_V1")["weights"] == "IMAGENET1K_V1"
    assert parse_model_source("a.b:f=x.pt") == {"kind": "factory", "factory": "a.b:f", "kwargs": {},
                                                "checkpoint": "x.pt"}
    assert parse_model_source("m.hpcq") == {"kind": "artifact", "path": "m.hpcq"}


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(factory_source(tmp_path / "nope.pt"))


def test_checkpoint_that_does_not_fit(small_checkpoint):
    with pytest.raises(ModelError, match="does not fit the architecture.*shape mismatches"):
        load_model(factory_source(small_checkpoint, width=8, hidden=32))


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    torch.save({"model": Evil()}, tmp_path / "evil2.pt")
    for bad in (path, tmp_path / "evil2.pt"):
        with pytest.raises(ModelError):
            load_model(factory_source(bad))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(fashion_vgg(**SMALL_KWARGS).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(factory_source(path))


@pytest.mark.parametrize(("source", "fragment"), [
    ({"kind": "torchvision", "name": "vgg17"}, "unknown torchvision model"),
    ({"kind": "torchvision", "name": "vgg16", "weights": "NOPE"}, "has no weights"),
    ({"kind": "factory", "factory": "hpcq.zoo"}, "package.module:function"),
    ({"kind": "factory", "factory": "hpcq.nope:f"}, "cannot import"),
    ({"kind": "factory", "factory": "hpcq.zoo:nope"}, "no attribute"),
    ({"kind": "onnx"}, "not one of"),
])
def test_bad_sources(source, fragment):
    with pytest.raises(ModelError, match=fragment):
        load_model(source)
