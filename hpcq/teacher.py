"""The quickstart teacher: a VGG-style CNN trained once on Fashion-MNIST, then cached."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hpcq.config import QUICKSTART_FACTORY, DataConfig, TeacherConfig, config_to_dict
from hpcq.data.fashion_mnist import load_fashion_mnist, train_validation_indices
from hpcq.data.memory import TensorBatches, normalize
from hpcq.evaluate import accuracy
from hpcq.fileio import atomic_torch_save, atomic_write_json
from hpcq.models import build_architecture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FashionSplits:
    """Fashion-MNIST as hpcq uses it: teacher training, a held-out validation split, and the test set."""

    train: TensorBatches
    validation: TensorBatches
    test: TensorBatches


def fashion_splits(data: DataConfig, teacher: TeacherConfig, seed: int, batch_size: int | None = None,
                   train_batch_size: int | None = None) -> FashionSplits:
    """Load Fashion-MNIST and split off ``teacher.validation_size`` training images for the sweep."""
    root = Path(data.fashion_mnist_root)
    train_images, train_labels = load_fashion_mnist("train", root)
    test_images, test_labels = load_fashion_mnist("test", root)
    train_idx, val_idx = train_validation_indices(train_images.shape[0], teacher.validation_size, seed)
    x_train = normalize(train_images, data.mean, data.std)
    x_test = normalize(test_images, data.mean, data.std)
    eval_batch = batch_size or data.eval_batch_size
    train_idx_t, val_idx_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return FashionSplits(
        train=TensorBatches(x_train[train_idx_t], train_labels[train_idx_t], train_batch_size or teacher.batch_size,
                            shuffle=True,
                            augment=True, seed=seed),
        validation=TensorBatches(x_train[val_idx_t], train_labels[val_idx_t], eval_batch),
        test=TensorBatches(x_test, test_labels, eval_batch),
    )


def teacher_source(teacher: TeacherConfig, data: DataConfig, seed: int) -> dict:
    """The model source of the cached quickstart teacher (trained on first use by ``ensure_teacher``)."""
    # What determines the trained weights; where the cache lives and the accuracy bar do not.
    recipe = {k: v for k, v in config_to_dict(teacher).items() if k not in ("cache_dir", "min_test_accuracy_pct")}
    key = json.dumps({"teacher": recipe, "mean": data.mean, "std": data.std, "seed": seed,
                      "factory": QUICKSTART_FACTORY}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    checkpoint = Path(teacher.cache_dir).expanduser() / f"fashion_vgg-{digest}.pt"
    return {"kind": "factory", "factory": QUICKSTART_FACTORY, "kwargs": {}, "checkpoint": str(checkpoint)}


def ensure_teacher(teacher: TeacherConfig, data: DataConfig, seed: int, progress: bool = True) -> dict:
    """Train the quickstart teacher unless its checkpoint is cached; return its model source."""
    source = teacher_source(teacher, data, seed)
    checkpoint = Path(source["checkpoint"])
    if checkpoint.is_file():
        log.info("using the cached quickstart teacher %s", checkpoint)
        return source
    log.info("training the quickstart teacher on Fashion-MNIST (%d epochs); cached at %s", teacher.epochs, checkpoint)
    torch.manual_seed(seed)
    model = build_architecture(source).train()
    splits = fashion_splits(data, teacher, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=teacher.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=teacher.lr, total_steps=teacher.epochs * len(splits.train)
    )
    for epoch in range(teacher.epochs):
        model.train()
        for images, labels in tqdm(splits.train, desc=f"teacher epoch {epoch + 1}/{teacher.epochs}", unit="batch",
                                   disable=not progress):
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    test = accuracy(model, splits.test)
    validation = accuracy(model, splits.validation)
    log.info("quickstart teacher: test top-1 %.2f%%, validation top-1 %.2f%%", test.top1_pct, validation.top1_pct)
    if test.top1_pct < teacher.min_test_accuracy_pct:
        log.warning("the teacher reaches %.2f%% test top-1, below the %.2f%% it should (train longer: "
                    "--set teacher.epochs=N)", test.top1_pct, teacher.min_test_accuracy_pct)
    atomic_torch_save(checkpoint, model.state_dict())
    atomic_write_json(checkpoint.with_suffix(".json"), {"test": test.to_dict(), "validation": validation.to_dict(),
                                                         "teacher": config_to_dict(teacher), "seed": seed})
    return source
