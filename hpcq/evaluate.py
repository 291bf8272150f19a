"""Accuracy on labelled data and label-free fidelity of a student to its teacher."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy in percent over ``count`` labelled images."""

    top1_pct: float
    top5_pct: float
    count: int

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class Fidelity:
    """How closely a student follows its teacher on unlabelled images.

    ``agreement_pct``: share of images where both predict the same class; ``kl``: mean KL(teacher || student)
    of the softmax outputs, in nats per image.
    """

    agreement_pct: float
    kl: float
    count: int

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu",
             progress: bool = False, desc: str = "evaluate") -> Accuracy:
    """Top-1 / top-5 accuracy of ``model`` over (images, labels) batches."""
    model.eval()
    top1 = top5 = count = 0
    for images, labels in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        logits = model(images.to(device))
        labels = labels.to(device)
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(dim=1).sum())
        count += int(labels.numel())
    if count == 0:
        raise ValueError("accuracy needs at least one labelled image")
    return Accuracy(100.0 * top1 / count, 100.0 * top5 / count, count)


@torch.no_grad()
def fidelity(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu",
             progress: bool = False, desc: str = "fidelity") -> Fidelity:
    """Top-1 agreement and mean KL(teacher || student) over batches of (unlabelled) images."""
    student.eval()
    teacher.eval()
    agree = count = 0
    kl_sum = 0.0
    for images in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        if isinstance(images, list | tuple):  # a labelled batch: the labels are not used
            images = images[0]
        images = images.to(device)
        t_logits = teacher(images)
        s_logits = student(images)
        agree += int((t_logits.argmax(1) == s_logits.argmax(1)).sum())
        kl_sum += float(F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True,
                                 reduction="sum"))
        count += int(images.shape[0])
    if count == 0:
        raise ValueError("fidelity needs at least one image")
    return Fidelity(100.0 * agree / count, kl_sum / count, count)
