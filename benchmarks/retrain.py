"""Retraining throughput: streaming WebDataset shards versus the same images held in memory.

Runs the label-free loop exactly as ``hpcq.distill.retrain`` runs it (teacher forward without gradients,
student forward and backward, optimizer step) on the quickstart model (``hpcq.zoo:fashion_vgg``, default
size, quantized with the default plan) at batch 128, twice:

- streaming: ``unlabelled_loader`` over the openclipart shards (one DataLoader worker, shuffle buffer,
  augmentation: the retraining defaults);
- in memory: the same images, decoded and normalized once into one tensor, batches drawn by index.

Images/s are measured over ``--steps`` steps after ``--warmup`` steps (from the moment batch ``warmup`` is
handed to the loop until the last batch is). Prints one JSON object; the goal is streaming >= 90% of
in memory. Exit status 2 when the openclipart images are not installed.

    .venv/bin/python benchmarks/retrain.py [--steps 300] [--warmup 20] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

GOAL_RATIO = 0.9
BATCH_SIZE = 128


class TimedEpochs:
    """Wraps ``batches_for_epoch`` and records when each batch is handed to the training loop."""

    def __init__(self, inner: Callable[[int], Iterable]) -> None:
        self.inner = inner
        self.times: list[float] = []

    def __call__(self, epoch: int) -> Iterator:
        for batch in self.inner(epoch):
            self.times.append(time.perf_counter())
            yield batch

    def images_per_second(self, warmup: int, batch_size: int) -> tuple[float, float]:
        """(images/s, seconds) from batch ``warmup`` to the last batch handed over."""
        steps = len(self.times) - 1 - warmup
        seconds = self.times[-1] - self.times[warmup]
        return steps * batch_size / seconds, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--images", type=Path, default=Path("/usr/share/openclipart/png"),
                        help="unlabelled image folder (default: the openclipart-png package)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if not args.images.is_dir() or not any(args.images.rglob("*.png")):
        sys.stderr.write(f"no unlabelled images at {args.images}: install them with `apt-get install "
                         "openclipart-png` (or pass --images FOLDER)\n")
        return 2

    import torch

    from hpcq.config import RetrainConfig, RunConfig, from_dict
    from hpcq.data.loaders import finite_unlabelled_batches, unlabelled_loader
    from hpcq.distill import retrain
    from hpcq.distributed import DistEnv
    from hpcq.manifest import build_manifest
    from hpcq.pipeline import ensure_unlabelled_shards
    from hpcq.quantize import quantize_, resolve_plan
    from hpcq.retrain_job import LoaderEpochs
    from hpcq.zoo import fashion_vgg

    if args.threads:
        torch.set_num_threads(args.threads)
    run = from_dict(RunConfig, {"data": {"unlabelled": str(args.images)}})
    shard_start = time.perf_counter()
    urls = ensure_unlabelled_shards(run)[:-1]  # the last shard is held out, as in `hpcq retrain`
    shard_seconds = time.perf_counter() - shard_start

    torch.manual_seed(0)
    teacher = fashion_vgg().eval()
    student = copy.deepcopy(teacher)
    plan = resolve_plan(build_manifest(teacher, torch.zeros(1, 1, 28, 28)), run.quantize)
    quantized = quantize_(student, plan, run.kmeans, progress=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.warmup + args.steps
    config = RetrainConfig(epochs=1, batches_per_epoch=steps, batch_size=BATCH_SIZE, checkpoint_every_steps=10 * steps,
                           num_workers=1)

    def measure(batches: Callable[[int], Iterable]) -> dict:
        model = copy.deepcopy(student)
        timed = TimedEpochs(batches)
        with tempfile.TemporaryDirectory() as checkpoints:
            retrain(model, teacher, timed, config=config, env=DistEnv(), device=device,
                    checkpoint_dir=Path(checkpoints), quantized=quantized, progress=False)
        rate, seconds = timed.images_per_second(args.warmup, BATCH_SIZE)
        return {"images_per_s": round(rate, 1), "timed_seconds": round(seconds, 2)}

    # In memory: the same images, decoded and normalized once.
    load_start = time.perf_counter()
    images = torch.cat(list(finite_unlabelled_batches(urls, batch_size=1000, mean=run.data.mean, std=run.data.std)))
    load_seconds = time.perf_counter() - load_start

    def in_memory(epoch: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(images.shape[0], generator=generator)
        for i in range(steps):
            start = (i * BATCH_SIZE) % (images.shape[0] - BATCH_SIZE)
            yield images[order[start:start + BATCH_SIZE]]

    memory = measure(in_memory)
    loader = unlabelled_loader(urls, batch_size=BATCH_SIZE, rank=0, world_size=1, num_workers=config.num_workers,
                               batches_per_epoch=steps, shuffle_buffer=config.shuffle_buffer, seed=0,
                               augment=config.augment, mean=run.data.mean, std=run.data.std)
    streaming = measure(LoaderEpochs(loader))

    ratio = streaming["images_per_s"] / memory["images_per_s"]
    result = {
        "benchmark": "retrain throughput, label-free loop (teacher forward + student forward/backward + step)",
        "model": "hpcq.zoo:fashion_vgg (default kwargs)",
        "plan": plan.to_dict(),
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "batch_size": BATCH_SIZE,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "images": {"folder": str(args.images), "train_shards": len(urls), "in_memory_images": int(images.shape[0]),
                   "shard_prepare_seconds": round(shard_seconds, 1), "decode_to_memory_seconds": round(load_seconds, 1)},
        "streaming": {**streaming, "num_workers": config.num_workers, "shuffle_buffer": config.shuffle_buffer,
                      "augment": config.augment},
        "in_memory": {**memory, "note": "pre-decoded normalized tensor, batches by index, no augmentation"},
        "ratio_streaming_to_memory": round(ratio, 3),
        "goal": f"streaming >= {GOAL_RATIO:.0%} of in-memory",
        "goal_met": ratio >= GOAL_RATIO,
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
