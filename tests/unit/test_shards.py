"""Parquet packs (local and S3) and the device-side decode + augmentation, on tiny images and the CPU."""
import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_STUDENT, s3_client
from deitlab.cli.app import app
from deitlab.data import gpu_augment as G
from deitlab.data.loaders import data_fingerprint, load_data
from deitlab.data.shards import ParquetBatches, ParquetPack, check_imagefolder, pack_imagefolder
from deitlab.errors import SpecError
from deitlab.spec.base import validate
from deitlab.spec.schema import DataSpec, ExperimentSpec
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from typer.testing import CliRunner

CLASSES = ("ant", "bee", "cat")
# torchvision 0.29 deprecates its decoders (for TorchCodec) and warns on every call
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CPU = torch.device("cpu")


def _image(rng, h: int, w: int, gray: bool = False) -> Image.Image:
    """Smooth random colours plus noise: distinct bytes for every file."""
    base = rng.random((3, 3) if gray else (3, 3, 3))
    arr = np.kron(base, np.ones((math.ceil(h / 3), math.ceil(w / 3)) + (() if gray else (1,))))[:h, :w]
    arr = np.clip(arr * 200 + rng.integers(0, 50, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L" if gray else "RGB")


def make_folder(root: Path) -> Path:
    """3 classes, 9 training and 3 validation images each (24×24, some 24×32), one PNG, one grayscale JPEG."""
    rng = np.random.default_rng(7)
    for split, count in (("train", 9), ("val", 3)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _image(rng, 24, 32 if i % 3 == 0 else 24).save(folder / f"{i:02d}.jpg", quality=90)
    _image(rng, 24, 24).save(root / "train" / "bee" / "png-image.png")
    _image(rng, 24, 24, gray=True).save(root / "train" / "cat" / "gray.jpg", quality=90)
    (root / "train" / "ant" / "notes.txt").write_text("not an image: ignored, as by ImageFolder")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def pack(folder, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("packs") / "tiny"
    pack_imagefolder(folder, str(dest), shard_rows=10, group_rows=4)
    return dest


def _rows(uri: str, split: str = "train"):
    images = ParquetPack(uri).split(split)
    data, labels = images.rows(range(len(images)))
    return [bytes(t.numpy()) for t in data], labels.tolist()


# ---------------------------------------------------------------------------------------------------------- pack
def test_local_round_trip_keeps_imagefolder_order_and_pixels(folder, pack):
    from torchvision.datasets import ImageFolder

    meta = json.loads((pack / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert {s: meta["splits"][s]["rows"] for s in ("train", "val")} == {"train": 29, "val": 9}
    assert [s["rows"] for s in meta["splits"]["train"]["shards"]] == [10, 10, 9]
    assert meta["splits"]["train"]["shards"][0]["row_groups"] == [4, 4, 2]
    opened = ParquetPack(str(pack))
    assert opened.num_classes == 3 and opened.sizes == (29, 9)

    for split in ("train", "val"):
        reference = ImageFolder(str(folder / split))
        table = pq.read_table([str(pack / s["file"]) for s in meta["splits"][split]["shards"]])
        assert table.column("index").to_pylist() == list(range(len(reference)))
        assert table.column("path").to_pylist() == [str(Path(p).relative_to(folder)) for p, _ in reference.samples]
        data, labels = _rows(str(pack), split)
        assert labels == [label for _, label in reference.samples] == table.column("label").to_pylist()
        for (path, _), stored in zip(reference.samples, data):
            decoded = decode_jpeg(torch.frombuffer(bytearray(stored), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if path.endswith(".png"):  # re-encoded as JPEG (quality 95): close, not equal
                source = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
                assert (decoded.float() - source.float()).abs().mean() < 4
            else:  # stored byte for byte; grayscale decodes to three equal channels
                assert stored == Path(path).read_bytes()
                assert torch.equal(decoded, decode_image(path, mode=ImageReadMode.RGB))
    assert decoded.shape[0] == 3


def test_training_batches_follow_the_sharding_rule_and_validation_counts_once(pack):
    split = ParquetPack(str(pack)).split("train", cache_bytes=1)  # a cache of one batch: evictions on every read
    data, _ = _rows(str(pack))
    index_of = {b: i for i, b in enumerate(data)}
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = ParquetBatches(split, 4, shuffle=True, rank=rank, world_size=2, seed=3)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            for images, labels in batches:
                assert isinstance(images, G.EncodedImages) and labels.dtype == torch.int64
                seen += [index_of[bytes(t.numpy())] for t in images.data]
        assert sorted(set(seen)) == list(range(29))  # every training image...
        assert len(seen) - 29 <= 1  # ...padded by at most world_size - 1 repeats
        orders.append(seen)
    assert orders[0] != orders[1]

    val = ParquetPack(str(pack)).split("val")
    val_data, _ = _rows(str(pack), "val")
    seen = []
    for rank in (0, 1):
        for images, _ in ParquetBatches(val, 2, shuffle=False, rank=rank, world_size=2):
            seen.append([val_data.index(bytes(t.numpy())) for t in images.data])
    flat = [i for batch in seen for i in batch]
    assert sorted(flat) == list(range(9)) and flat == sorted(flat[:5]) + sorted(flat[5:])  # once each, in order


def test_s3_round_trip_and_refusals(folder, pack, s3_endpoint):
    s3_client(s3_endpoint).create_bucket(Bucket="packs")
    uri = f"s3://packs/tiny?endpoint_override={s3_endpoint}&scheme=http"
    written = pack_imagefolder(folder, uri, shard_rows=10, group_rows=4)
    assert written["splits"]["train"] == {"rows": 29, "shards": 3, "bytes": written["splits"]["train"]["bytes"]}
    for split in ("train", "val"):
        assert _rows(uri, split) == _rows(str(pack), split)
    assert data_fingerprint(load_data(DataSpec(dataset="parquet", path=uri))) == \
        data_fingerprint(load_data(DataSpec(dataset="parquet", path=str(pack))))
    with pytest.raises(SpecError, match="already holds a pack"):
        pack_imagefolder(folder, uri)
    pack_imagefolder(folder, uri, shard_rows=100, overwrite=True)
    objects = s3_client(s3_endpoint).list_objects_v2(Bucket="packs")["Contents"]
    keys = sorted(o["Key"] for o in objects if not o["Key"].endswith("/"))  # pyarrow keeps folder markers
    assert keys == ["tiny/meta.json", "tiny/train/part-00000.parquet", "tiny/val/part-00000.parquet"]
    assert _rows(uri) == _rows(str(pack))
    with pytest.raises(SpecError, match="bucket 'nobucket' does not exist"):
        pack_imagefolder(folder, f"s3://nobucket/x?endpoint_override={s3_endpoint}&scheme=http")
    with pytest.raises(SpecError, match="no meta.json") as info:
        ParquetPack(f"s3://packs/nothing?endpoint_override={s3_endpoint}&scheme=http")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- augmentation
def _jpeg(arr: np.ndarray, quality: int = 95) -> torch.Tensor:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=quality)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def _augment(size: int, **kwargs) -> G.GpuAugment:
    settings = {"hflip": False, "auto_augment": None, "random_erasing": 0.0, **kwargs}
    return G.GpuAugment(size, SimpleNamespace(**settings), CPU)


def test_train_augmentation_draws_per_sample_parameters(pack):
    torch.manual_seed(0)
    images, _ = next(iter(ParquetBatches(ParquetPack(str(pack)).split("train"), 8, shuffle=True)))
    same = G.EncodedImages([images.data[0]] * 8 + images.data)
    out = _augment(16, hflip=True, auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.5).train(same)
    assert out.shape == (16, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    for i in range(8):  # eight copies of one image all come out different
        for j in range(i + 1, 8):
            assert not torch.equal(out[i], out[j])

    # RandomResizedCrop boxes: inside the image, area 8-100 %, aspect 3/4-4/3 (up to rounding), and distributed as
    # torchvision's own RandomResizedCrop.get_params draws them
    from torchvision.transforms import RandomResizedCrop

    boxes = G.random_resized_crop_boxes(torch.full((4000,), 60.0, dtype=torch.float64),
                                        torch.full((4000,), 120.0, dtype=torch.float64))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 60).all()
    area, aspect = w * h / 7200, w / h
    assert area.min() > 0.07 and area.max() <= 1 and aspect.min() > 0.7 and aspect.max() < 1.4
    reference = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, 60, 120), (0.08, 1.0), (3 / 4, 4 / 3))
                              for _ in range(4000)], dtype=torch.float64)
    ref_area, ref_x = reference[:, 2] * reference[:, 3] / 7200, reference[:, 1] + reference[:, 3] / 2
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    assert abs((boxes[:, 0] + w / 2).mean() - ref_x.mean()) < 1.5  # crop centres

    # flips: a left-to-right ramp stays increasing unless flipped, about half the time
    ramp = np.repeat(np.repeat(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], 48, 0), 3, 2)
    out = _augment(8, hflip=True).train(G.EncodedImages([_jpeg(ramp, 100)] * 400))
    flipped = (out[:, 0, :, 0].mean(1) > out[:, 0, :, -1].mean(1)).float().mean().item()
    assert 0.4 < flipped < 0.6
    unflipped = _augment(8).train(G.EncodedImages([_jpeg(ramp, 100)] * 50))
    assert (unflipped[:, 0, :, 0].mean(1) < unflipped[:, 0, :, -1].mean(1)).all()


def test_validation_is_a_deterministic_centre_crop_and_grey_normalises_as_expected():
    grey = _jpeg(np.full((40, 56, 3), 128, np.uint8))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(G.IMAGENET_MEAN, G.IMAGENET_STD)])
    augment = _augment(16, hflip=True)
    for out in (augment.validation(G.EncodedImages([grey] * 4)), augment.train(G.EncodedImages([grey] * 4))):
        assert out.shape == (4, 3, 16, 16)
        assert torch.allclose(out.mean((0, 2, 3)), expected, atol=0.02)

    # the box: what `resize the shorter side to floor(16 / 0.875), centre-crop 16` takes from the original
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[:, 24:72] = 255
    box = G.center_crop_boxes(torch.tensor([64.0]), torch.tensor([96.0]), 16)
    side = 16 * 64 / math.floor(16 / 0.875)
    assert torch.allclose(box, torch.tensor([[(96 - side) / 2, (64 - side) / 2, (96 + side) / 2, (64 + side) / 2]]))
    images = G.EncodedImages([_jpeg(arr, 100), grey])
    first, second = augment.validation(images), augment.validation(images)
    assert torch.equal(first, second)


def test_colour_ops_match_pil_as_timm_applies_them():
    from PIL import ImageEnhance, ImageOps

    rng = np.random.default_rng(0)
    arr = (np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1))) * 180 + rng.integers(0, 60, (32, 32, 3))).astype(np.uint8)
    im, x, level = Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, 0.9
    references = {  # timm's increasing RandAugment ops at magnitude 9 of 10
        "AutoContrast": ImageOps.autocontrast(im), "Equalize": ImageOps.equalize(im), "Invert": ImageOps.invert(im),
        "Posterize": ImageOps.posterize(im, 4 - int(level * 4)),
        "Solarize": ImageOps.solarize(im, 256 - int(level * 256)),
        "SolarizeAdd": im.point([min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3),
        **{name: getattr(ImageEnhance, name)(im).enhance(1 - level * 0.9)  # the ops below get sign -1
           for name in ("Color", "Contrast", "Brightness", "Sharpness")}}
    for name, reference in references.items():
        out = G._color_op(name, x.clone(), torch.tensor([level]), torch.tensor([-1.0]))
        difference = (out[0] * 255 - torch.from_numpy(np.array(reference)).permute(2, 0, 1).float()).abs()
        assert difference.max() < 1.5, name  # PIL rounds to 8 bits on the way


def test_rand_augment_policies_are_parsed_or_refused_in_one_line():
    assert G.parse_rand_augment("rand-m9-mstd0.5-inc1") == G.RandAugmentPolicy(9.0, 2, 0.5, 10.0, 0.5)
    assert G.parse_rand_augment("rand-m7-n3").ops == 3
    for policy, needle in (("augmix-m5", "RandAugment only"), ("rand-m9-x3", "unknown part 'x3'"),
                           ("rand-m9-inc0", "increasing magnitudes only")):
        with pytest.raises(ValueError, match=needle):
            G.parse_rand_augment(policy)


# ------------------------------------------------------------------------------------------------------- engine
def test_engine_trains_on_a_pack(pack):
    from deitlab.core.engine import experiment_engine

    torch.set_num_threads(2)
    spec = validate(ExperimentSpec, {
        "student": TINY_STUDENT, "distillation": {"mode": "none"}, "optim": {"epochs": 1},
        "data": {"dataset": "parquet", "path": str(pack), "img_size": 16, "batch_size": 8,
                 "augment": {"hflip": True, "auto_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
                             "mixup": 0.8, "cutmix": 1.0}}})
    engine = experiment_engine(spec, None, device=CPU)
    assert not engine.bundle.in_memory and engine.bundle.sizes == (29, 9) and engine.bundle.num_classes == 3
    [metrics] = list(engine.run(1))
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert 0 <= metrics["acc"] <= 1 and metrics["train_loss"] > 0
    assert len(data_fingerprint(engine.bundle)) == 16
    # every augmentation parameter comes from the RNGs the engine seeds per epoch: the same run again is identical
    [again] = list(experiment_engine(spec, None, device=CPU).run(1))
    timing = {"epoch_time_s", "epoch_wall_s", "train_images_per_s"}
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in metrics.items() if k not in timing}


def test_a_pack_without_a_valid_meta_json_is_refused_in_one_line(pack, tmp_path):
    shutil.copytree(pack, tmp_path / "p")
    (tmp_path / "p" / "meta.json").write_text('{"format": "deitlab.pack/1", "classes": []}')
    with pytest.raises(SpecError, match="meta.json is not a valid deitlab.pack/1 file"):
        ParquetPack(str(tmp_path / "p"))
    (tmp_path / "p" / "meta.json").write_bytes(b"\x00garbage")
    with pytest.raises(SpecError, match="meta.json is not a valid"):
        ParquetPack(str(tmp_path / "p"))
    (tmp_path / "p" / "meta.json").unlink()
    with pytest.raises(SpecError, match="no meta.json .not a deitlab pack, or its packing did not finish"):
        load_data(SimpleNamespace(dataset="parquet", path=str(tmp_path / "p"), img_size=16))


@pytest.mark.parametrize("data,needle", [
    ({"dataset": "parquet"}, "needs 'path'"),
    ({"dataset": "parquet", "path": "{tmp}"}, "has no meta.json"),
    ({"dataset": "parquet", "path": "s3://b/p?secret_key=abc"}, "credentials do not belong"),
    ({"dataset": "parquet", "path": "{pack}", "augment": {"auto_augment": "v0"}}, "RandAugment only"),
])
def test_parquet_data_specs_are_checked(pack, tmp_path, data, needle):
    data = {k: v.format(tmp=tmp_path, pack=pack) if isinstance(v, str) else v for k, v in data.items()}
    with pytest.raises(SpecError, match=needle) as info:
        validate(DataSpec, data, source="data")
    assert "abc" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------- CLI
def _broken(folder: Path, tmp: Path, case: str) -> tuple[Path, str]:
    src = tmp / "src"
    if case != "missing source":
        shutil.copytree(folder, src)
    if case == "no val":
        shutil.rmtree(src / "val")
    elif case == "classes differ":
        (src / "val" / "dog").mkdir()
        (src / "val" / "dog" / "x.jpg").write_bytes((src / "val" / "ant" / "00.jpg").read_bytes())
    elif case == "empty class":
        for path in (src / "val" / "bee").iterdir():
            path.unlink()
    elif case == "corrupt jpeg":
        good = (src / "train" / "ant" / "01.jpg").read_bytes()
        (src / "train" / "ant" / "01.jpg").write_bytes(good[: len(good) // 2])
    needles = {"missing source": "no such folder", "no val": "no 'val/' folder", "classes differ": "only in val: dog",
               "empty class": "without images: val/bee", "corrupt jpeg": "do not decode, e.g. train/ant/01.jpg ("}
    return src, needles[case]


@pytest.mark.parametrize("case", ["missing source", "no val", "classes differ", "empty class", "corrupt jpeg"])
def test_cli_pack_refuses_bad_sources_without_writing(folder, tmp_path, case):
    src, needle = _broken(folder, tmp_path, case)
    dest = tmp_path / "dest"
    result = CliRunner().invoke(app, ["data", "pack", str(src), str(dest)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert "Traceback" not in result.output and not dest.exists()


def test_cli_pack_writes_then_refuses_to_overwrite_and_hides_credentials(folder, tmp_path):
    dest = tmp_path / "dest"
    result = CliRunner().invoke(app, ["data", "pack", str(folder), str(dest), "--shard-rows", "16"])
    assert result.exit_code == 0, result.output
    assert "train: 29 images in 2 shard(s)" in result.output and "val: 9 images in 1 shard(s)" in result.output
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    for args, needle in ((["data", "pack", str(folder), str(dest)], "already holds a pack (meta.json)"),
                         (["data", "pack", str(folder), "s3://AKIAX:hunter2@b/p"], "credentials do not belong"),
                         (["data", "pack", str(folder), str(tmp_path / "d2"), "--shard-rows", "0"], "at least 1")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
        assert "hunter2" not in result.output and "Traceback" not in result.output
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before and not (tmp_path / "d2").exists()


def test_a_folder_that_passed_is_not_decoded_again_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "imgs")
    n = check_imagefolder(root, "imgs")
    assert check_imagefolder(root, "imgs") == n  # remembered
    [marker] = (tmp_path / "cache" / "deitlab" / "checked-imagefolders").iterdir()
    assert n == 38 and marker.suffix == ".ok"  # 36 JPEGs + the PNG + the grey JPEG; notes.txt is not an image
    victim = root / "train" / "ant" / "00.jpg"
    victim.write_bytes(victim.read_bytes()[:40])  # truncated: its size (the fingerprint) changes
    with pytest.raises(SpecError, match=r"imgs: 1 file\(s\) do not decode"):
        check_imagefolder(root, "imgs")
