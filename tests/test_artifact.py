"""The compressed artifact: exact round trips, no pickle, and clear errors for every kind of bad file."""

import json
import struct
import sys
import types

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from hpcq.artifact import (
    FORMAT_VERSION,
    ArchitectureMismatchError,
    load_artifact,
    read_header,
    save_artifact,
)
from hpcq.errors import ArtifactError, ModelError
from hpcq.qtensor import QuantizedTensor
from hpcq.sizes import model_sizes

SOURCE = {"kind": "factory", "factory": "tests.test_artifact:TinyNet", "kwargs": {"width": 8}}
# parameter -> k; 300 centroids take 9 bits (indices come back as int16)
PLAN = {
    "conv0.weight": 5,
    "conv0.bias": 1,
    "conv1.weight": 300,
    "conv1.bias": 2,
    "fc1.weight": 256,
    "fc2.weight": 32,
}


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, extra_layer: bool = False, drop_fc2: bool = False):
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        if extra_layer:
            self.fc_extra = nn.Linear(64, 64)
        if not drop_fc2:
            self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def build(source: dict) -> nn.Module:
    assert source["kind"] == "factory"
    torch.manual_seed(12345)  # weights of the freshly built model must not matter
    return TinyNet(**source["kwargs"])


def quantize_tensor(weight: torch.Tensor, k: int, gen: torch.Generator) -> QuantizedTensor:
    """A stand-in for k-means: k sorted centroids drawn from the weights, nearest-centroid indices."""
    flat = weight.detach().flatten()
    codebook = torch.sort(flat[torch.randperm(flat.numel(), generator=gen)[:k]]).values.float()
    indices = torch.bucketize(flat, (codebook[1:] + codebook[:-1]) / 2).reshape(weight.shape)
    return QuantizedTensor(codebook=codebook, indices=indices)


@pytest.fixture
def quantized_model():
    """(model holding the dequantized weights, its QuantizedTensors), with trained BatchNorm statistics."""
    torch.manual_seed(0)
    model = TinyNet(**SOURCE["kwargs"])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 12, 12))
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    quantized = {name: quantize_tensor(params[name], k, gen) for name, k in PLAN.items()}
    with torch.no_grad():
        for name, qt in quantized.items():
            params[name].copy_(qt.dequantize())
    return model.eval(), quantized


@pytest.fixture
def saved(tmp_path, quantized_model):
    model, quantized = quantized_model
    path = tmp_path / "model.hpcq"
    save_artifact(path, model, quantized, model_source=SOURCE, plan={"k": PLAN}, extra={"note": "test"})
    return path


def rewrite(src, dst, *, header_update=None, metadata=None, tensors_update=None):
    """Re-save an artifact with safetensors directly, changing its header, metadata or tensors."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = dict(f.metadata())
    header = json.loads(meta["hpcq"])
    header.update(header_update or {})
    meta["hpcq"] = json.dumps(header)
    tensors.update(tensors_update or {})
    safetensors.torch.save_file(tensors, str(dst), metadata=meta if metadata is None else metadata)


def data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# --- round trip -------------------------------------------------------------------------------------------


def test_round_trip_gives_identical_outputs_and_tensors(saved, quantized_model):
    model, quantized = quantized_model
    loaded = load_artifact(saved, build)
    assert type(loaded.model) is TinyNet and not loaded.model.training
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert set(loaded.quantized) == set(quantized)
    for name, qt in quantized.items():
        got = loaded.quantized[name]
        assert got.k == qt.k and got.bits == qt.bits and got.shape == qt.shape
        assert got.codebook.dtype == torch.float32 and torch.equal(got.codebook, qt.codebook)
        assert torch.equal(got.indices, qt.indices)
        assert torch.equal(got.dequantize(), qt.dequantize())
    assert loaded.quantized["fc1.weight"].indices.dtype == torch.uint8
    assert loaded.quantized["conv1.weight"].indices.dtype == torch.int16
    for name, tensor in model.state_dict().items():  # BatchNorm statistics and counters included
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_header_contents(saved, quantized_model):
    model, quantized = quantized_model
    header = load_artifact(saved, build).header
    assert header == read_header(saved)
    assert header["format"] == "hpcq" and header["format_version"] == FORMAT_VERSION
    assert header["model_source"] == SOURCE
    assert header["plan"] == {"k": PLAN} and header["extra"] == {"note": "test"}
    for name, qt in quantized.items():
        entry = header["quantized"][name]
        assert entry["shape"] == list(qt.shape) and entry["k"] == qt.k and entry["bits"] == qt.bits
        assert entry["count"] == qt.indices.numel()
    assert header["sizes"] == model_sizes(model.state_dict(), quantized).to_dict()
    assert len(header["sha256"]) == 64


def test_save_returns_size_report(tmp_path, quantized_model):
    model, quantized = quantized_model
    report = save_artifact(tmp_path / "a.hpcq", model, quantized, model_source=SOURCE)
    assert report == model_sizes(model.state_dict(), quantized)
    assert report.bitpacked_bytes < report.fp32_bytes


def test_file_is_plain_safetensors_with_packed_indices(saved, quantized_model):
    _, quantized = quantized_model
    tensors = safetensors.torch.load_file(str(saved))  # no pickle involved
    for name, qt in quantized.items():
        assert tensors[f"{name}::codebook"].dtype == torch.float32
        packed = tensors[f"{name}::indices"]
        assert packed.dtype == torch.uint8 and packed.numel() == (qt.indices.numel() * qt.bits + 7) // 8
        assert name not in tensors
    assert tensors["bn0.num_batches_tracked"].item() == 3
    assert tensors["conv0.bias::indices"].numel() == 0  # k = 1: no index bits at all


def test_file_smaller_than_fp32_state_dict(tmp_path, saved, quantized_model):
    model, _ = quantized_model
    fp32 = tmp_path / "fp32.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(fp32))
    assert saved.stat().st_size < 0.5 * fp32.stat().st_size


def test_atomic_write_leaves_no_temp_files_and_overwrites(tmp_path, quantized_model):
    model, quantized = quantized_model
    path = tmp_path / "sub" / "m.hpcq"
    save_artifact(path, model, quantized, model_source=SOURCE, extra={"v": 1})
    save_artifact(path, model, quantized, model_source=SOURCE, extra={"v": 2})
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.hpcq"]
    assert read_header(path)["extra"] == {"v": 2}


def test_failed_save_leaves_nothing(tmp_path, quantized_model):
    model, quantized = quantized_model
    path = tmp_path / "m.hpcq"
    with pytest.raises(ArtifactError, match="JSON"):
        save_artifact(path, model, quantized, model_source=SOURCE, extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_default_builder_is_models_build_architecture(monkeypatch, saved):
    calls = []

    def build_architecture(source):
        calls.append(source)
        return build(source)

    monkeypatch.setitem(
        sys.modules, "hpcq.models", types.SimpleNamespace(build_architecture=build_architecture)
    )
    loaded = load_artifact(saved)
    assert calls == [SOURCE] and isinstance(loaded.model, TinyNet)


def test_tied_weights_save_and_load(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    path = tmp_path / "tied.hpcq"
    save_artifact(path, model, {}, model_source={"kind": "test"})
    loaded = load_artifact(path, lambda source: Tied())
    x = torch.randn(2, 4)
    assert torch.equal(loaded.model(x), model(x))


# --- save errors ------------------------------------------------------------------------------------------


def test_save_rejects_unknown_name_and_bad_indices(tmp_path, quantized_model):
    model, quantized = quantized_model
    with pytest.raises(ArtifactError, match="not in the state dict"):
        save_artifact(tmp_path / "a", model, {"nope.weight": quantized["fc2.weight"]}, model_source=SOURCE)
    bad = QuantizedTensor(codebook=torch.zeros(2), indices=torch.full((10,), 2))
    with pytest.raises(ArtifactError, match="fc2.bias"):
        save_artifact(tmp_path / "a", model, {"fc2.bias": bad}, model_source=SOURCE)
    with pytest.raises(ArtifactError, match="shape"):
        save_artifact(tmp_path / "a", model, {"fc2.bias": quantized["fc2.weight"]}, model_source=SOURCE)
    assert list(tmp_path.iterdir()) == []


# --- load errors ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        load_artifact(tmp_path / "absent.hpcq", build)
    with pytest.raises(ArtifactError, match="not a file"):
        load_artifact(tmp_path, build)


@pytest.mark.parametrize("cut", ["data", "header", "prefix"])
def test_truncated_file(tmp_path, saved, cut):
    raw = saved.read_bytes()
    keep = {"data": len(raw) - 10, "header": data_start(saved) - 50, "prefix": 5}[cut]
    bad = tmp_path / "cut.hpcq"
    bad.write_bytes(raw[:keep])
    with pytest.raises(ArtifactError, match="truncated" if cut != "prefix" else "not an hpcq artifact"):
        load_artifact(bad, build)


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_flipped_byte_in_data_is_detected(tmp_path, saved, where):
    raw = bytearray(saved.read_bytes())
    start = data_start(saved)
    pos = min(start + int(where * (len(raw) - start)), len(raw) - 1)
    raw[pos] ^= 0x10
    bad = tmp_path / "flipped.hpcq"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(bad, build)


def test_edited_header_is_detected(tmp_path, saved):
    bad = tmp_path / "edited.hpcq"
    rewrite(saved, bad, header_update={"plan": {"k": {"fc1.weight": 2}}})
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(bad, build)


def test_replaced_tensor_is_detected(tmp_path, saved):
    bad = tmp_path / "replaced.hpcq"
    rewrite(saved, bad, tensors_update={"bn0.running_mean": torch.zeros(8)})
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(bad, build)


@pytest.mark.parametrize(
    "content", [b"", b"abc", b"\x00" * 64, bytes(range(256)) * 8, b'\x05\x00\x00\x00\x00\x00\x00\x00{"a":']
)
def test_garbage_file(tmp_path, content):
    bad = tmp_path / "garbage.hpcq"
    bad.write_bytes(content)
    with pytest.raises(ArtifactError, match="not an hpcq artifact"):
        load_artifact(bad, build)


def test_plain_safetensors_file_is_not_an_artifact(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ArtifactError, match="not an hpcq artifact"):
        load_artifact(path, build)


def test_newer_format_version(tmp_path, saved):
    bad = tmp_path / "v2.hpcq"
    rewrite(saved, bad, header_update={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ArtifactError, match=r"newer hpcq.*reads format version\(s\) 1.*upgrade hpcq"):
        load_artifact(bad, build)
    with pytest.raises(ArtifactError, match="upgrade"):
        read_header(bad)


@pytest.mark.parametrize(
    "update,message",
    [
        ({"format_version": 0}, "unknown format version 0"),
        ({"format_version": "1"}, "unknown format version '1'"),
        ({"format": "other"}, "unknown format 'other'"),
    ],
)
def test_unknown_format(tmp_path, saved, update, message):
    bad = tmp_path / "odd.hpcq"
    rewrite(saved, bad, header_update=update)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(bad, build)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"width": 16}, "shape mismatch: conv0.weight"),
        ({"width": 8, "extra_layer": True}, "missing from the file: fc_extra.weight, fc_extra.bias"),
        ({"width": 8, "drop_fc2": True}, "not in the model: fc2.bias"),
    ],
)
def test_architecture_mismatch(saved, kwargs, message):
    with pytest.raises(ArchitectureMismatchError, match=message) as info:
        load_artifact(saved, lambda source: TinyNet(**kwargs))
    assert isinstance(info.value, ArtifactError) and isinstance(info.value, ModelError)
    assert "model_source" in str(info.value)


def test_dtype_mismatch_of_stored_tensor(saved):
    with pytest.raises(ArchitectureMismatchError, match="dtype mismatch: bn0.weight"):
        load_artifact(saved, lambda source: TinyNet(8).double())
