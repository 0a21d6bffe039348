"""Students, teachers, model files, data sets and loaders."""
import pytest
import torch
from deitlab.core.models import build_classifier, build_student, load_teacher, save_model, student_heads
from deitlab.data.batches import ShardBatchSampler, batch_slices
from deitlab.data.loaders import BatchPipeline, DataBundle, TensorBatches, load_data, random_affine
from deitlab.errors import SpecError
from deitlab.spec.schema import AugmentSpec, DataSpec, DistillationSpec, StudentSpec

SMALL = StudentSpec(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_student_with_token_returns_two_heads_in_training_and_both_heads_in_eval():
    model = build_student(SMALL, DistillationSpec(mode="hard"), num_classes=10, in_chans=1, img_size=16)
    assert type(model).__name__ == "VisionTransformerDistilled"
    x = torch.randn(4, 1, 16, 16)
    model.train()
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (4, 10)
    model.eval()
    with torch.no_grad():
        c, d = student_heads(model, x)
        assert torch.allclose((c + d) / 2, model(x), atol=1e-5)  # timm's eval output is their mean
        assert not torch.allclose(c, d)


def test_student_without_token_for_baselines_and_class_token_kd():
    for distillation in (DistillationSpec(mode="none"), DistillationSpec(mode="soft", token=False)):
        model = build_student(SMALL, distillation, num_classes=3, in_chans=3, img_size=16)
        assert type(model).__name__ == "VisionTransformer"
        c, d = student_heads(model.eval(), torch.randn(2, 3, 16, 16))
        assert torch.equal(c, d)


def test_model_file_round_trip_and_frozen_teacher(tmp_path):
    model = build_classifier("test_resnet", {}, num_classes=10, in_chans=1)
    path = save_model(tmp_path / "t.pt", model, arch="test_resnet", model_kwargs={}, num_classes=10, in_chans=1,
                      metadata={"accuracy": 0.9})
    teacher, payload = load_teacher(path, num_classes=10, in_chans=1)
    assert payload["metadata"]["accuracy"] == 0.9
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model.eval()(x))
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temp file


@pytest.mark.parametrize("content,needle", [(b"not a checkpoint", "not a readable model checkpoint"),
                                            (None, "no such model checkpoint")])
def test_corrupt_or_missing_teacher_file(tmp_path, content, needle):
    path = tmp_path / "t.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError, match=needle):
        load_teacher(path, num_classes=10, in_chans=1)


def test_teacher_that_does_not_fit_the_data(tmp_path):
    model = build_classifier("test_resnet", {}, num_classes=5, in_chans=1)
    path = save_model(tmp_path / "t.pt", model, arch="test_resnet", model_kwargs={}, num_classes=5, in_chans=1)
    with pytest.raises(SpecError, match="5 classes"):
        load_teacher(path, num_classes=10, in_chans=1)
    with pytest.raises(SpecError, match="spec asks for 'resnet18'"):
        load_teacher(path, num_classes=5, in_chans=1, arch="resnet18")


def test_digits_split_is_real_fixed_and_resized():
    bundle = load_data(DataSpec(img_size=16))
    assert bundle.sizes == (1438, 359) and bundle.num_classes == 10 and bundle.in_chans == 1  # 20% of each class
    assert bundle.train[0].shape[1:] == (1, 16, 16)
    again = load_data(DataSpec(img_size=16))
    assert torch.equal(bundle.val[1], again.val[1])
    assert torch.bincount(bundle.val[1]).min() >= 35  # stratified: every digit in validation


@pytest.mark.parametrize("n,world,batch", [(10, 3, 2), (1438, 2, 16), (1438, 1, 32), (7, 4, 1), (11, 2, 5)])
def test_shards_cover_every_image_once_plus_documented_padding(n, world, batch):
    images, labels = torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n)
    for epoch in (0, 3):
        val_seen, train_seen, steps = [], [], set()
        for rank in range(world):
            val = TensorBatches((images, labels), batch, shuffle=False, rank=rank, world_size=world)
            val_seen += [int(v) for _, y in val for v in y]
            train = TensorBatches((images, labels), batch, shuffle=True, rank=rank, world_size=world, seed=1)
            train.set_epoch(epoch)
            batches = [y.tolist() for _, y in train]
            assert all(len(b) >= min(2, n // world) for b in batches)  # no batch of one (BatchNorm teachers)
            steps.add(len(batches))
            train_seen += [v for b in batches for v in b]
            sampler = ShardBatchSampler(n, batch, shuffle=True, rank=rank, world_size=world, seed=1)
            sampler.set_epoch(epoch)
            assert list(sampler) == batches and len(sampler) == len(batches)  # imagefolder: the same rule
        assert sorted(val_seen) == list(range(n))  # validation: exactly once, no padding
        assert len(steps) == 1  # equal steps per rank (DDP needs it)
        assert set(train_seen) == set(range(n))  # no image dropped
        assert len(train_seen) - n == (-n) % world  # padding: fewer than world_size repeats


def test_shards_reshuffle_per_epoch_and_match_one_worker_at_the_same_global_batch():
    n = 100
    images, labels = torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n)
    one = TensorBatches((images, labels), 20, shuffle=True, seed=5)
    two = [TensorBatches((images, labels), 10, shuffle=True, rank=r, world_size=2, seed=5) for r in range(2)]
    first = [y.tolist() for _, y in one]
    one.set_epoch(1)
    assert first != [y.tolist() for _, y in one]
    for loader in two:
        loader.set_epoch(1)
    # each global step sees the same images whether one worker or two share it
    for single, *pair in zip(one, *two):
        assert sorted(single[1].tolist()) == sorted(pair[0][1].tolist() + pair[1][1].tolist())


def test_batch_slices_merge_a_single_trailing_image():
    assert batch_slices(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert batch_slices(9, 3) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert batch_slices(1, 3) == [slice(0, 1)]


def test_random_affine_identity_and_shift():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3:5, 3:5] = 1
    assert torch.allclose(random_affine(x, 0, 0, (1, 1), False), x, atol=1e-5)
    moved = random_affine(x.repeat(16, 1, 1, 1), 0, 0.25, (1, 1), False)
    assert not torch.allclose(moved, x.repeat(16, 1, 1, 1))


def test_mixup_targets_are_smoothed_distributions():
    bundle = load_data(DataSpec(dataset="synthetic", synthetic_size=64, img_size=8))
    pipeline = BatchPipeline(bundle, AugmentSpec(mixup=0.8, cutmix=1.0, label_smoothing=0.1), torch.device("cpu"))
    images, targets = pipeline.train_batch(bundle.train[0][:8], bundle.train[1][:8])
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing spreads mass on every class


def test_imagefolder_needs_train_and_val(tmp_path):
    with pytest.raises(Exception, match="no 'train/' folder"):
        DataSpec(dataset="imagefolder", path=str(tmp_path))


def test_imagefolder_loads_real_png_files(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
    bundle = load_data(DataSpec(dataset="imagefolder", path=str(tmp_path), img_size=16))
    assert isinstance(bundle, DataBundle) and bundle.num_classes == 2 and bundle.sizes == (8, 8)
    image, label = bundle.val[0]
    assert image.shape == (3, 16, 16)
