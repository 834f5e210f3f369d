"""pipeline.data: the CIFAR reader, the split, the synthetic writer, both loaders and the CLI.

Everything runs on tiny data sets written by ``write_synthetic`` (no downloads)."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import cifar as D
from pipeline.data.__main__ import main
from pipeline.data.cifar import DATASETS, Split, load_cifar, read_cifar_pickle
from pipeline.data.loaders import DeviceLoader, dataloader_loader
from pipeline.data.synthetic import write_synthetic

TINY = dict(num_classes=10, train_per_class=20, test_per_class=5)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """10 classes x 20 train / 5 test images, in the synthetic layout."""
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic(root, **TINY)
    return root


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _image_keys(images: torch.Tensor) -> list[bytes]:
    return [hashlib.sha1(im.numpy().tobytes()).digest() for im in images]


# --------------------------------------------------------------------------------------------------
# Reading and splitting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,classes", [("synthetic", 7), ("cifar10", 10), ("cifar100", 100)])
def test_reader_reads_every_layout(tmp_path, layout, classes):
    folder = write_synthetic(tmp_path, layout=layout, num_classes=classes, train_per_class=3, test_per_class=2)
    assert folder == tmp_path / D.LAYOUT_FOLDERS[layout]
    d = load_cifar(layout, tmp_path, val_size=classes)
    assert d.num_classes == classes and len(d.class_names) == classes
    assert all(isinstance(n, str) for n in d.class_names)
    assert (len(d.train), len(d.val), len(d.test)) == (2 * classes, classes, 2 * classes)
    for s in (d.train, d.val, d.test):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 32, 32) and s.images.is_contiguous()
        assert s.labels.dtype == torch.int64 and s.labels.shape == (len(s),)
    assert torch.bincount(d.test.labels, minlength=classes).tolist() == [2] * classes
    all_train = torch.cat([d.train.labels, d.val.labels])
    assert torch.bincount(all_train, minlength=classes).tolist() == [3] * classes
    if layout == "cifar100":
        train = read_cifar_pickle(folder / "train")
        assert train["coarse_labels"] == [f // 5 for f in train["fine_labels"]]
        assert len(read_cifar_pickle(folder / "meta")["coarse_label_names"]) == 20


def test_file_format_is_real_cifar(tiny_root):
    folder = tiny_root / "synthetic-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    raw = folder.joinpath("data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2
    with (folder / "data_batch_1").open("rb") as f:
        entry = pickle.load(f)  # plain Python 3 load: str keys
    assert set(entry) == {"data", "labels", "batch_label", "filenames"}
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (40, 3072)
    assert isinstance(entry["labels"], list) and isinstance(entry["filenames"][0], str)


class _Py2Pickler(pickle._Pickler):
    """Writes every bytes object as a Python-2 ``str`` (BINSTRING opcodes), like the real CIFAR files.

    Loading then gives bytes with ``encoding='bytes'`` and latin-1 str with ``encoding='latin1'`` (what
    torchvision uses), numpy's buffers included."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _to_bytes(obj):
    if isinstance(obj, str):
        return obj.encode()
    if isinstance(obj, list):
        return [_to_bytes(v) for v in obj]
    if isinstance(obj, dict):
        return {_to_bytes(k): _to_bytes(v) for k, v in obj.items()}
    return obj


def _rewrite(folder: Path, style: str) -> None:
    """Rewrite every file of ``folder`` as a Python-2-style pickle or a Python-3 pickle with bytes keys."""
    for p in folder.iterdir():
        obj = _to_bytes(read_cifar_pickle(p))
        with p.open("wb") as f:
            if style == "py2":
                _Py2Pickler(f, protocol=2).dump(obj)
            else:
                pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("style", ["py2", "py3-bytes-keys"])
def test_python2_and_bytes_key_pickles_read_identically(tmp_path, tiny_root, style):
    src = tiny_root / "synthetic-batches-py"
    copy = tmp_path / "synthetic-batches-py"
    copy.mkdir()
    for p in src.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    _rewrite(copy, style)
    if style == "py2":
        with (copy / "data_batch_1").open("rb") as f:
            assert b"data" in pickle.load(f, encoding="bytes")  # really bytes keys on disk
    for p in src.iterdir():
        a, b = read_cifar_pickle(p), read_cifar_pickle(copy / p.name)
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], np.ndarray):
                assert np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
            else:
                assert a[k] == b[k], k
    ref, got = load_cifar("synthetic", tiny_root, val_size=10), load_cifar("synthetic", tmp_path, val_size=10)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(ref, name).images, getattr(got, name).images)
        assert torch.equal(getattr(ref, name).labels, getattr(got, name).labels)
    assert ref.class_names == got.class_names and ref.mean == got.mean


def _torchvision_arrays(monkeypatch, cls_name: str, root: Path, train: bool):
    """torchvision's reading of the same files. Its md5 checks reject generated files, so the module's
    ``check_integrity`` (used by both ``_check_integrity`` and ``_load_meta``) is patched to accept them."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = getattr(tv_cifar, cls_name)(str(root), train=train)
    return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets), ds.classes  # HWC -> CHW


@pytest.mark.parametrize("layout,cls_name,classes", [("cifar10", "CIFAR10", 10), ("cifar100", "CIFAR100", 100)])
@pytest.mark.parametrize("style", ["py3", "py2"])
def test_pixels_match_torchvision(tmp_path, monkeypatch, layout, cls_name, classes, style):
    folder = write_synthetic(tmp_path, layout=layout, num_classes=classes, train_per_class=3, test_per_class=2)
    if style == "py2":
        _rewrite(folder, "py2")
    raw = D._read_raw(layout, tmp_path)
    for train, (x, y) in ((True, (raw.train_x, raw.train_y)), (False, (raw.test_x, raw.test_y))):
        tv_x, tv_y, tv_classes = _torchvision_arrays(monkeypatch, cls_name, tmp_path, train)
        assert np.array_equal(tv_x, x) and np.array_equal(tv_y, y)
        assert list(tv_classes) == raw.class_names
    d = load_cifar(layout, tmp_path, val_size=5)
    assert np.array_equal(d.test.images.numpy(), raw.test_x)  # the test split keeps file order


def test_split_is_seeded_disjoint_and_sized(tiny_root):
    a = load_cifar("synthetic", tiny_root, val_size=30, split_seed=1)
    b = load_cifar("synthetic", tiny_root, val_size=30, split_seed=1)
    c = load_cifar("synthetic", tiny_root, val_size=30, split_seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert (len(a.train), len(a.val), len(a.test)) == (170, 30, 50)
    train_keys, val_keys = set(_image_keys(a.train.images)), set(_image_keys(a.val.images))
    raw = D._read_raw("synthetic", tiny_root)
    all_keys = _image_keys(torch.from_numpy(raw.train_x))
    assert len(set(all_keys)) == 200  # images are distinct, so the key sets below are meaningful
    assert not train_keys & val_keys and train_keys | val_keys == set(all_keys)
    small = load_cifar("synthetic", tiny_root, val_size=30, split_seed=1, train_size=50)
    assert len(small.train) == 50 and torch.equal(small.train.images, a.train.images[:50])
    assert torch.equal(small.val.images, a.val.images)
    empty_val = load_cifar("synthetic", tiny_root, val_size=0)
    assert len(empty_val.val) == 0 and len(empty_val.train) == 200


def test_mean_std_are_the_train_split_statistics(tiny_root):
    d = load_cifar("synthetic", tiny_root, val_size=40, train_size=100)
    x = d.train.images.to(torch.float64) / 255
    assert d.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert d.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)


def test_missing_files_and_bad_sizes_raise_clear_errors(tmp_path, tiny_root):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)
    assert f"python -m pipeline.data download cifar10 --root {tmp_path}" in str(e.value)
    with pytest.raises(FileNotFoundError, match="download cifar100"):
        load_cifar("cifar100", tmp_path)
    with pytest.raises(FileNotFoundError, match="pipeline.data synthetic --root"):
        load_cifar("synthetic", tmp_path)
    folder = write_synthetic(tmp_path / "partial", **TINY)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as e:
        load_cifar("synthetic", tmp_path / "partial")
    assert str(folder) in str(e.value)
    with pytest.raises(ValueError, match=r"val_size=200 must be smaller than the 200 training images"):
        load_cifar("synthetic", tiny_root, val_size=200)
    with pytest.raises(ValueError, match="train_size=190 exceeds the 180"):
        load_cifar("synthetic", tiny_root, val_size=20, train_size=190)
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        load_cifar("imagenet", tiny_root)
    assert DATASETS == ("cifar10", "cifar100", "synthetic")


# --------------------------------------------------------------------------------------------------
# write_synthetic
# --------------------------------------------------------------------------------------------------


def test_write_synthetic_is_byte_identical_and_seeded(tmp_path):
    a = write_synthetic(tmp_path / "a", **TINY, seed=3)
    b = write_synthetic(tmp_path / "b", **TINY, seed=3)
    c = write_synthetic(tmp_path / "c", **TINY, seed=4)
    assert _file_bytes(a) == _file_bytes(b)
    assert _file_bytes(a)["test_batch"] != _file_bytes(c)["test_batch"]
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no leftover temporary folders


def test_write_synthetic_never_overwrites(tmp_path):
    folder = write_synthetic(tmp_path, **TINY)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="exist_ok"):
        write_synthetic(tmp_path, **TINY)
    assert write_synthetic(tmp_path, **TINY, seed=9, exist_ok=True) == folder  # same shape: reused as is
    with pytest.raises(FileExistsError, match="another shape"):
        write_synthetic(tmp_path, num_classes=10, train_per_class=21, test_per_class=5, exist_ok=True)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before
    (folder / "test_batch").unlink()  # incomplete: not reused
    with pytest.raises(FileExistsError):
        write_synthetic(tmp_path, **TINY, exist_ok=True)


def test_write_synthetic_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes=100"):
        write_synthetic(tmp_path, layout="cifar100", num_classes=10)
    with pytest.raises(ValueError, match="unknown layout"):
        write_synthetic(tmp_path, layout="svhn")
    with pytest.raises(ValueError):
        write_synthetic(tmp_path, train_per_class=0)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------------------

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _ids_split(n: int = 50, seed: int = 0) -> Split:
    """Random distinct images whose label is their index, so a batch's labels name its source images."""
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_device_loader_shapes_and_one_pass(tiny_root):
    split = _ids_split()
    loader = DeviceLoader(split, 16, mean=MEAN, std=STD, shuffle=True, seed=1)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64 and x.device.type == y.device.type == "cpu"
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(50)) and not torch.equal(ys, torch.arange(50))
    assert len(DeviceLoader(split, 16, mean=MEAN, std=STD, drop_last=True)) == 3
    ordered = torch.cat([y for _, y in DeviceLoader(split, 16, mean=MEAN, std=STD)])
    assert torch.equal(ordered, torch.arange(50))


def test_device_loader_normalises_like_a_manual_computation():
    split = _ids_split()
    for x, y in DeviceLoader(split, 20, mean=MEAN, std=STD, shuffle=True):
        manual = (
            split.images[y].to(torch.float64) / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        ) / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
        torch.testing.assert_close(x.to(torch.float64), manual, atol=1e-5, rtol=0)


def _all_crops_and_flips(image: torch.Tensor) -> torch.Tensor:
    """The 162 pad-4 crops (zero padding) and their horizontal flips of one (3, 32, 32) image."""
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = torch.stack([padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)])
    return torch.cat([crops, crops.flip(3)])


def test_device_loader_augmentation_is_pad4_crop_and_flip():
    split = _ids_split(n=64)
    loader = DeviceLoader(split, 32, mean=MEAN, std=STD, augment=True, shuffle=True, seed=5)
    (x0, y0), (x1, y1) = _epoch(loader, 0)
    x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
    assert sorted(y.tolist()) == list(range(64))
    got = _unnormalise(x)
    kinds = []
    for out, src in zip(got, y):
        matches = (_all_crops_and_flips(split.images[src]) == out).flatten(1).all(1).nonzero().flatten()
        assert len(matches) >= 1, "an output image is not a pad-4 crop / flip of its source"
        kinds.append(int(matches[0]))
    assert len(set(kinds)) > 20  # offsets and flips really vary
    assert any(k >= 81 for k in kinds) and any(k < 81 for k in kinds)
    assert not torch.equal(got, split.images[y])


def test_device_loader_is_reproducible_per_seed_and_epoch():
    split = _ids_split()
    make = lambda seed: DeviceLoader(split, 16, mean=MEAN, std=STD, augment=True, shuffle=True, seed=seed)
    a, b = make(7), make(7)
    unbroken = [_epoch(a, e) for e in range(3)]
    resumed = _epoch(b, 2)  # a fresh loader jumping straight to epoch 2 (a resumed run)
    for (xa, ya), (xb, yb) in zip(unbroken[2], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([y for _, y in unbroken[0]]), torch.cat([y for _, y in unbroken[1]]))
    assert not torch.equal(torch.cat([y for _, y in _epoch(make(8), 0)]), torch.cat([y for _, y in unbroken[0]]))
    again = list(a)  # without set_epoch the same epoch repeats
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(again, unbroken[2]))


@pytest.mark.parametrize("n,drop_last", [(48, False), (50, False), (50, True), (37, False)])
def test_rank_shards_partition_the_epoch(n, drop_last):
    split, world, bs = _ids_split(n), 3, 4
    kw = dict(mean=MEAN, std=STD, augment=True, shuffle=True, seed=3, drop_last=drop_last)
    single = _epoch(DeviceLoader(split, bs * world, **kw), 1)
    ranks = [_epoch(DeviceLoader(split, bs, rank=r, world_size=world, **kw), 1) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([r[b][1] for r in ranks]), y)
        assert torch.equal(torch.cat([r[b][0] for r in ranks]), x)  # augmentation included
    seen = torch.cat([r[b][1] for r in ranks for b in range(len(single))])
    assert len(set(seen.tolist())) == len(seen) == (n // 12 * 12 if drop_last else n)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(split, bs, mean=MEAN, std=STD, rank=3, world_size=3)


def test_device_loader_channels_last_gives_the_same_values():
    split = _ids_split()
    kw = dict(mean=MEAN, std=STD, augment=True, shuffle=True, seed=2)
    for (x1, y1), (x2, y2) in zip(DeviceLoader(split, 16, **kw), DeviceLoader(split, 16, channels_last=True, **kw)):
        assert x2.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_loader_cuda_matches_cpu():
    split = _ids_split()
    kw = dict(mean=MEAN, std=STD, augment=True, shuffle=True, seed=4)
    for (xc, yc), (xg, yg) in zip(DeviceLoader(split, 16, **kw), DeviceLoader(split, 16, device="cuda", **kw)):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), atol=1e-6, rtol=0)


def test_empty_split_gives_no_batches():
    empty = Split(torch.zeros((0, 3, 32, 32), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    loader = DeviceLoader(empty, 8, mean=MEAN, std=STD, augment=True, shuffle=True)
    assert len(loader) == 0 and list(loader) == []


# --------------------------------------------------------------------------------------------------
# dataloader_loader
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_loader_matches_device_loader_batches(num_workers):
    split = _ids_split()
    kw = dict(mean=MEAN, std=STD, shuffle=True, seed=3)
    tl = dataloader_loader(split, 16, augment=False, num_workers=num_workers, **kw)
    dl = DeviceLoader(split, 16, **kw)
    a, b = _epoch(tl, 1), _epoch(dl, 1)
    assert len(tl) == len(dl) == len(a) == 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == torch.float32 and xa.shape == xb.shape and ya.dtype == torch.int64
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader_loader_augments_reproducibly(num_workers):
    split = _ids_split()
    make = lambda: dataloader_loader(
        split, 16, mean=MEAN, std=STD, augment=True, shuffle=True, seed=3, num_workers=num_workers
    )
    state = torch.get_rng_state()
    first, again, other = _epoch(make(), 2), _epoch(make(), 2), _epoch(make(), 3)
    if num_workers == 0:
        assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    for x, y in first:
        got = _unnormalise(x)
        for out, src in zip(got, y):
            assert (_all_crops_and_flips(split.images[src]) == out).flatten(1).all(1).any()


def test_dataloader_loader_shards_like_device_loader():
    split = _ids_split()
    for r in range(2):
        tl = dataloader_loader(
            split, 8, mean=MEAN, std=STD, augment=False, shuffle=True, seed=1, num_workers=0, rank=r, world_size=2
        )
        dl = DeviceLoader(split, 8, mean=MEAN, std=STD, shuffle=True, seed=1, rank=r, world_size=2)
        assert len(tl) == len(dl)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(tl, dl))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_synthetic_and_info(tmp_path, capsys):
    assert (
        main(
            [
                "synthetic",
                "--root",
                str(tmp_path),
                "--classes",
                "5",
                "--train-per-class",
                "8",
                "--test-per-class",
                "2",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote" in out and "synthetic-batches-py" in out and "40 train" in out and "data_batch_1" in out
    assert (
        main(
            [
                "synthetic",
                "--root",
                str(tmp_path),
                "--classes",
                "5",
                "--train-per-class",
                "8",
                "--test-per-class",
                "2",
                "--exist-ok",
            ]
        )
        == 0
    )
    assert "kept existing" in capsys.readouterr().out
    assert (
        main(
            ["synthetic", "--root", str(tmp_path), "--classes", "5", "--train-per-class", "8", "--test-per-class", "2"]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert main(["info", "synthetic", "--root", str(tmp_path), "--val-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "30" in out and "classes: 5" in out and "mean" in out and "std" in out


def test_cli_rejects_bad_input(tmp_path, capsys):
    for argv in (
        ["download", "imagenet", "--root", str(tmp_path)],
        ["download", "cifar10"],
        ["download", "synthetic", "--root", str(tmp_path)],
        ["info", "svhn", "--root", str(tmp_path)],
        ["synthetic", "--root", str(tmp_path), "--layout", "mnist"],
        [],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()
    assert main(["synthetic", "--root", str(tmp_path), "--layout", "cifar100", "--classes", "10"]) == 2
    assert "num_classes=100" in capsys.readouterr().err
    assert main(["info", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "python -m pipeline.data download cifar10" in err and "cifar-10-batches-py" in err
    assert not list(tmp_path.iterdir())  # nothing was written, nothing was downloaded


def test_cli_download_uses_torchvision(tmp_path, monkeypatch, capsys):
    """The download path, with torchvision's downloader replaced by a fake (no network in tests)."""
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_synthetic(root, layout="cifar10", num_classes=10, train_per_class=2, test_per_class=1)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    assert main(["download", "cifar10", "--root", str(tmp_path / "d")]) == 0
    assert calls == [(str(tmp_path / "d"), True, True)]
    out = capsys.readouterr().out
    assert "downloaded" in out and "cifar-10-batches-py" in out and "classes: 10" in out


def test_module_runs_as_a_script(tmp_path):
    from tests.conftest import run_cli

    r = run_cli(
        "pipeline.data",
        "synthetic",
        "--root",
        str(tmp_path),
        "--classes",
        "3",
        "--train-per-class",
        "2",
        "--test-per-class",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "synthetic-batches-py" / "batches.meta").is_file()
    r = run_cli("pipeline.data", "info", "cifar100", "--root", str(tmp_path))
    assert r.returncode == 2 and "download cifar100" in r.stderr
