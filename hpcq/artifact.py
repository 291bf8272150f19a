"""The compressed model file (``.hpcq``): save a quantized model, load it back into a plain ``nn.Module``.

Format (version 1): a single safetensors file, so loading never executes code (unlike pickle).

- For every quantized parameter ``NAME``: ``NAME::codebook`` (float32, shape (k,), ascending) and
  ``NAME::indices`` (uint8, the indices bit-packed by :mod:`hpcq.bitpack`, ceil(count * bits / 8) bytes).
- Every other state-dict entry (biases left in float, BatchNorm statistics, ``num_batches_tracked``, ...)
  stored as it is.
- The safetensors metadata holds one JSON string under the key ``"hpcq"``::

      {"format": "hpcq", "format_version": 1,
       "written_by": {"hpcq": "...", "torch": "..."},
       "model_source": {...},   # how to rebuild the architecture without weights
       "plan": {...} | null, "extra": {...} | null,
       "quantized": {NAME: {"shape": [...], "k": k, "bits": bits, "count": n, "dtype": "torch.float32"}},
       "sizes": {...},          # hpcq.sizes.SizeReport.to_dict() of the saved model
       "sha256": "..."}         # of the rest of this header and of every tensor (name, dtype,
                                # shape, bytes) in sorted name order: see artifact_sha256

Loading rebuilds the architecture from ``model_source`` (``hpcq.models.build_architecture`` unless a
builder is given), puts ``codebook[indices]`` into each quantized parameter and the stored tensors into
the rest, and returns the model in eval mode. Its outputs equal those of the in-memory quantized model
(the model whose quantized parameters hold ``qt.dequantize()``) bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from hpcq import __version__
from hpcq.bitpack import pack_indices, packed_nbytes, unpack_indices
from hpcq.errors import ArtifactError, ModelError
from hpcq.qtensor import QuantizedTensor, bits_for
from hpcq.sizes import SizeReport, check_quantized_names, model_sizes, shared_entries

FORMAT = "hpcq"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
METADATA_KEY = "hpcq"
CODEBOOK_SUFFIX = "::codebook"
INDICES_SUFFIX = "::indices"

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_HASH_CHUNK_BYTES = 1 << 24
_SHOW = 5  # how many offending names an error message lists


class ArchitectureMismatchError(ArtifactError, ModelError):
    """The architecture built from the artifact's ``model_source`` does not fit its tensors."""


@dataclass
class LoadedArtifact:
    """What :func:`load_artifact` returns.

    ``model`` is a plain ``torch.nn.Module`` in eval mode whose quantized parameters hold the dequantized
    values; ``quantized`` maps parameter names to their :class:`QuantizedTensor` (indices in the smallest
    integer dtype that holds them: uint8 for k <= 256, int16 for k <= 32768, else int32); ``header`` is the
    artifact's decoded ``"hpcq"`` metadata.
    """

    model: nn.Module
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    header: dict = field(default_factory=dict)

    @property
    def model_source(self) -> dict:
        """How the architecture was rebuilt (from the header)."""
        return self.header["model_source"]


def save_artifact(
    path: Path | str,
    model: nn.Module,
    quantized: Mapping[str, QuantizedTensor],
    *,
    model_source: dict,
    plan: dict | None = None,
    extra: dict | None = None,
) -> SizeReport:
    """Write ``model`` with its ``quantized`` parameters as an hpcq artifact at ``path``, atomically.

    ``quantized`` maps state-dict names of ``model`` to their codebook and indices; those entries are
    stored as codebook + bit-packed indices, every other state-dict entry as it is (the model's current
    value of a quantized parameter is not stored: loading gives ``qt.dequantize()``). ``model_source`` is a
    JSON dict telling how to rebuild the architecture without weights, e.g. ``{"kind": "torchvision",
    "name": "vgg16"}``; ``plan`` and ``extra`` are JSON dicts kept in the header. The file is written to a
    temporary file in the same directory, fsynced, then renamed over ``path``; missing parent directories
    are created. Returns the payload sizes of the saved model (also stored in the header).
    """
    path = Path(path)
    if not isinstance(model_source, dict):
        raise ArtifactError(f"model_source must be a dict, got {type(model_source).__name__}")
    state_dict = model.state_dict()
    _check_quantized_fit(state_dict, quantized)

    # A tied tensor (one parameter under two names) is stored once; the header maps the other name to it.
    aliases = shared_entries(state_dict)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if name in quantized or name in aliases:
            continue
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storages:  # safetensors refuses tensors that share memory, e.g. views of one buffer
            tensor = tensor.clone()
        elif ptr:
            seen_storages.add(ptr)
        tensors[name] = tensor

    entries = {}
    for name in sorted(quantized):
        qt = quantized[name]
        codebook = qt.codebook.detach().cpu()
        try:
            packed = pack_indices(qt.indices, qt.bits)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"cannot save quantized tensor {name!r}: {exc}") from exc
        tensors[name + CODEBOOK_SUFFIX] = codebook.contiguous()
        tensors[name + INDICES_SUFFIX] = torch.from_numpy(packed)
        entries[name] = {
            "shape": list(qt.shape),
            "k": qt.k,
            "bits": qt.bits,
            "count": int(qt.indices.numel()),
            "dtype": str(state_dict[name].dtype),
        }

    sizes = model_sizes(state_dict, quantized)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": {"hpcq": __version__, "torch": torch.__version__},
        "model_source": model_source,
        "plan": plan,
        "extra": extra,
        "quantized": entries,
        "aliases": aliases,
        "sizes": sizes.to_dict(),
    }
    try:
        header["sha256"] = artifact_sha256(tensors, header)
        header_json = json.dumps(header)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"model_source, plan and extra must be JSON-serialisable dicts: {exc}") from exc

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp_name, metadata={METADATA_KEY: header_json})
        _fsync_path(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return sizes


def read_header(path: Path | str) -> dict:
    """The decoded ``"hpcq"`` header of the artifact at ``path``, checked for format and version.

    Reads only the file's header (no tensor data); the checksum is verified by :func:`load_artifact`.
    Raises ArtifactError for a missing, truncated, non-safetensors or non-hpcq file or an unsupported
    format version.
    """
    path = Path(path)
    _, metadata = _read_safetensors_header(path)
    return _decode_hpcq_header(path, metadata)


def load_artifact(path: Path | str, build_model: Callable[[dict], nn.Module] | None = None) -> LoadedArtifact:
    """Load the artifact at ``path`` into a plain ``nn.Module`` (eval mode, dequantized weights).

    ``build_model(model_source)`` builds the architecture with any weights (they are all overwritten);
    it defaults to ``hpcq.models.build_architecture``. Raises ArtifactError when the file is missing,
    truncated, not an hpcq artifact, corrupted (checksum mismatch), of an unsupported format version, or
    when the built architecture's state dict does not match the stored tensors
    (:class:`ArchitectureMismatchError`, also a ModelError).
    """
    path = Path(path)
    _, metadata = _read_safetensors_header(path)
    header = _decode_hpcq_header(path, metadata)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors' errors are not a stable API
        raise ArtifactError(
            f"{path}: cannot read the tensors ({exc}); the file is damaged: export it again"
        ) from exc
    digest = artifact_sha256(tensors, {key: value for key, value in header.items() if key != "sha256"})
    if digest != header["sha256"]:
        raise ArtifactError(
            f"{path}: checksum mismatch (stored {header['sha256'][:16]}..., computed {digest[:16]}...): "
            "the file is corrupted; copy it again or export it again"
        )
    quantized = _decode_quantized(path, header, tensors)

    if build_model is None:
        from hpcq.models import build_architecture

        build_model = build_architecture
    model = build_model(header["model_source"])
    state_dict = dict(tensors)
    for name, qt in quantized.items():
        state_dict[name] = qt.dequantize()
    for alias, owner in _decode_aliases(path, header, state_dict).items():
        state_dict[alias] = state_dict[owner]
    _check_architecture(path, header, model.state_dict(), state_dict, quantized)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return LoadedArtifact(model=model, quantized=quantized, header=header)


def _decode_aliases(path: Path, header: Mapping, state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The header's tied-tensor names (alias -> stored name); absent in files without tied tensors."""
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict) or any(
        not isinstance(alias, str) or owner not in state_dict for alias, owner in aliases.items()
    ):
        raise ArtifactError(f"{path}: the header's aliases do not name stored tensors; the file is damaged")
    return aliases


def artifact_sha256(tensors: Mapping[str, torch.Tensor], header: Mapping | None = None) -> str:
    """SHA-256 (hex) over ``header`` (canonical JSON, without its ``"sha256"`` key) followed by every
    tensor's name, dtype, shape and bytes in sorted name order; a flipped byte anywhere changes it."""
    digest = hashlib.sha256()
    if header is not None:
        canonical = {key: value for key, value in header.items() if key != "sha256"}
        digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        for start in range(0, raw.size, _HASH_CHUNK_BYTES):
            digest.update(raw[start : start + _HASH_CHUNK_BYTES])
    return digest.hexdigest()


# --- reading -------------------------------------------------------------------------------------------


def _read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """Parse the safetensors header by hand, so truncation and garbage get precise messages."""
    if not path.exists():
        raise ArtifactError(f"{path}: no such file; check the path (artifacts are written by `hpcq export`)")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file; give the path of an .hpcq artifact")
    size = path.stat().st_size
    not_ours = (
        f"{path}: not an hpcq artifact (not a safetensors file); give the file written by `hpcq export`"
    )
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{not_ours} (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        first = fh.read(1)
        if first != b"{" or header_len > _MAX_HEADER_BYTES:
            raise ArtifactError(not_ours)
        if 8 + header_len > size:
            raise ArtifactError(
                f"{path}: truncated file ({size} bytes, its header alone needs {8 + header_len}); "
                "copy it again or export it again"
            )
        raw_header = first + fh.read(header_len - 1)
    try:
        header = json.loads(raw_header.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_len = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{not_ours} (unreadable header: {exc})") from exc
    expected = 8 + header_len + data_len
    if size < expected:
        raise ArtifactError(
            f"{path}: truncated file ({size} bytes, expected {expected}); copy it again or export it again"
        )
    if size > expected:
        raise ArtifactError(
            f"{path}: {size - expected} unexpected bytes after the data; the file is damaged: "
            "copy it again or export it again"
        )
    return header, metadata


def _decode_hpcq_header(path: Path, metadata: dict) -> dict:
    if METADATA_KEY not in metadata:
        raise ArtifactError(
            f"{path}: a safetensors file but not an hpcq artifact (no {METADATA_KEY!r} metadata); "
            "load it with safetensors directly, or give the file written by `hpcq export`"
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: the hpcq header is not valid JSON ({exc}); export it again") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise ArtifactError(f"{path}: unknown format {fmt!r} (expected {FORMAT!r}); export it again")
    version = header.get("format_version")
    supported = ", ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
    if (
        isinstance(version, int)
        and not isinstance(version, bool)
        and version > max(SUPPORTED_FORMAT_VERSIONS)
    ):
        raise ArtifactError(
            f"{path}: format version {version} was written by a newer hpcq; this hpcq ({__version__}) reads "
            f"format version(s) {supported}: upgrade hpcq (pip install -U hpcq)"
        )
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise ArtifactError(
            f"{path}: unknown format version {version!r}; this hpcq ({__version__}) reads format "
            f"version(s) {supported}"
        )
    missing = [key for key in ("model_source", "quantized", "sha256") if key not in header]
    if missing:
        raise ArtifactError(f"{path}: the hpcq header lacks {missing}; the file is damaged: export it again")
    if not isinstance(header["model_source"], dict) or not isinstance(header["quantized"], dict):
        raise ArtifactError(f"{path}: the hpcq header is malformed; export it again")
    return header


def _index_dtype(bits: int) -> np.dtype:
    if bits <= 8:
        return np.dtype(np.uint8)
    if bits <= 15:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _decode_quantized(
    path: Path, header: dict, tensors: dict[str, torch.Tensor]
) -> dict[str, QuantizedTensor]:
    """Pop every ``NAME::codebook`` / ``NAME::indices`` pair listed in the header out of ``tensors``."""
    quantized = {}
    for name, info in header["quantized"].items():
        where = f"{path}: quantized tensor {name!r}"
        codebook = tensors.pop(name + CODEBOOK_SUFFIX, None)
        packed = tensors.pop(name + INDICES_SUFFIX, None)
        if codebook is None or packed is None:
            raise ArtifactError(f"{where}: its codebook or indices are missing; export it again")
        try:
            shape = [int(d) for d in info["shape"]]
            k, bits, count = int(info["k"]), int(info["bits"]), int(info["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: malformed header entry {info!r}; export it again") from exc
        problems = []
        if codebook.dtype != torch.float32 or tuple(codebook.shape) != (k,):
            problems.append(f"codebook is {codebook.dtype} {tuple(codebook.shape)}, expected float32 ({k},)")
        if not 1 <= k <= 1 << 16 or bits != bits_for(k):
            problems.append(f"k={k} and bits={bits} are inconsistent or out of range (1 <= k <= 65536)")
        if count != math.prod(shape):
            problems.append(f"count {count} does not match shape {shape}")
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            problems.append(f"indices are {packed.dtype} {tuple(packed.shape)}, expected 1-D uint8")
        elif not problems and packed.numel() != packed_nbytes(count, bits):
            problems.append(f"{packed.numel()} index bytes, expected {packed_nbytes(count, bits)}")
        if problems:
            raise ArtifactError(f"{where}: {'; '.join(problems)}; export it again")
        indices = unpack_indices(packed.numpy(), bits, count, dtype=_index_dtype(bits))
        if k > 1 and count and int(indices.max()) >= k:
            raise ArtifactError(f"{where}: an index is >= k={k}; the file is damaged: export it again")
        quantized[name] = QuantizedTensor(codebook=codebook, indices=torch.from_numpy(indices).reshape(shape))
    return quantized


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" (and {len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def _check_architecture(
    path: Path,
    header: dict,
    expected: Mapping[str, torch.Tensor],
    stored: Mapping[str, torch.Tensor],
    quantized: Mapping[str, QuantizedTensor],
) -> None:
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    shapes = [
        f"{name} {tuple(stored[name].shape)} in the file vs {tuple(tensor.shape)} in the model"
        for name, tensor in expected.items()
        if name in stored and tuple(stored[name].shape) != tuple(tensor.shape)
    ]
    dtypes = [
        f"{name} {stored[name].dtype} in the file vs {tensor.dtype} in the model"
        for name, tensor in expected.items()
        if name in stored and name not in quantized and stored[name].dtype != tensor.dtype
    ]
    if not (missing or unexpected or shapes or dtypes):
        return
    parts = []
    if missing:
        parts.append(f"missing from the file: {_first(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {_first(shapes)}")
    if dtypes:
        parts.append(f"dtype mismatch: {_first(dtypes)}")
    raise ArchitectureMismatchError(
        f"{path}: the architecture built from model_source {json.dumps(header['model_source'])} does not "
        f"match the stored tensors ({'; '.join(parts)}); check model_source or pass the builder that "
        "made the saved model"
    )


# --- writing -------------------------------------------------------------------------------------------


def _check_quantized_fit(
    state_dict: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedTensor]
) -> None:
    try:
        check_quantized_names(state_dict, quantized)
    except ValueError as exc:
        raise ArtifactError(f"{exc}; quantized names must be the model's parameter names") from None
    for name, qt in quantized.items():
        if qt.codebook.dtype != torch.float32 or qt.codebook.dim() != 1:
            raise ArtifactError(
                f"quantized tensor {name!r}: the codebook must be a 1-D float32 tensor, got "
                f"{qt.codebook.dtype} {tuple(qt.codebook.shape)}"
            )
        if qt.k > 1 << 16:
            raise ArtifactError(f"quantized tensor {name!r}: k={qt.k} exceeds the supported 65536 centroids")
    taken = [
        name + suffix
        for name in quantized
        for suffix in (CODEBOOK_SUFFIX, INDICES_SUFFIX)
        if name + suffix in state_dict
    ]
    if taken:
        raise ArtifactError(f"state-dict names collide with the artifact's tensor names: {_first(taken)}")


def _fsync_path(name: str) -> None:
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not possible on every platform (e.g. Windows), so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
