"""Tests of retraining: the distillation loss, trainable codebooks, the training loop with checkpoints and
resume, the labelled baseline, the retrain stage, and launcher detection (hpcq.distill, hpcq.retrain_job,
hpcq.distributed). Everything runs for real on tiny models and tiny shards; nothing is mocked."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcq.artifact import load_artifact, save_artifact
from hpcq.config import KMeansConfig, RetrainConfig, RunConfig, from_dict
from hpcq.data.loaders import finite_unlabelled_batches, unlabelled_loader
from hpcq.data.shards import image_folder_samples, shard_urls, write_shards
from hpcq.distill import (
    attach_trainable_codebooks,
    checkpoint_paths,
    detach_codebooks,
    distillation_loss,
    retrain,
)
from hpcq.distributed import DistEnv, detect_env, distributed_context
from hpcq.errors import ConfigError
from hpcq.qtensor import QuantizedTensor
from hpcq.quantize import Plan, quantize_
from hpcq.retrain_job import LabelledBatches, LoaderEpochs, output_paths, run_retrain
from hpcq.zoo import fashion_vgg

SMALL_KWARGS = {"width": 4, "hidden": 32}
FACTORY = "hpcq.zoo:fashion_vgg"
# Both hidden fully connected layers quantized hard (4 centroids, one for each bias); the convolutions,
# BatchNorm and the last layer train.
PLAN = Plan(weights={"classifier.1": 4, "classifier.4": 4}, biases={"classifier.1": 1, "classifier.4": 1})
MEAN, STD = (0.2860,), (0.3530,)
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def one_thread():
    """Two torch threads on a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- helpers (test_ddp imports them too) -----------------------------------------------------------------


def make_teacher(seed: int = 0) -> torch.nn.Module:
    """A small FashionVGG with seeded random weights; its last layer is scaled up so that its outputs are
    confident, like a trained model's, and the distillation problem is not trivial."""
    torch.manual_seed(seed)
    model = fashion_vgg(**SMALL_KWARGS)
    with torch.no_grad():
        model.classifier[7].weight.mul_(8.0)
    return model.eval()


def make_student(teacher: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, QuantizedTensor]]:
    """A copy of the teacher quantized with PLAN (quantized parameters frozen)."""
    student = copy.deepcopy(teacher)
    quantized = quantize_(student, PLAN, KMeansConfig(), progress=False)
    return student, quantized


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` distinct small RGB PNGs (random blobs; every image differs in its pixel pattern)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        pixels[: 1 + i % 30, :, :] = 0  # a black band of a per-image height: no two images alike
        Image.fromarray(pixels, "RGB").save(root / f"img_{i:03d}.png")
    return root


def write_test_shards(tmp_path: Path, count: int = 48, shard_size: int = 6) -> tuple[Path, Path, list[str]]:
    """(image folder, shard folder, shard urls) of ``count`` images in shards of ``shard_size``."""
    images = write_images(tmp_path / "images", count)
    out = tmp_path / "shards"
    description = {"source": str(images.resolve()), "image_size": 28, "channels": 1, "shard_size": shard_size}
    write_shards(image_folder_samples(images, 28, 1), out, shard_size, description=description)
    return images, out, shard_urls(out)


def small_config(**overrides) -> RetrainConfig:
    values = {"epochs": 2, "batches_per_epoch": 4, "batch_size": 8, "lr": 3e-3, "checkpoint_every_steps": 3,
              "num_workers": 0, "shuffle_buffer": 16, "augment": False, "temperature": 2.0}
    values.update(overrides)
    return RetrainConfig(**values)


def shard_epochs(urls: list[str], config: RetrainConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> LoaderEpochs:
    loader = unlabelled_loader(urls, batch_size=config.batch_size, rank=rank, world_size=world_size,
                               num_workers=config.num_workers, batches_per_epoch=config.batches_per_epoch,
                               shuffle_buffer=config.shuffle_buffer, seed=seed, augment=config.augment,
                               mean=MEAN, std=STD)
    return LoaderEpochs(loader)


def memory_epochs(images: torch.Tensor, batch_size: int, batches_per_epoch: int, labels=None):
    """batches_for_epoch over in-memory tensors: epoch e is a permutation seeded by e."""

    def batches(epoch: int):
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(epoch))
        for i in range(batches_per_epoch):
            idx = order[(i * batch_size) % images.shape[0]:][:batch_size]
            yield images[idx] if labels is None else (images[idx], labels[idx])

    return batches


def held_out_loss(student, teacher, batches, kind="kl", temperature=2.0) -> float:
    student.eval()
    losses = [float(distillation_loss(student(x), teacher(x), kind, temperature)) for x in batches]
    return sum(losses) / len(losses)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


# --- the loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_is_zero_for_equal_outputs_and_positive_otherwise(kind, temperature):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 10, generator=g) * 3
    assert float(distillation_loss(teacher.clone(), teacher, kind, temperature)) == 0.0
    other = teacher + torch.randn(16, 10, generator=g)
    assert float(distillation_loss(other, teacher, kind, temperature)) > 0.0


def test_kl_loss_is_softened_kl_times_t_squared():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    p, q = torch.softmax(t / 3, 1), torch.softmax(s / 3, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * 9
    assert torch.allclose(distillation_loss(s, t, "kl", 3.0), expected, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, "mse", 3.0), ((s - t) ** 2).mean())


def test_loss_gradient_reaches_only_the_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distillation_loss(s, t, "kl", 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="kl, mse"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1", 1.0)


# --- label-free retraining over shards --------------------------------------------------------------------


def test_retrain_lowers_distillation_loss_and_never_changes_quantized_parameters(tmp_path):
    _, _, urls = write_test_shards(tmp_path)
    teacher = make_teacher()
    student, quantized = make_student(teacher)
    held_out = list(finite_unlabelled_batches(urls[-1:], batch_size=16, mean=MEAN, std=STD))
    before = snapshot(student)
    with torch.no_grad():
        loss_before = held_out_loss(student, teacher, held_out)
    config = small_config(epochs=4, batches_per_epoch=5, lr=5e-3)

    result = retrain(student, teacher, shard_epochs(urls[:-1], config), config=config, env=DistEnv(),
                     device="cpu", checkpoint_dir=tmp_path / "ckpt", quantized=quantized, progress=False)

    with torch.no_grad():
        loss_after = held_out_loss(student, teacher, held_out)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    after = snapshot(student)
    for name, qt in quantized.items():  # bit for bit
        assert torch.equal(after[name], before[name]), name
        assert torch.equal(after[name], qt.dequantize()), name
    trainable = ["features.0.weight", "features.1.weight", "features.1.bias", "classifier.7.weight",
                 "classifier.7.bias"]
    for name in trainable:
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    # BatchNorm keeps the statistics of the original data while the student sees other images.
    for name in before:
        if "running_" in name or "num_batches_tracked" in name:
            assert torch.equal(after[name], before[name]), name
    assert not student.training
    assert (result.steps, result.epochs, result.images_seen) == (20, 4, 160)
    assert result.resumed_from_step is None
    assert all(result.quantized[name] is qt for name, qt in quantized.items())
    assert result.final_loss > 0 and result.seconds > 0


def test_teacher_is_not_changed_by_retraining(tmp_path):
    teacher = make_teacher()
    student, quantized = make_student(teacher)
    before = snapshot(teacher)
    images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    config = small_config()
    retrain(student, teacher, memory_epochs(images, 8, 4), config=config, env=DistEnv(), device="cpu",
            checkpoint_dir=tmp_path / "ckpt", quantized=quantized, progress=False)
    after = snapshot(teacher)
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- trainable codebooks ------------------------------------------------------------------------------------


def test_train_codebooks_moves_centroids_but_keeps_k_values_and_indices(tmp_path):
    teacher = make_teacher()
    student, quantized = make_student(teacher)
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    config = small_config(train_codebooks=True, epochs=2, lr=1e-3)

    result = retrain(student, teacher, memory_epochs(images, 8, 4), config=config, env=DistEnv(),
                     device="cpu", checkpoint_dir=tmp_path / "ckpt", quantized=quantized, progress=False)

    params = dict(student.named_parameters())
    assert set(result.quantized) == set(quantized)
    moved = 0
    for name, old in quantized.items():
        new = result.quantized[name]
        assert new.k == old.k
        assert torch.equal(new.indices, old.indices), name
        assert new.indices.dtype == old.indices.dtype
        assert torch.all(new.codebook[1:] >= new.codebook[:-1]), "codebook no longer ascending"
        assert torch.unique(params[name].detach()).numel() <= old.k
        assert torch.equal(params[name].detach(), new.dequantize())
        assert not params[name].requires_grad
        moved += not torch.equal(new.codebook, old.codebook)
    assert moved == len(quantized), "every codebook should have trained"
    # The parametrization is gone: plain parameters under their own names again.
    assert not any("parametrizations" in name for name in student.state_dict())


def test_detach_codebooks_sorts_crossed_centroids_and_remaps_indices():
    codebook = torch.tensor([-1.0, 0.0, 2.0])
    indices = torch.tensor([[0, 1, 2], [2, 2, 0]], dtype=torch.uint8)
    layer = torch.nn.Linear(3, 2, bias=False)
    model = torch.nn.Sequential(layer)
    attach_trainable_codebooks(model, {"0.weight": QuantizedTensor(codebook, indices)})
    assert torch.equal(layer.weight, codebook[indices.long()])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.parametrizations.weight.0.codebook"]
    with torch.no_grad():  # training made centroids cross
        layer.parametrizations.weight[0].codebook.copy_(torch.tensor([3.0, 0.5, -2.0]))
    values = layer.weight.detach().clone()

    (name, qt), = detach_codebooks(model).items()

    assert name == "0.weight"
    assert torch.equal(qt.codebook, torch.tensor([-2.0, 0.5, 3.0]))
    assert torch.equal(qt.indices, torch.tensor([[2, 1, 0], [0, 0, 2]], dtype=torch.uint8))
    assert torch.equal(qt.dequantize(), values)
    assert torch.equal(layer.weight, values) and not layer.weight.requires_grad


# --- checkpoints and resume ---------------------------------------------------------------------------------


def _run(tmp_path, ckpt: str, config: RetrainConfig, images, **kwargs):
    teacher = make_teacher()
    student, quantized = make_student(teacher)
    result = retrain(student, teacher, memory_epochs(images, config.batch_size, config.batches_per_epoch),
                     config=config, env=DistEnv(), device="cpu", checkpoint_dir=tmp_path / ckpt,
                     quantized=quantized, progress=False, seed=7, **kwargs)
    return student, result


def test_resume_after_an_epoch_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, caplog):
    images = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    full, full_result = _run(tmp_path, "full", small_config(epochs=3), images)

    _, first = _run(tmp_path, "split", small_config(epochs=1), images)
    assert first.steps == 4 and first.epochs == 1
    with caplog.at_level("INFO", logger="hpcq.distill"):
        resumed, second = _run(tmp_path, "split", small_config(epochs=3), images)

    assert second.resumed_from_step == 4
    assert "resumed from" in caplog.text
    assert (second.steps, second.epochs, second.images_seen) == (12, 3, 96)
    assert second.images_this_call == 64
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    for name in full_state:
        assert torch.equal(full_state[name], resumed_state[name]), name
    assert second.final_loss == pytest.approx(full_result.final_loss, rel=1e-12)


def test_resume_in_the_middle_of_an_epoch_skips_the_batches_done(tmp_path):
    images = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    config = small_config(epochs=2, checkpoint_every_steps=3)
    full, full_result = _run(tmp_path, "full", config, images)

    _, stopped = _run(tmp_path, "split", config, images, max_steps=6)  # epoch 1, batch 2 of 4
    assert stopped.steps == 6 and stopped.epochs == 1
    steps = [int(p.stem.split("-")[1]) for p in checkpoint_paths(tmp_path / "split")]
    assert steps == [4, 6], "keeps the latest two checkpoints"
    resumed, result = _run(tmp_path, "split", config, images)

    assert result.resumed_from_step == 6 and result.steps == 8 and result.images_this_call == 16
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert result.final_loss == pytest.approx(full_result.final_loss, rel=1e-12)
    # A finished run found again does no more steps.
    again_student, again = _run(tmp_path, "split", config, images)
    assert again.steps == 8 and again.images_this_call == 0 and again.resumed_from_step == 8
    assert again.final_loss == pytest.approx(full_result.final_loss, rel=1e-12)
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, again_student.state_dict()[name]), name


def test_checkpoints_of_another_kind_of_retraining_are_refused(tmp_path):
    images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    _run(tmp_path, "ckpt", small_config(epochs=1), images)
    with pytest.raises(ConfigError, match="different retraining"):
        _run(tmp_path, "ckpt", small_config(epochs=2, train_codebooks=True), images)


def test_nothing_to_train_is_a_config_error(tmp_path):
    teacher = make_teacher()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to"):
        retrain(student, teacher, memory_epochs(torch.zeros(8, 1, 28, 28), 8, 1), config=small_config(),
                env=DistEnv(), device="cpu", checkpoint_dir=tmp_path / "c", progress=False)


def test_too_few_batches_is_a_data_error(tmp_path):
    from hpcq.errors import DataError

    teacher = make_teacher()
    student, quantized = make_student(teacher)
    with pytest.raises(DataError, match="ended after 1 of 4"):
        retrain(student, teacher, lambda epoch: [torch.zeros(8, 1, 28, 28)], config=small_config(),
                env=DistEnv(), device="cpu", checkpoint_dir=tmp_path / "c", quantized=quantized, progress=False)


# --- the labelled baseline ----------------------------------------------------------------------------------


def test_labelled_retraining_lowers_cross_entropy(tmp_path):
    teacher = make_teacher()
    student, quantized = make_student(teacher)
    g = torch.Generator().manual_seed(8)
    images = torch.randn(64, 1, 28, 28, generator=g)
    with torch.no_grad():
        labels = teacher(images).argmax(1)  # a function the student can learn
    config = small_config(epochs=6, batches_per_epoch=8, lr=1e-2)
    before = snapshot(student)
    with torch.no_grad():
        student.eval()
        ce_before = float(torch.nn.functional.cross_entropy(student(images), labels))

    result = retrain(student, None, memory_epochs(images, 8, 8, labels), config=config, env=DistEnv(),
                     device="cpu", checkpoint_dir=tmp_path / "ckpt", labelled=True, quantized=quantized,
                     progress=False)

    with torch.no_grad():
        ce_after = float(torch.nn.functional.cross_entropy(student(images), labels))
    assert ce_after < 0.8 * ce_before, (ce_before, ce_after)
    assert result.labelled and result.steps == 48
    for name in quantized:
        assert torch.equal(student.state_dict()[name], before[name])


def test_label_free_retraining_needs_the_teacher(tmp_path):
    student, quantized = make_student(make_teacher())
    with pytest.raises(ConfigError, match="teacher"):
        retrain(student, None, memory_epochs(torch.zeros(8, 1, 28, 28), 8, 1), config=small_config(),
                env=DistEnv(), device="cpu", checkpoint_dir=tmp_path / "c", quantized=quantized, progress=False)


def test_labelled_batches_split_ranks_disjointly_and_deterministically():
    images = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1)
    labels = torch.arange(40)

    def make(rank):
        return LabelledBatches(images, labels, batch_size=4, batches_per_epoch=3, rank=rank, world_size=2,
                               seed=1, augment=False)

    for epoch in range(4):  # 10 batches per pass, 6 per epoch over both ranks: cycles through passes
        seen = [[tuple(y.tolist()) for _, y in make(rank)(epoch)] for rank in (0, 1)]
        assert all(len(batches) == 3 for batches in seen)
        assert not set(seen[0]) & set(seen[1])
        assert seen == [[tuple(y.tolist()) for _, y in make(rank)(epoch)] for rank in (0, 1)]
    first_pass = {label for epoch in (0,) for rank in (0, 1) for _, y in make(rank)(epoch) for label in y.tolist()}
    assert len(first_pass) == 24  # 6 batches of 4 distinct images


# --- the stage ----------------------------------------------------------------------------------------------


def make_run_dir(tmp_path: Path, **retrain_overrides) -> tuple[RunConfig, Path]:
    """A run directory holding quantized.hpcq of the small teacher, and a RunConfig pointing at tiny shards."""
    images, shards, _ = write_test_shards(tmp_path)
    teacher = make_teacher()
    checkpoint = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), checkpoint)
    source = {"kind": "factory", "factory": FACTORY, "kwargs": dict(SMALL_KWARGS), "checkpoint": str(checkpoint)}
    student, quantized = make_student(teacher)
    run_dir = tmp_path / "run"
    save_artifact(run_dir / "quantized.hpcq", student, quantized, model_source=source, plan=PLAN.to_dict())
    retrain_section = {"epochs": 1, "batches_per_epoch": 3, "batch_size": 8, "num_workers": 0,
                       "shuffle_buffer": 8, "checkpoint_every_steps": 2, "lr": 3e-3}
    retrain_section.update(retrain_overrides)
    config = from_dict(RunConfig, {
        "run_dir": str(run_dir), "device": "cpu",
        "model": {"kind": "factory", "factory": FACTORY, "kwargs": dict(SMALL_KWARGS), "checkpoint": str(checkpoint)},
        "data": {"unlabelled": str(images), "shard_dir": str(shards), "shard_size": 6},
        "retrain": retrain_section,
    })
    return config, run_dir


def test_run_retrain_label_free_writes_the_artifact_and_summary_once(tmp_path):
    config, run_dir = make_run_dir(tmp_path)
    quantized_before = load_artifact(run_dir / "quantized.hpcq")

    summary = run_retrain(config, run_dir, labelled=False, env=DistEnv(), progress=False)

    artifact, summary_path, checkpoints = output_paths(run_dir, labelled=False)
    assert artifact == run_dir / "label_free.hpcq" and summary_path == run_dir / "retrain-label_free.json"
    assert json.loads(summary_path.read_text()) == json.loads(json.dumps(summary))
    assert summary["steps"] == 3 and summary["mode"] == "label_free" and summary["labelled_images_used"] == 0
    assert summary["data"]["train_shards"] == 6  # of 8: the last two are held out
    assert [p.name for p in checkpoint_paths(checkpoints)] == ["step-00000002.pt", "step-00000003.pt"]
    loaded = load_artifact(artifact)
    assert loaded.header["model_source"] == quantized_before.header["model_source"]
    assert loaded.header["plan"] == PLAN.to_dict()
    assert loaded.header["extra"]["labelled"] is False
    assert loaded.header["extra"]["retrain"]["steps"] == 3
    for name, qt in quantized_before.quantized.items():  # codebooks did not train
        assert torch.equal(loaded.quantized[name].codebook, qt.codebook)
        assert torch.equal(loaded.quantized[name].indices, qt.indices)
    retrained = loaded.model.state_dict()
    assert not torch.equal(retrained["classifier.7.weight"], quantized_before.model.state_dict()["classifier.7.weight"])

    mtime = artifact.stat().st_mtime_ns
    assert run_retrain(config, run_dir, labelled=False, env=DistEnv(), progress=False) == json.loads(
        summary_path.read_text())
    assert artifact.stat().st_mtime_ns == mtime


def test_run_retrain_with_trainable_codebooks_stores_them(tmp_path):
    config, run_dir = make_run_dir(tmp_path, train_codebooks=True)
    before = load_artifact(run_dir / "quantized.hpcq").quantized
    run_retrain(config, run_dir, labelled=False, env=DistEnv(), progress=False)
    after = load_artifact(run_dir / "label_free.hpcq").quantized
    for name, qt in before.items():
        assert not torch.equal(after[name].codebook, qt.codebook)
        assert torch.equal(after[name].indices, qt.indices)


def test_run_retrain_without_a_quantized_model_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="quantize first"):
        run_retrain(RunConfig(run_dir=str(tmp_path)), tmp_path, labelled=False, env=DistEnv(), progress=False)


@pytest.mark.skipif(not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
def test_run_retrain_labelled_on_fashion_mnist(tmp_path):
    config, run_dir = make_run_dir(tmp_path)
    summary = run_retrain(config, run_dir, labelled=True, env=DistEnv(), progress=False)
    assert summary["mode"] == "labelled" and summary["labelled"] is True and summary["steps"] == 3
    assert summary["data"]["images"] == 55000 and summary["labelled_images_used"] == 24
    loaded = load_artifact(run_dir / "labelled.hpcq")
    assert loaded.header["extra"]["labelled"] is True
    assert (run_dir / "retrain-labelled.json").is_file()
    assert not (run_dir / "label_free.hpcq").exists()


# --- launcher detection -------------------------------------------------------------------------------------


def test_detect_single_process():
    assert detect_env({}) == DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    assert detect_env({"WORLD_SIZE": "1"}) == DistEnv()


def test_detect_torchrun():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                      "MASTER_PORT": "29999", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env == DistEnv(3, 4, 1, "node7", 29999, "torchrun")
    assert not env.is_main and env.distributed


def test_detect_slurm():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[03-06,9],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu03"
    assert env.master_port == 12000 + 123456 % 20000
    # The port is the same on every rank of the job, and differs between jobs.
    other = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                        "SLURM_JOB_NODELIST": "gpu[03-06,9],cpu1", "SLURM_JOB_ID": "123457"})
    assert other.master_port == env.master_port + 1 and other.master_addr == "gpu03"


def test_detect_slurm_plain_host_and_master_override():
    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                      "SLURM_JOB_NODELIST": "login1", "SLURM_JOB_ID": "7", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("login1", 4000)


def test_detect_pbs_with_open_mpi(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("g0001\ng0001\ng0002\ng0002\n")
    env = detect_env({"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "98765.pbs1", "OMPI_COMM_WORLD_RANK": "3",
                      "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert env == DistEnv(3, 4, 1, "g0001", 12000 + 98765 % 20000, "pbs")


def test_detect_pbs_with_pmi_derives_the_local_rank(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("g0001\ng0001\ng0002\ng0002\n")
    env = detect_env({"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "5.pbs", "PMI_RANK": "2", "PMI_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (2, 4, 0, "g0001")
    alone = detect_env({"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "5.pbs"})
    assert (alone.world_size, alone.launcher) == (1, "pbs")


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside 0..1"),
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "must be an integer"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1"}, "outside"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "n1"}, "local rank"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS is not"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "no PBS job"),
])
def test_inconsistent_launcher_variables_are_config_errors(environ, message):
    with pytest.raises(ConfigError, match=message):
        detect_env(environ)


def test_inconsistent_pbs_variables_are_config_errors(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="outside"):
        detect_env({"PBS_NODEFILE": str(nodefile), "PMI_RANK": "2", "PMI_SIZE": "2"})
    with pytest.raises(ConfigError, match="cannot be read"):
        detect_env({"PBS_NODEFILE": str(tmp_path / "missing"), "PMI_RANK": "0", "PMI_SIZE": "1"})
    with pytest.raises(ConfigError, match="local rank variable"):
        detect_env({"PBS_NODEFILE": str(nodefile), "PMI_RANK": "0", "PMI_SIZE": "3"})


def test_distributed_context_for_one_process_needs_no_process_group():
    with distributed_context(DistEnv(), device="cpu") as device:
        assert device == torch.device("cpu")
        assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_nccl_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        with distributed_context(DistEnv(), backend="nccl"):
            pass
