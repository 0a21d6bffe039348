"""Pretrained weights through timm's own loader, from a hub cache the test builds; the teacher's input convention;
repeated augmentation; how the two heads are fused."""
import math

import pytest
import torch
from deitlab.core.distill import head_predictions
from deitlab.core.pretrained import (
    InputConfig,
    TeacherInput,
    adapt_teacher,
    create_pretrained,
    file_sha256,
    weights_file,
)
from deitlab.data.batches import shard_indices
from deitlab.errors import SpecError


def test_pretrained_weights_load_from_the_hub_cache_by_checksum_and_forward(hub_cache):
    import timm

    sha = hub_cache.add("test_resnet.r160_in1k", seed=3)
    model = create_pretrained("test_resnet.r160_in1k")
    assert file_sha256(weights_file(model)) == sha
    torch.manual_seed(3)
    written = timm.create_model("test_resnet.r160_in1k")  # what HubCache saved
    for key, value in written.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(x), written.eval()(x))
    # a new head and one input channel, by timm's rules: the body keeps the weights
    adapted = create_pretrained("test_resnet.r160_in1k", num_classes=10, in_chans=1)
    assert adapted.num_classes == 10 and adapted.fc.weight.shape[0] == 10
    assert torch.equal(adapted.layer1[0].conv1.weight, written.layer1[0].conv1.weight)
    first = adapted.conv1[0].weight
    assert first.shape[1] == 1 and torch.allclose(first[:, 0], written.conv1[0].weight.sum(dim=1))
    # the same weights under their hub name
    assert torch.equal(create_pretrained("hf-hub:timm/test_resnet.r160_in1k").fc.weight, written.fc.weight)


def test_weights_neither_cached_nor_reachable_say_what_to_do():
    with pytest.raises(SpecError, match=r"neither in the Hugging Face cache .* `deitlab teacher import test_vit3"):
        create_pretrained("test_vit3.r160_in1k")  # never added to this session's cache; offline


def test_a_teacher_sees_pixels_in_its_own_convention():
    """Data normalised with its own statistics; a teacher trained with mean 0.5, std 0.5 at another size must see
    (raw - 0.5) / 0.5, resized — checked against the raw pixels."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean(dim=(2, 3))

    raw = torch.rand(2, 3, 8, 8)
    data = InputConfig((0.2, 0.3, 0.4), (0.1, 0.2, 0.3), 8)
    normalised = (raw - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)
    same_size = TeacherInput(Probe(), data, InputConfig((0.5,) * 3, (0.5,) * 3, 8))
    same_size(normalised)
    assert torch.allclose(seen[-1], (raw - 0.5) / 0.5, atol=1e-5)
    bigger = TeacherInput(Probe(), data, InputConfig((0.5,) * 3, (0.5,) * 3, 16))
    bigger(normalised)
    expected = torch.nn.functional.interpolate((raw - 0.5) / 0.5, size=(16, 16), mode="bilinear",
                                               align_corners=False, antialias=True)
    assert seen[-1].shape == (2, 3, 16, 16) and torch.allclose(seen[-1], expected, atol=1e-5)
    probe = Probe()
    assert adapt_teacher(probe, data, data) is probe and adapt_teacher(probe, data, None) is probe


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("repeats", [1, 3])
def test_repeated_augmentation_repeats_each_image_across_ranks_and_keeps_the_epoch_length(world_size, repeats):
    n = 30
    shards = [shard_indices(n, rank, world_size, seed=7, epoch=2, repeats=repeats) for rank in range(world_size)]
    plain = [shard_indices(n, rank, world_size, seed=7, epoch=2) for rank in range(world_size)]
    assert [len(s) for s in shards] == [len(s) for s in plain] == [math.ceil(n / world_size)] * world_size
    counts = torch.bincount(torch.cat(shards), minlength=n)
    used = counts[counts > 0]
    if repeats == 1:
        assert (used == 1).sum() >= n - (world_size - 1) and used.max() <= 2  # the padding repeats at most w-1
    else:
        # each image taken appears `repeats` times (the last one may be cut), about n / repeats distinct images
        assert (used == repeats).sum() >= len(used) - 1 and used.max() == repeats
        assert len(used) == math.ceil(sum(len(s) for s in shards) / repeats)
        if world_size >= repeats:  # its copies are on different ranks, each augmented there
            for image in torch.nonzero(counts == repeats).flatten().tolist():
                assert sum(int((s == image).any()) for s in shards) == repeats
    # deterministic per (seed, epoch), another epoch another order
    assert torch.equal(shards[0], shard_indices(n, 0, world_size, seed=7, epoch=2, repeats=repeats))
    assert not torch.equal(shards[0], shard_indices(n, 0, world_size, seed=7, epoch=3, repeats=repeats))


def test_fused_logits_and_fused_softmax_can_disagree():
    """By hand: cls [2, 0, 0], dist [0, 3, 2.9]. Mean logits [1, 1.5, 1.45] -> class 1 (the official code, timm).
    Softmaxes: cls [0.787, 0.107, 0.107], dist [0.026, 0.512, 0.463]; their mean [0.406, 0.309, 0.285] -> class 0."""
    cls, dist = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 2.9]])
    assert head_predictions(cls, dist, "logits")["fused"].item() == 1
    assert head_predictions(cls, dist, "softmax")["fused"].item() == 0
    assert head_predictions(cls, dist)["fused"].item() == 1  # logits by default


def test_a_pretrained_student_keeps_the_weights_that_fit_and_resamples_its_position_embedding(hub_cache):
    """DeiT Table 7's starting point: timm's DeiT-Ti (with the token) at 224 px / 1000 classes, started at 32 px on
    10 classes: the blocks are the hub's, the position embedding is resampled from 14×14 to 2×2, the heads are new."""
    import timm
    from deitlab.core.models import build_student
    from deitlab.spec.schema import DistillationSpec, StudentSpec

    hub_cache.add("deit_tiny_distilled_patch16_224.fb_in1k", seed=1)
    torch.manual_seed(1)
    hub = timm.create_model("deit_tiny_distilled_patch16_224.fb_in1k")
    student = build_student(StudentSpec(arch="deit_tiny_patch16_224.fb_in1k", pretrained=True),
                            DistillationSpec(mode="hard", token=True), num_classes=10, in_chans=3, img_size=32)
    assert torch.equal(student.blocks[5].mlp.fc1.weight, hub.blocks[5].mlp.fc1.weight)
    assert torch.equal(student.dist_token, hub.dist_token) and torch.equal(student.cls_token, hub.cls_token)
    assert student.pos_embed.shape == (1, 2 + 4, 192) and torch.equal(student.pos_embed[:, :2], hub.pos_embed[:, :2])
    assert student.head.out_features == 10 and student.head_dist.out_features == 10
    assert student.distilled_training  # the training forward returns both heads
