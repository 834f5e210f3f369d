"""Exported int8 programs (.pt2) and AOTInductor packages read back safely: real archives written by
save_int8, then crafted (a weight replaced by a pickle that runs a shell command, a shape expression that
sympy would evaluate), truncated or garbled. Nothing in them runs, and the one error names the file."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from pipeline.models.files import UnreadableModel, check_pt2, load_int8_package, load_pt2, sha256_of
from pipeline.compress import quantize as Q
from pipeline.compress.measure import Artifact, measure_artifacts


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    ).eval()


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory) -> Path:
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path_factory.mktemp("int8") / "int8.pt2"
    Q.save_int8(Q.quantize_int8(_tiny(), [x], x), path, x)
    return path


def _rewrite(src: Path, dst: Path, change: Callable[[dict[str, bytes], str], None]) -> Path:
    """A copy of the archive with ``change(entries, root)`` applied to its entries (name -> bytes)."""
    with zipfile.ZipFile(src) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    change(entries, next(iter(entries)).split("/", 1)[0] + "/")
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return dst


class _RunsCode:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def change(entries: dict[str, bytes], root: str) -> None:
        name = root + "data/weights/model_weights_config.json"
        config = json.loads(entries[name])
        fqn, meta = next(iter(config["config"].items()))
        meta["use_pickle"] = True
        buffer = io.BytesIO()
        torch.save(_RunsCode(marker), buffer)
        entries[root + "data/weights/" + meta["path_name"]] = buffer.getvalue()
        entries[name] = json.dumps(config).encode()

    return change


def _evaluated_expression(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def change(entries: dict[str, bytes], root: str) -> None:
        name = root + "models/model.json"
        text = entries[name].decode()
        symbol = "positive=True, integer=True)"
        assert symbol in text  # the batch dimension's symbol, which the loader hands to sympy
        payload = f"positive=True, integer=__import__('os').system('touch {marker}') == 0)"
        entries[name] = text.replace(symbol, payload, 1).encode()

    return change


@pytest.mark.parametrize("craft", [_pickled_weight, _evaluated_expression], ids=["pickled-weight", "sympy-eval"])
def test_crafted_pt2_is_refused_without_running_code(int8_file, tmp_path, craft):
    marker = tmp_path / "code-ran"
    crafted = _rewrite(int8_file, tmp_path / "int8.pt2", craft(marker))
    for load in (load_pt2, Q.load_int8):
        with pytest.raises(UnreadableModel) as err:
            load(crafted)
        assert str(crafted) in str(err.value) and "refused" in str(err.value), err.value
        assert err.value.path == crafted and isinstance(err.value, ValueError)
    assert not marker.exists()
    # the payload is real: torch.export.load itself runs it
    import torchao  # noqa: F401

    try:
        torch.export.load(crafted)
    except Exception:
        pass  # what it made of the payload's result does not matter: the command ran
    assert marker.exists()


def _entry(name: str, data: bytes = b"x") -> Callable[[dict[str, bytes], str], None]:
    def change(entries: dict[str, bytes], root: str) -> None:
        entries[root + name] = data

    return change


def _guard_code(entries: dict[str, bytes], root: str) -> None:
    program = json.loads(entries[root + "models/model.json"])
    program["guards_code"] = ["__import__('os').getpid() > 0"]
    entries[root + "models/model.json"] = json.dumps(program).encode()


def _foreign_op(entries: dict[str, bytes], root: str) -> None:
    text = entries[root + "models/model.json"].decode()
    entries[root + "models/model.json"] = text.replace("torch.ops.aten.relu", "torch.load", 1).encode()


def _pickled_sample_inputs(entries: dict[str, bytes], root: str) -> None:
    buffer = io.BytesIO()
    torch.save({"x": nn.ReLU()}, buffer)  # not plain tensors: torch would retry with full unpickling
    entries[root + "data/sample_inputs/model.pt"] = buffer.getvalue()


@pytest.mark.parametrize(
    "change, words",
    [
        (_entry("data/weights/model.pt"), "unexpected entry"),  # the legacy pickled weights file
        (_entry("data/constants/custom_obj_0"), "unexpected entry"),
        (_entry("data/aotinductor/model/x.so"), "unexpected entry"),
        (_guard_code, "guard code"),
        (_foreign_op, "torch.load"),
        (_pickled_sample_inputs, "sample inputs"),
    ],
    ids=["legacy-weights", "custom-object", "native-code", "guard-code", "foreign-op", "pickled-inputs"],
)
def test_anything_but_a_plain_program_is_refused_naming_the_file(int8_file, tmp_path, change, words):
    crafted = _rewrite(int8_file, tmp_path / "int8.pt2", change)
    with pytest.raises(UnreadableModel, match=words) as err:
        check_pt2(crafted)
    assert str(crafted) in str(err.value)


def test_what_save_int8_writes_passes_the_check_and_loads(int8_file):
    check_pt2(int8_file)
    x = torch.randn(2, 3, 8, 8)
    assert Q.load_int8(int8_file)(x).shape == (2, 10)
    # a program saved by torch.export.save with its sample inputs (plain tensors) passes too
    saved = int8_file.parent / "with-inputs.pt2"
    ep = torch.export.export(_tiny(), (x,))
    assert ep.example_inputs is not None
    torch.export.save(ep, saved)
    torch.testing.assert_close(load_pt2(saved).module()(x), _tiny()(x))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbled(data: bytes) -> bytes:  # what the trial wrote: junk over part of the file
    return data[:1000] + b"\xff garbage \x00" * 20 + data[1000 + 220 :]


@pytest.mark.parametrize(
    "damage",
    [_truncated, _garbled, lambda d: b"", lambda d: b"PK\x03\x04" + b"\0" * 50],
    ids=["truncated", "garbled", "empty", "zip-header"],
)
def test_a_damaged_pt2_is_one_clear_error_naming_the_file(int8_file, tmp_path, damage):
    damaged = tmp_path / "models" / "int8.pt2"
    damaged.parent.mkdir()
    damaged.write_bytes(damage(int8_file.read_bytes()))
    with pytest.raises(UnreadableModel) as err:
        Q.load_int8(damaged)
    assert str(err.value).startswith(f"model file {damaged} cannot be loaded: ")
    assert "\n" not in str(err.value)
    # the measure stage's path: the same error, not a BadZipFile or a JSONDecodeError
    with pytest.raises(UnreadableModel, match="cannot be loaded"):
        measure_artifacts([Artifact.from_pt2("int8", damaged)], [(torch.randn(2, 3, 8, 8), torch.zeros(2))], threads=1)


def test_missing_file_and_folder_are_unreadable_models(tmp_path):
    for path in (tmp_path / "nothing.pt2", tmp_path):
        with pytest.raises(UnreadableModel, match=str(path)):
            load_pt2(path)


def test_a_package_loads_only_with_the_sha256_the_quantize_stage_recorded(tmp_path):
    package = tmp_path / "int8.so.pt2"
    package.write_bytes(b"not a package")
    with pytest.raises(UnreadableModel, match="no sha256 recorded"):
        load_int8_package(package, "")
    with pytest.raises(UnreadableModel, match="not the one the quantize stage recorded"):
        load_int8_package(package, "0" * 64)
    with pytest.raises(UnreadableModel, match="not a whole zip archive") as err:
        load_int8_package(package, sha256_of(package))
    assert str(package) in str(err.value)
    with pytest.raises(UnreadableModel, match="no such file"):
        load_int8_package(tmp_path / "gone.so.pt2", "0" * 64)
