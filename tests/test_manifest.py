"""The layer manifest: paper numbering, forward order, selection errors."""

import pytest
import torch
import torchvision
from torch import nn

from hpcq.errors import ConfigError
from hpcq.manifest import build_manifest, format_manifest, select_layers
from hpcq.zoo import fashion_vgg


def test_vgg16_numbering_matches_the_paper():
    manifest = build_manifest(torchvision.models.vgg16(), torch.zeros(1, 3, 224, 224))
    assert len(manifest) == 16
    assert [r.type for r in manifest[:13]] == ["Conv2d"] * 13
    assert manifest[13].name == "classifier.0" and manifest[13].number == 14
    assert manifest[14].name == "classifier.3" and manifest[14].number == 15
    assert manifest[13].weight_count == 25088 * 4096
    assert [r.name for r in select_layers(manifest, "14-15")] == ["classifier.0", "classifier.3"]


def test_resnet50_has_54_layers_and_13_to_49_selects_37():
    manifest = build_manifest(torchvision.models.resnet50(), torch.zeros(1, 3, 224, 224))
    assert len(manifest) == 54
    assert sum(r.type == "Conv2d" for r in manifest) == 53
    assert sum(r.name.endswith("downsample.0") for r in manifest) == 4
    assert manifest[-1].name == "fc" and manifest[0].name == "conv1"
    assert len(select_layers(manifest, "13-49")) == 37
    # The shortcut convolution runs after conv3 of its block (torchvision's Bottleneck.forward).
    names = [r.name for r in manifest]
    assert names.index("layer2.0.downsample.0") == names.index("layer2.0.conv3") + 1


class RegisteredOutOfOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.stem = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.head(self.bn(self.stem(x)))


def test_forward_order_beats_registration_order_and_batchnorm_is_not_numbered():
    model = RegisteredOutOfOrder()
    traced = build_manifest(model, torch.zeros(2, 4))
    assert [r.name for r in traced] == ["stem", "head"]
    assert [r.name for r in build_manifest(model)] == ["head", "stem"]
    assert abs(sum(r.share_pct for r in traced) - 100 * (40 + 18) / (40 + 18 + 16)) < 1e-9


def test_selectors_by_name_glob_type_and_lists():
    manifest = build_manifest(fashion_vgg(), torch.zeros(1, 1, 28, 28))
    assert len(manifest) == 7
    assert [r.number for r in select_layers(manifest, "fc")] == [5, 6, 7]
    assert [r.number for r in select_layers(manifest, "conv")] == [1, 2, 3, 4]
    assert [r.number for r in select_layers(manifest, "classifier.*")] == [5, 6, 7]
    assert [r.number for r in select_layers(manifest, ["1,3", "type:Linear"])] == [1, 3, 5, 6, 7]
    assert [r.number for r in select_layers(manifest, "features.0")] == [1]
    assert "7 layers" in format_manifest(manifest)


@pytest.mark.parametrize(("selector", "fragment"), [("8", "layers 1-7"), ("0-2", "layers 1-7"),
                                                     ("5-3", "outside"), ("head.*", "matches no layer")])
def test_bad_selectors_say_what_exists(selector, fragment):
    manifest = build_manifest(fashion_vgg(), torch.zeros(1, 1, 28, 28))
    with pytest.raises(ConfigError, match=fragment):
        select_layers(manifest, selector)
