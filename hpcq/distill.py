"""Retraining a quantized student: the teacher-student loss, trainable codebooks, and the training loop.

Pure compute: this module knows nothing of run directories or launchers. It is given the two models, a
function that returns each epoch's batches, the rank (:class:`hpcq.distributed.DistEnv`), the device and
a folder for checkpoints.

Choices (documented here because they change results):

- **Only non-quantized parameters train** (the paper's setting): the optimizer sees exactly the
  parameters with ``requires_grad``; the quantized ones are frozen, and after training each of them is
  checked to still equal its ``QuantizedTensor.dequantize()`` bit for bit. With
  ``RetrainConfig.train_codebooks`` the k centroids of every quantized tensor train too (indices fixed).
- **BatchNorm stays in eval mode** in the student during retraining, in both modes: its running
  statistics are the ones estimated on the original training data, and the unlabelled images come from a
  different data set; letting them update would shift the statistics towards that data set, which the
  teacher never saw. BatchNorm's affine weight and bias still train when they are not quantized.
  Dropout stays active (ordinary training mode).
- **Randomness**: the global torch RNG (dropout) is reseeded before every step from (seed, rank, step),
  so a resumed run draws the same dropout masks as an uninterrupted one without restoring RNG states.
  Data order is the business of ``batches_for_epoch(epoch)``, which must return the same batches for the
  same epoch every time it is called (``UnlabelledLoader`` seeds by (seed, epoch, rank, worker)).
- **Resume** skips the batches already done in the checkpoint's epoch (they are read and discarded, not
  trained on), so a run interrupted at any checkpoint and resumed ends with the same parameters as an
  uninterrupted run.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from hpcq.config import RetrainConfig
from hpcq.distributed import DistEnv
from hpcq.errors import ConfigError, DataError, QuantizationError
from hpcq.fileio import atomic_torch_save
from hpcq.qtensor import QuantizedTensor

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hpcq-retrain-checkpoint/1"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.pt$")
KEEP_CHECKPOINTS = 2
PROGRESS_LOSS_EVERY_STEPS = 10


# --- the loss ------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: Literal["kl", "mse"] = "kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """How far the student's output vectors are from the teacher's (mean over the batch).

    ``kl``: KL(teacher || student) between the softmax outputs softened by ``temperature``, times
    ``temperature**2`` so that gradient magnitudes do not depend on it (Hinton et al.). ``mse``: mean squared
    error between the logits (``temperature`` is not used). Both are exactly 0 when the logits are equal.
    """
    teacher_logits = teacher_logits.detach()
    if kind == "kl":
        if temperature <= 0:
            raise ConfigError(f"the distillation temperature must be > 0, got {temperature}")
        log_student = F.log_softmax(student_logits / temperature, dim=1)
        log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        return kl * (temperature * temperature)
    if kind == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    raise ConfigError(f"distillation loss {kind!r} is not one of kl, mse")


# --- trainable codebooks -------------------------------------------------------------------------------


class CodebookParametrization(nn.Module):
    """A quantized weight as ``codebook[indices]``: the k centroids are an ``nn.Parameter``, the indices a
    fixed buffer, so gradients flow into the centroids and the weight never leaves its k values."""

    def __init__(self, qt: QuantizedTensor, name: str) -> None:
        super().__init__()
        self.name = name
        self.index_dtype = qt.indices.dtype
        self.codebook = nn.Parameter(qt.codebook.detach().clone().to(torch.float32))
        self.register_buffer("indices", qt.indices.detach().to(torch.long).clone(), persistent=False)

    def forward(self, original: torch.Tensor) -> torch.Tensor:  # the original weight is not used
        return self.codebook[self.indices].to(original.dtype)


def attach_trainable_codebooks(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> None:
    """Make every quantized parameter of ``model`` a :class:`CodebookParametrization` (in place).

    The parameter names of ``quantized`` (``classifier.1.weight``) must be the model's. Afterwards the model's
    trainable parameters include one codebook per quantized tensor (named
    ``<module>.parametrizations.<tensor>.0.codebook``); the original weights stay frozen and unused. Undo
    with :func:`detach_codebooks`.
    """
    for name, qt in quantized.items():
        module_name, _, tensor_name = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise QuantizationError(f"the model has no module {module_name!r} for {name!r}") from exc
        if parametrize.is_parametrized(module, tensor_name):
            raise QuantizationError(f"{name} is already parametrized; call detach_codebooks first")
        if tuple(getattr(module, tensor_name).shape) != tuple(qt.shape):
            raise QuantizationError(f"{name}: the quantized tensor has shape {tuple(qt.shape)}, the model's "
                                    f"{tuple(getattr(module, tensor_name).shape)}")
        device = getattr(module, tensor_name).device
        parametrization = CodebookParametrization(qt, name).to(device)
        parametrize.register_parametrization(module, tensor_name, parametrization)
        module.parametrizations[tensor_name].original.requires_grad_(False)


def detach_codebooks(model: nn.Module) -> dict[str, QuantizedTensor]:
    """Remove the codebook parametrizations and return the trained quantized tensors by parameter name.

    Each codebook is sorted ascending again (the indices remapped to match), the parameter gets exactly
    ``qt.dequantize()`` and is frozen. The tensors are on the CPU; indices keep their original dtype.
    """
    out: dict[str, QuantizedTensor] = {}
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            ours = [p for p in module.parametrizations[tensor_name] if isinstance(p, CodebookParametrization)]
            if not ours:
                continue
            (param,) = ours
            codebook, order = torch.sort(param.codebook.detach().to("cpu", torch.float32))
            remap = torch.empty_like(order)
            remap[order] = torch.arange(order.numel())
            indices = remap[param.indices.to("cpu")].to(param.index_dtype)
            qt = QuantizedTensor(codebook=codebook.contiguous(), indices=indices)
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
            weight = getattr(module, tensor_name)
            with torch.no_grad():
                weight.copy_(qt.dequantize().to(weight.device, weight.dtype))
            weight.requires_grad_(False)
            out[param.name] = qt
    return out


# --- the training loop ---------------------------------------------------------------------------------


@dataclass
class RetrainResult:
    """What :func:`retrain` did.

    ``steps``: global optimizer steps done in total (including those before a resume); ``epochs``: epochs
    completed; ``images_seen``: images trained on by all ranks together, in total; ``seconds``: wall time
    of this call's training loop; ``final_loss``: mean loss over the last epoch's batches of all ranks (of
    the epoch so far when stopped early by ``max_steps``); ``resumed_from_step``: the checkpoint's step
    when this call resumed, else None; ``quantized``: the trained codebooks with ``train_codebooks``, else
    the quantized tensors given; ``images_this_call``: images trained on by all ranks in this call.
    """

    steps: int
    epochs: int
    images_seen: int
    seconds: float
    final_loss: float
    resumed_from_step: int | None
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict, repr=False)
    labelled: bool = False
    images_this_call: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput of this call (all ranks): images seen in it per second (0 when it did nothing)."""
        return 0.0 if self.seconds <= 0 else self.images_this_call / self.seconds

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (without the tensors)."""
        return {
            "labelled": self.labelled,
            "steps": self.steps,
            "epochs": self.epochs,
            "images_seen": self.images_seen,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "final_loss": self.final_loss,
            "resumed_from_step": self.resumed_from_step,
            "quantized_tensors": len(self.quantized),
        }


@dataclass
class _Position:
    """Where training stands: the state a checkpoint restores (loss sums and images are global)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    last_epoch_loss: float | None = None
    images_seen: int = 0


def retrain(
    student: nn.Module,
    teacher: nn.Module | None,
    batches_for_epoch: Callable[[int], Iterable],
    *,
    config: RetrainConfig,
    env: DistEnv,
    device: torch.device | str,
    checkpoint_dir: Path,
    labelled: bool = False,
    quantized: Mapping[str, QuantizedTensor] | None = None,
    progress: bool = True,
    seed: int = 0,
    max_steps: int | None = None,
) -> RetrainResult:
    """Retrain ``student`` (in place) for ``config.epochs`` epochs of ``config.batches_per_epoch`` batches.

    Label-free (default): batches are image tensors (or tuples whose first item is the images); the loss is
    :func:`distillation_loss` between the student's and the teacher's outputs (teacher in eval mode, no
    gradients). ``labelled=True``: batches are ``(images, labels)`` and the loss is cross-entropy; the teacher
    is not used (may be None).

    ``batches_for_epoch(epoch)`` returns the batches of that epoch for this rank: at least
    ``batches_per_epoch`` of them (only that many are used), the same ones whenever it is called with the same
    epoch, and disjoint from the other ranks'. With ``env.world_size > 1`` the process group must be
    initialized (see :func:`hpcq.distributed.distributed_context`); the student is wrapped in
    DistributedDataParallel.

    Parameters named in ``quantized`` are frozen and must equal their ``dequantize()`` afterwards. Rank 0
    writes ``checkpoint_dir/step-XXXXXXXX.pt`` every ``checkpoint_every_steps`` steps, at the end of every
    epoch and when stopping at ``max_steps``, keeping the latest two; a call finding a checkpoint resumes
    from the latest one. ``seed`` drives dropout. ``max_steps`` stops after that global step (e.g. to fit
    a time budget; a later call resumes). The student is left in eval mode.

    Raises:
        ConfigError: nothing to train, or a checkpoint written by a different kind of retraining.
        DataError: ``batches_for_epoch`` gave fewer than ``batches_per_epoch`` batches.
    """
    device = torch.device(device)
    checkpoint_dir = Path(checkpoint_dir)
    quantized = dict(quantized or {})
    if not labelled and teacher is None:
        raise ConfigError("label-free retraining needs the teacher model")
    if config.train_codebooks and not quantized:
        raise ConfigError("retrain.train_codebooks needs the quantized tensors (quantized=...)")
    if env.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"world size {env.world_size} but no process group: run inside distributed_context")

    student.to(device)
    params = dict(student.named_parameters())
    for name in quantized:
        if name not in params:
            raise QuantizationError(f"the student has no parameter {name!r} to keep quantized")
        params[name].requires_grad_(False)
    if config.train_codebooks:
        attach_trainable_codebooks(student, quantized)
    trainable = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("every parameter of the student is quantized or frozen, so retraining has nothing to "
                          "train: quantize fewer layers or set retrain.train_codebooks=true")
    optimizer = _make_optimizer(config, [p for _, p in trainable])
    if teacher is not None and not labelled:
        teacher.to(device).eval()
        teacher.requires_grad_(False)

    meta = {"labelled": labelled, "train_codebooks": config.train_codebooks,
            "batches_per_epoch": config.batches_per_epoch, "world_size": env.world_size,
            "trainable": [name for name, _ in trainable]}
    position, resumed_from = _resume(checkpoint_dir, student, optimizer, trainable, meta, env)

    _set_train_mode(student)
    model: nn.Module = student
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # BatchNorm statistics never change (eval mode), so there is nothing to broadcast each step.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                        **no_buffer_sync)

    bpe = config.batches_per_epoch
    total_steps = config.epochs * bpe
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    step, epoch, skip = position.step, position.epoch, position.batches_done
    carried_sum, carried_count = position.epoch_loss_sum, position.epoch_loss_count
    last_epoch_loss = position.last_epoch_loss
    if skip >= bpe:
        epoch, skip, carried_sum, carried_count = epoch + 1, 0, 0.0, 0
    # Local (this rank's) sums since this call started; the global totals are all-reduced when needed.
    local_images = 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="retrain (labelled)" if labelled else "retrain",
               disable=not (progress and env.is_main), dynamic_ncols=True)
    partial_loss: float | None = None
    try:
        while epoch < config.epochs and step < stop_at:
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            loss_count = 0
            iterator = iter(batches_for_epoch(epoch))
            try:
                for skipped in range(skip):
                    if next(iterator, None) is None:
                        raise DataError(f"epoch {epoch} had only {skipped} batches to skip on rank {env.rank} "
                                        f"while resuming, expected {skip}")
                batch_index = skip
                while batch_index < bpe and step < stop_at:
                    batch = next(iterator, None)
                    if batch is None:
                        raise DataError(f"rank {env.rank}'s batches of epoch {epoch} ended after {batch_index} "
                                        f"of {bpe}; every rank needs batches_per_epoch batches per epoch")
                    torch.manual_seed(_step_seed(seed, env.rank, step))
                    loss, count = _train_step(model, teacher, optimizer, batch, device, config, labelled)
                    loss_sum += loss.detach()
                    loss_count += 1
                    local_images += count
                    step += 1
                    batch_index += 1
                    bar.update(1)
                    if bar.disable is False and step % PROGRESS_LOSS_EVERY_STEPS == 0:
                        bar.set_postfix(epoch=epoch, loss=f"{float(loss):.4f}", refresh=False)
                    end_of_epoch = batch_index == bpe
                    if step % config.checkpoint_every_steps == 0 or end_of_epoch or step == stop_at:
                        totals = _all_reduce([float(loss_sum), loss_count, local_images], device, env)
                        mean = (carried_sum + totals[0]) / max(1, carried_count + int(totals[1]))
                        if end_of_epoch:
                            last_epoch_loss = mean
                        partial_loss = mean
                        saved = _Position(step, epoch, batch_index, carried_sum + totals[0],
                                          carried_count + int(totals[1]), last_epoch_loss,
                                          position.images_seen + int(totals[2]))
                        _save_checkpoint(checkpoint_dir, saved, student, optimizer, trainable, meta, seed, env)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            if batch_index == bpe:
                epoch, skip, carried_sum, carried_count = epoch + 1, 0, 0.0, 0
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    totals = _all_reduce([0.0, 0, local_images], device, env)
    images_this_call = int(totals[2])
    if last_epoch_loss is not None and (step == total_steps or partial_loss is None):
        final_loss = last_epoch_loss
    elif partial_loss is not None:
        final_loss = partial_loss
    else:  # resumed in the middle of an epoch with nothing left to do
        final_loss = carried_sum / max(1, carried_count)

    student.eval()
    result_quantized = detach_codebooks(student) if config.train_codebooks else quantized
    _check_quantized(student, result_quantized)
    log.info("retrained %d steps (%d epochs, %d images) in %.1f s; final loss %.5f", step, epoch,
             position.images_seen + images_this_call, seconds, final_loss)
    return RetrainResult(steps=step, epochs=epoch, images_seen=position.images_seen + images_this_call,
                         seconds=seconds, final_loss=final_loss, resumed_from_step=resumed_from,
                         quantized=result_quantized, labelled=labelled, images_this_call=images_this_call)


def _make_optimizer(config: RetrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ConfigError(f"retrain.optimizer {config.optimizer!r} is not one of adam, sgd")


def _set_train_mode(student: nn.Module) -> None:
    """Training mode, except BatchNorm: its running statistics stay those of the original data."""
    student.train()
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _train_step(
    model: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    device: torch.device,
    config: RetrainConfig,
    labelled: bool,
) -> tuple[torch.Tensor, int]:
    if labelled:
        images, labels = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels.to(device, non_blocking=True))
    else:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            target = teacher(images)
        loss = distillation_loss(model(images), target, config.loss, config.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, int(images.shape[0])


def _all_reduce(values: list[float], device: torch.device, env: DistEnv) -> list[float]:
    """Sum a few numbers over the ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _check_quantized(student: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> None:
    """Every quantized parameter must still hold exactly its codebook values."""
    params = dict(student.named_parameters())
    changed = [name for name, qt in quantized.items()
               if not torch.equal(params[name].detach().cpu(), qt.dequantize().to(params[name].dtype))]
    if changed:
        raise RuntimeError(f"retraining changed quantized parameters {changed[:5]}; this is a bug in hpcq")


# --- checkpoints ---------------------------------------------------------------------------------------


def checkpoint_paths(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints in ``checkpoint_dir``, oldest (lowest step) first."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(checkpoint_dir).iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _save_checkpoint(
    checkpoint_dir: Path,
    position: _Position,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[tuple[str, nn.Parameter]],
    meta: dict,
    seed: int,
    env: DistEnv,
) -> None:
    """Rank 0 writes the checkpoint atomically and prunes old ones; then every rank waits for it."""
    if env.is_main:
        path = checkpoint_dir / f"step-{position.step:08d}.pt"
        atomic_torch_save(path, {
            "format": CHECKPOINT_FORMAT,
            "meta": meta,
            "position": vars(position).copy(),
            "trainable": {name: p.detach().to("cpu", copy=True) for name, p in trainable},
            "optimizer": optimizer.state_dict(),
            # Dropout's RNG is reseeded every step from (seed, rank, step): the seed is the whole RNG state.
            "rng": {"scheme": "torch.manual_seed per step from (seed, rank, step)", "seed": seed},
        })
        for old in checkpoint_paths(checkpoint_dir)[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        log.debug("wrote %s", path)
    if env.world_size > 1:
        dist.barrier()


def _resume(
    checkpoint_dir: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[tuple[str, nn.Parameter]],
    meta: dict,
    env: DistEnv,
) -> tuple[_Position, int | None]:
    """Load the latest checkpoint (every rank reads the same file), or start from scratch."""
    paths = checkpoint_paths(checkpoint_dir)
    if not paths:
        if env.world_size > 1:
            dist.barrier()  # nobody writes a checkpoint before everyone has looked
        return _Position(), None
    path = paths[-1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to resume "
                          "from the one before, or the folder to start again") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an hpcq retraining checkpoint; delete {checkpoint_dir}")
    theirs = state["meta"]
    different = [key for key in ("labelled", "train_codebooks", "batches_per_epoch", "trainable")
                 if theirs.get(key) != meta[key]]
    if different:
        raise ConfigError(f"the checkpoints in {checkpoint_dir} come from a different retraining (differs in "
                          f"{', '.join(different)}); delete that folder to start again, or restore the settings")
    if theirs.get("world_size") != env.world_size:
        log.warning("resuming a run of %s processes with %d: the data each rank sees changes from here on",
                    theirs.get("world_size"), env.world_size)
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(state["trainable"][name].to(param.device, param.dtype))
    optimizer.load_state_dict(state["optimizer"])
    position = _Position(**state["position"])
    log.info("rank %d resumed from %s: step %d, epoch %d, %d batches of it done", env.rank, path, position.step,
             position.epoch, position.batches_done)
    if env.world_size > 1:
        dist.barrier()
    return position, position.step
