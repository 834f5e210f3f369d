"""A small learnable data set written in the real CIFAR file format (:func:`write_synthetic`): tests and
the demo train on it, no download needed."""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.cifar import PAD, PIXELS, LAYOUT_FOLDERS, _read_raw


def _upsample(low: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of the last two axes to ``size``; elementwise ops only, so bit-reproducible."""

    def axis_weights(n: int):
        pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, pos - i0

    i0, i1, w = axis_weights(low.shape[-2])
    rows = low[..., i0, :] * (1 - w)[:, None] + low[..., i1, :] * w[:, None]
    j0, j1, v = axis_weights(low.shape[-1])
    return rows[..., j0] * (1 - v) + rows[..., j1] * v


def _synthetic_images(num_classes: int, per_class: tuple[int, int], seed: int):
    """(train_x, train_y, test_x, test_y) with images (N, 3072) uint8, shuffled within each part.

    Each class has a smooth random colour pattern on a 40x40 canvas; an image is a random 32x32 window of it
    (shifts of up to +-4 px) with random per-channel gain/offset, plus a smooth random distractor pattern
    and pixel noise, so classes are learnable but overlap.
    """
    rng = np.random.default_rng(seed)
    canvas = 32 + 2 * PAD
    # Weights tuned so ResNet-20 reaches ~60% test accuracy after 20 SGD steps on 500 images and ~90% after
    # 3 epochs on 2,000 (10 classes).
    protos = _upsample(rng.standard_normal((num_classes, 3, 5, 5)), canvas)
    protos += 0.5 * _upsample(rng.standard_normal((num_classes, 3, 10, 10)), canvas)
    protos += 0.8 * rng.standard_normal((num_classes, 3, 1, 1))  # a mean colour per class
    parts: dict[int, tuple[list[Any], list[Any]]] = {0: ([], []), 1: ([], [])}
    for c in range(num_classes):
        for part, n in enumerate(per_class):
            windows = np.lib.stride_tricks.sliding_window_view(protos[c], (32, 32), axis=(1, 2))
            oy, ox = rng.integers(0, 2 * PAD + 1, size=(2, n))
            img = windows[:, oy, ox].transpose(1, 0, 2, 3)  # (n, 3, 32, 32)
            gain = 1.0 + 0.25 * rng.standard_normal((n, 3, 1, 1))
            bias = 0.3 * rng.standard_normal((n, 3, 1, 1))
            distractor = _upsample(rng.standard_normal((n, 3, 4, 4)), 32)
            noise = rng.standard_normal((n, 3, 32, 32))
            value = gain * img + bias + 0.5 * distractor + 0.3 * noise
            pixels = np.clip(np.rint(128.0 + 48.0 * value), 0, 255).astype(np.uint8)
            parts[part][0].append(pixels.reshape(n, PIXELS))
            parts[part][1].append(np.full(n, c, dtype=np.int64))
    out = []
    for part in (0, 1):
        x, y = np.concatenate(parts[part][0]), np.concatenate(parts[part][1])
        perm = rng.permutation(len(y))
        out += [np.ascontiguousarray(x[perm]), y[perm]]
    return tuple(out)


def _complete(folder: Path, layout: str, num_classes: int, n_train: int, n_test: int) -> bool:
    """Whether ``folder`` holds a readable data set of this layout with these class and image counts."""
    try:
        raw = _read_raw(layout, folder.parent)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError):
        return False
    return len(raw.class_names) == num_classes and len(raw.train_y) == n_train and len(raw.test_y) == n_test


def write_synthetic(
    root: str | Path,
    *,
    layout: str = "synthetic",
    num_classes: int = 10,
    train_per_class: int = 500,
    test_per_class: int = 100,
    seed: int = 0,
    exist_ok: bool = False,
) -> Path:
    """Write a deterministic, learnable CIFAR-shaped data set in the real on-disk format; returns its folder.

    ``layout`` "synthetic"/"cifar10" -> CIFAR-10 files (5 train batches, test_batch, batches.meta) in
    synthetic-batches-py / cifar-10-batches-py; "cifar100" -> train/test/meta in cifar-100-python (100 fine
    classes, coarse label = fine // 5). Pickles use protocol 2 and str keys. Output is byte-identical for the
    same arguments. Never overwrites: an existing folder raises FileExistsError, unless ``exist_ok`` and it
    holds a complete data set with the same class and image counts (then it is returned untouched).
    """
    _check_shape(layout, num_classes, train_per_class, test_per_class)
    root = Path(root).expanduser()
    folder = root / LAYOUT_FOLDERS[layout]
    shape = (layout, num_classes, num_classes * train_per_class, num_classes * test_per_class)
    if folder.exists():
        return _existing(folder, shape, exist_ok)
    train_x, train_y, test_x, test_y = _synthetic_images(num_classes, (train_per_class, test_per_class), seed)
    if layout == "cifar100":
        files = _cifar100_files(num_classes, train_x, train_y, test_x, test_y)
    else:
        files = _cifar10_files(num_classes, train_x, train_y, test_x, test_y)
    # Write into a private folder and rename it into place: readers never see a half-written data set,
    # and of two concurrent writers exactly one wins the rename.
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, obj in files.items():
            with (tmp / fname).open("wb") as f:
                pickle.dump(obj, f, protocol=2)
        try:
            os.rename(tmp, folder)
        except OSError:
            if folder.exists():
                return _existing(folder, shape, exist_ok)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _check_shape(layout: str, num_classes: int, train_per_class: int, test_per_class: int) -> None:
    if layout not in LAYOUT_FOLDERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_FOLDERS)}")
    if layout == "cifar100" and num_classes != 100:
        raise ValueError(f"layout cifar100 needs num_classes=100, got {num_classes}")
    if layout == "cifar10" and num_classes != 10:
        raise ValueError(f"layout cifar10 needs num_classes=10, got {num_classes}")
    if num_classes < 2 or train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            "need num_classes >= 2, train_per_class >= 1 and test_per_class >= 1, got "
            f"{num_classes}, {train_per_class}, {test_per_class}"
        )


def _existing(folder: Path, shape: tuple[str, int, int, int], exist_ok: bool) -> Path:
    """``folder`` when ``exist_ok`` and it holds a complete data set of ``shape`` (layout, classes, train
    and test images); else FileExistsError."""
    if exist_ok and _complete(folder, *shape):
        return folder
    why = (
        "it is incomplete or holds a data set of another shape"
        if exist_ok
        else "pass exist_ok=True / --exist-ok to reuse it"
    )
    raise FileExistsError(f"{folder} already exists; not overwriting ({why})")


def _cifar100_files(
    num_classes: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> dict[str, dict[str, object]]:
    """CIFAR-100's files (train, test, meta) by name."""
    fine = [f"class_{i:03d}" for i in range(num_classes)]
    coarse = [f"superclass_{i:02d}" for i in range(20)]
    files: dict[str, dict[str, object]] = {}
    for fname, x, y, label in (
        ("train", train_x, train_y, "training batch 1 of 1"),
        ("test", test_x, test_y, "testing batch 1 of 1"),
    ):
        files[fname] = {
            "filenames": [f"{fine[c]}_s_{i:06d}.png" for i, c in enumerate(y)],
            "batch_label": label,
            "fine_labels": y.tolist(),
            "coarse_labels": (y // 5).tolist(),
            "data": x,
        }
    files["meta"] = {"fine_label_names": fine, "coarse_label_names": coarse}
    return files


def _cifar10_files(
    num_classes: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> dict[str, dict[str, object]]:
    """CIFAR-10's files (data_batch_1..5, test_batch, batches.meta) by name."""
    names = [f"class_{i:02d}" for i in range(num_classes)]
    pieces = np.array_split(np.arange(len(train_y)), 5)
    files: dict[str, dict[str, object]] = {}
    for k, idx in enumerate(pieces, start=1):
        files[f"data_batch_{k}"] = {
            "batch_label": f"training batch {k} of 5",
            "labels": train_y[idx].tolist(),
            "data": train_x[idx],
            "filenames": [f"{names[train_y[i]]}_s_{i:06d}.png" for i in idx],
        }
    files["test_batch"] = {
        "batch_label": "testing batch 1 of 1",
        "labels": test_y.tolist(),
        "data": test_x,
        "filenames": [f"{names[c]}_s_{i:06d}.png" for i, c in enumerate(test_y)],
    }
    files["batches.meta"] = {"num_cases_per_batch": len(pieces[0]), "label_names": names, "num_vis": PIXELS}
    return files
