"""The retraining stage: read ``RUN_DIR/quantized.hpcq``, retrain it, write the retrained artifact.

One process per rank runs :func:`run_retrain`; the launcher decides how many
(``torchrun --nproc_per_node 2 -m hpcq.retrain_job SPEC``, ``srun``, ``mpirun`` in a PBS job, or plain
``python -m hpcq.retrain_job SPEC`` for one process). Everything it needs comes from files: the quantized
artifact (its header names the teacher's model source), the unlabelled shards and the run spec; state lives
in ``RUN_DIR/checkpoints/<mode>/``, so a preempted job started again resumes there.

Outputs (rank 0, atomic): ``RUN_DIR/label_free.hpcq`` or ``RUN_DIR/labelled.hpcq`` and
``RUN_DIR/retrain-label_free.json`` or ``RUN_DIR/retrain-labelled.json``. When both exist the stage is done
and returns the stored summary without training again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcq.config import RunConfig, config_to_dict
from hpcq.distributed import DistEnv, detect_env
from hpcq.errors import ConfigError, DataError, HpcqError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

USAGE_ERROR = 2


def mode_name(labelled: bool) -> str:
    """``labelled`` or ``label_free``: the stem of the stage's output files."""
    return "labelled" if labelled else "label_free"


def output_paths(run_dir: Path, labelled: bool) -> tuple[Path, Path, Path]:
    """(artifact, summary JSON, checkpoint folder) of one retraining mode in ``run_dir``."""
    mode = mode_name(labelled)
    run_dir = Path(run_dir)
    return run_dir / f"{mode}.hpcq", run_dir / f"retrain-{mode}.json", run_dir / "checkpoints" / mode


class LoaderEpochs:
    """``batches_for_epoch`` over an :class:`hpcq.data.loaders.UnlabelledLoader`: selects the epoch, so that
    the shuffling of epoch e is the same whether or not the run was resumed."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __call__(self, epoch: int) -> Any:
        self.loader.set_epoch(epoch)
        return self.loader


class LabelledBatches:
    """``batches_for_epoch`` over in-memory labelled tensors, split across ranks.

    The global batch sequence is endless: pass p over the data is a permutation seeded by (seed, p), cut into
    ``len(images) // batch_size`` full batches; global batch g is augmented (when asked) with a generator
    seeded by (seed, g). Epoch e of rank r takes global batches ``e * B * W + r + i * W`` for i < B
    (B = batches_per_epoch, W = world_size): every world_size-th batch, exactly B per rank per epoch,
    cycling through the data, and a pure function of (seed, epoch, rank) so that resuming is exact.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, batches_per_epoch: int,
                 rank: int, world_size: int, seed: int, augment: bool) -> None:
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.per_pass = images.shape[0] // batch_size
        if self.per_pass < 1:
            raise DataError(f"{images.shape[0]} labelled images are fewer than one batch of {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed, self.augment = rank, world_size, seed, augment

    def _order(self, pass_number: int) -> torch.Tensor:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_number)
        return torch.randperm(self.images.shape[0], generator=generator)

    def _take(self, order: torch.Tensor, position: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from hpcq.data.memory import random_flip_shift

        idx = order[position * self.batch_size:(position + 1) * self.batch_size]
        x = self.images[idx]
        if self.augment:
            x = random_flip_shift(x, torch.Generator().manual_seed(self.seed * 1_000_033 + g + 1))
        return x, self.labels[idx]

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first = epoch * self.batches_per_epoch * self.world_size + self.rank
        orders: dict[int, torch.Tensor] = {}
        for i in range(self.batches_per_epoch):
            g = first + i * self.world_size
            pass_number, position = divmod(g, self.per_pass)
            if pass_number not in orders:  # one permutation per pass, not per batch
                orders = {pass_number: self._order(pass_number)}
            yield self._take(orders[pass_number], position, g)


def run_retrain(config: RunConfig, run_dir: Path, *, labelled: bool, env: DistEnv | None = None,
                progress: bool = True) -> dict:
    """Retrain the run's quantized model (label-free, or the labelled baseline) and write the result.

    Every rank of the job calls this with the same arguments; ``env`` defaults to :func:`detect_env`. Returns
    the summary that is written to ``retrain-<mode>.json``.

    Raises:
        ConfigError: no ``quantized.hpcq`` in ``run_dir``, or an unsupported labelled data set.
        DataError: too few unlabelled shards for the ranks and workers (one is held out for evaluation).
    """
    import torch

    from hpcq.artifact import load_artifact, save_artifact
    from hpcq.distill import retrain
    from hpcq.distributed import distributed_context
    from hpcq.fileio import atomic_write_json
    from hpcq.models import load_model
    from hpcq.quantize import apply_quantized_

    env = env or detect_env()
    run_dir = Path(run_dir)
    artifact_path, summary_path, checkpoint_dir = output_paths(run_dir, labelled)
    if artifact_path.is_file() and summary_path.is_file():
        log.info("%s exists: retraining (%s) is done", artifact_path, mode_name(labelled))
        return json.loads(summary_path.read_text())
    quantized_path = run_dir / "quantized.hpcq"
    if not quantized_path.is_file():
        raise ConfigError(f"{quantized_path} does not exist: quantize first (`hpcq quantize SPEC`)")

    rc = config.retrain
    with distributed_context(env, rc.backend, config.device) as device:
        loaded = load_artifact(quantized_path)
        source = loaded.header["model_source"]
        student = loaded.model
        apply_quantized_(student, loaded.quantized)
        teacher = None if labelled else load_model(source)
        if labelled:
            batches, data_info = _labelled_batches(config, env)
        else:
            batches, data_info = _unlabelled_batches(config, env)
        result = retrain(student, teacher, batches, config=rc, env=env, device=device,
                         checkpoint_dir=checkpoint_dir, labelled=labelled, quantized=loaded.quantized,
                         progress=progress, seed=config.seed)
        summary = {**result.to_dict(), "mode": mode_name(labelled),
                   # The label-free path never opens a labelled data set: only the unlabelled shards.
                   "labelled_images_used": result.images_seen if labelled else 0,
                   "world_size": env.world_size,
                   "launcher": env.launcher, "device": str(device), "data": data_info,
                   "artifact": str(artifact_path), "quantized_from": str(quantized_path),
                   "retrain": config_to_dict(rc), "seed": config.seed}
        if env.is_main:
            save_artifact(artifact_path, student.cpu(), result.quantized, model_source=source,
                          plan=loaded.header.get("plan"), extra={"retrain": summary, "labelled": labelled})
            atomic_write_json(summary_path, summary)
            log.info("wrote %s and %s", artifact_path, summary_path)
        if env.world_size > 1:
            torch.distributed.barrier()  # every rank returns once the outputs exist
    return summary


def _unlabelled_batches(config: RunConfig, env: DistEnv) -> tuple[LoaderEpochs, dict]:
    from hpcq.data.loaders import unlabelled_loader
    from hpcq.datasets import ensure_unlabelled_shards, split_unlabelled

    rc = config.retrain
    urls: list[str] | str = []
    if env.is_main:
        try:
            urls = ensure_unlabelled_shards(config)
        except DataError as exc:
            if env.world_size == 1:
                raise
            urls = str(exc)  # handed to the other ranks so that they fail too instead of waiting
    if env.world_size > 1:  # rank 0 writes the shards once; the others wait for their list
        import torch.distributed as dist

        box = [urls]
        dist.broadcast_object_list(box, src=0)
        urls = box[0]
    if isinstance(urls, str):
        raise DataError(urls)
    split = split_unlabelled(urls)
    train_urls = split.train
    loader = unlabelled_loader(
        train_urls, batch_size=rc.batch_size, rank=env.rank, world_size=env.world_size,
        num_workers=rc.num_workers, batches_per_epoch=rc.batches_per_epoch, shuffle_buffer=rc.shuffle_buffer,
        seed=config.seed, augment=rc.augment, mean=config.data.mean, std=config.data.std,
    )
    return LoaderEpochs(loader), {"kind": "unlabelled shards", "train_shards": len(train_urls),
                                  "held_out_shards": split.select + split.report}


def _labelled_batches(config: RunConfig, env: DistEnv) -> tuple[LabelledBatches, dict]:
    from hpcq.teacher import fashion_splits

    if config.data.labelled != "fashion-mnist":
        raise ConfigError(f"data.labelled {config.data.labelled!r} is not supported; use fashion-mnist")
    train = fashion_splits(config.data, config.teacher, config.seed).train
    rc = config.retrain
    batches = LabelledBatches(train.images, train.labels, batch_size=rc.batch_size,
                              batches_per_epoch=rc.batches_per_epoch, rank=env.rank, world_size=env.world_size,
                              seed=config.seed, augment=rc.augment)
    return batches, {"kind": "fashion-mnist train split", "images": int(train.images.shape[0])}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpcq.retrain_job SPEC [--labelled] [--set k=v ...]``, one process per rank."""
    from hpcq.config import load_config
    from hpcq.rundir import open_run_dir

    parser = argparse.ArgumentParser(prog="python -m hpcq.retrain_job",
                                     description="retrain RUN_DIR/quantized.hpcq (run once per rank)")
    parser.add_argument("spec", type=Path, nargs="?", help="run spec (YAML); the built-in defaults if omitted")
    parser.add_argument("--labelled", action="store_true", help="the labelled (cross-entropy) baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a spec value (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    try:
        env = detect_env()
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format=f"%(asctime)s rank{env.rank} %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        config = load_config(args.spec, args.overrides)
        run = open_run_dir(config)  # refuses a run directory that holds another spec
        summary = run_retrain(config, run.root, labelled=args.labelled, env=env,
                              progress=not args.no_progress)
    except HpcqError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("%s", exc)
        return USAGE_ERROR
    if env.is_main:
        log.info("summary: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
