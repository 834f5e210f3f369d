"""Model files of a run folder (``<run>/models/``): written atomically, loadable in a fresh process with
``torch.load(weights_only=True)`` (no arbitrary objects are unpickled), structurally pruned ones included.

A state-dict file holds::

    {"format": "pipeline-model/1", "arch": {"name", "num_classes", "shortcut", "norm"},
     "state_dict": {...}, "dtype": "float32" | "float16"}

The architecture is rebuilt from the registry and resized to the tensors' shapes, so a pruned model
loads without running the pruner again. Exported int8 programs (``.pt2``) live beside them and are
written by :mod:`pipeline.compress.quantize`; every ``.pt2`` is read through :func:`load_pt2`, which checks
the archive against an allow-list before ``torch.export.load`` sees it (that function unpickles some
entries and evaluates expression strings of others), and the AOTInductor package (native code) through
:func:`load_int8_package`, which loads only the file whose sha256 the quantize stage recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import torch
from torch import nn

from pipeline.models import build_model, convert_norm
from pipeline.rundir import atomic_write_bytes, model_file_problem

FORMAT = "pipeline-model/1"
# a file's "dtype" -> the dtype of its weights (and of the inputs the model takes)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}

# file names under <run>/models/, by what made them
TRAINED = "trained.pt"
PRUNED = "pruned.pt"
INT8 = "int8.pt2"
INT8_PACKAGE = "int8.so.pt2"  # the int8 program compiled by AOTInductor: native code for this CPU type
FP16 = "fp16.pt"


class UnreadableModel(ValueError):
    """A model file that cannot be read: missing, truncated, garbled, or refused (it could run code).
    ``path`` is the file, ``reason`` says what is wrong in one line."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"model file {path} cannot be loaded: {reason}")


def arch_of(cfg: Any, num_classes: int) -> dict[str, Any]:
    """What rebuilds a run's architecture: registry name, classes, shortcut, norm."""
    return {
        "name": str(cfg.model.name),
        "num_classes": int(num_classes),
        "shortcut": str(cfg.model.shortcut),
        "norm": str(cfg.model.norm),
    }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename: a kill never leaves half a file.

    The object is serialised in memory first: on a full disk torch's own stream reports only
    "basic_ios::clear: iostream error", while a plain write fails with OSError naming ``path`` and the
    system's reason ("No space left on device", "Disk quota exceeded", "Read-only file system")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def unwrap(model: Any) -> Any:
    """The plain module (or function) inside DistributedDataParallel / DataParallel and ``torch.compile``
    wrappers: a compiled module's ``_orig_mod`` (also what :func:`pipeline.compress.quantize.compile_int8`
    and an int8 package's runner carry), a compiled function's original."""
    for _ in range(8):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "_torchdynamo_orig_callable", None)):
            model = model._torchdynamo_orig_callable
        else:
            break
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (unwrapped from DDP / torch.compile), tensors detached on the CPU."""
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def save_model(
    path: Path, model: nn.Module, arch: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None
) -> None:
    sd = plain_state_dict(model)
    dtype = "float16" if any(v.dtype == torch.float16 for v in sd.values()) else "float32"
    atomic_torch_save(
        {"format": FORMAT, "arch": dict(arch), "state_dict": sd, "dtype": dtype, "extra": dict(extra or {})}, path
    )


def build_from_arch(arch: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A registry model of ``arch``; with ``state_dict``, resized to its shapes (pruned models) and loaded."""
    model = convert_norm(
        build_model(arch["name"], int(arch["num_classes"]), shortcut=arch.get("shortcut", "A")),
        arch.get("norm", "batch"),
    )
    if state_dict is not None:
        resize_to_state_dict(model, state_dict)
        model.load_state_dict(state_dict)
    return model


def _new_param(old: torch.Tensor, shape: torch.Size, fill: float = 0.0) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, fill, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def _new_buffer(old: torch.Tensor, shape: torch.Size, fill: float) -> torch.Tensor:
    return torch.full(shape, fill, dtype=old.dtype, device=old.device)


def _saved(state_dict: Mapping[str, torch.Tensor], prefix: str, key: str) -> torch.Tensor:
    try:
        return state_dict[prefix + key]
    except KeyError:
        raise KeyError(f"state_dict has no {prefix + key!r}: it was not saved from this model") from None


def _resize_conv(name: str, m: nn.Conv2d, sd: Mapping[str, torch.Tensor], prefix: str) -> None:
    shape = _saved(sd, prefix, "weight").shape
    out, per_group = shape[0], shape[1]
    groups = m.groups
    if groups > 1 and groups == m.in_channels:  # depthwise: groups follow the channels
        multiplier = m.out_channels // m.groups
        if out % multiplier:
            raise ValueError(f"{name}: {out} output channels do not fit depthwise multiplier {multiplier}")
        groups = out // multiplier
    if out % groups:
        raise ValueError(f"{name}: {out} output channels are not divisible by groups={groups}")
    m.groups, m.out_channels, m.in_channels = groups, out, per_group * groups
    m.weight = _new_param(m.weight, shape)
    if m.bias is not None:
        m.bias = _new_param(m.bias, _saved(sd, prefix, "bias").shape)


def _resize_linear(m: nn.Linear, sd: Mapping[str, torch.Tensor], prefix: str) -> None:
    shape = _saved(sd, prefix, "weight").shape
    m.out_features, m.in_features = shape[0], shape[1]
    m.weight = _new_param(m.weight, shape)
    if m.bias is not None:
        m.bias = _new_param(m.bias, _saved(sd, prefix, "bias").shape)


def _resize_batchnorm(m: nn.BatchNorm2d, sd: Mapping[str, torch.Tensor], prefix: str) -> None:
    n = _saved(sd, prefix, "weight" if m.affine else "running_mean").shape[0]
    m.num_features = n
    if m.affine:
        m.weight = _new_param(m.weight, torch.Size([n]), 1.0)
        m.bias = _new_param(m.bias, torch.Size([n]))
    if m.track_running_stats:
        m.running_mean = _new_buffer(cast(torch.Tensor, m.running_mean), torch.Size([n]), 0.0)
        m.running_var = _new_buffer(cast(torch.Tensor, m.running_var), torch.Size([n]), 1.0)


def _resize_groupnorm(m: nn.GroupNorm, sd: Mapping[str, torch.Tensor], prefix: str) -> None:
    if not m.affine:
        return  # nothing in the state_dict tells the width; GroupNorm without affine has no size
    n = _saved(sd, prefix, "weight").shape[0]
    if n % m.num_groups:
        m.num_groups = math.gcd(n, m.num_groups)
    m.num_channels = n
    m.weight = _new_param(m.weight, torch.Size([n]), 1.0)
    m.bias = _new_param(m.bias, torch.Size([n]))


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Reshape every Conv2d, Linear, BatchNorm2d and GroupNorm of ``model`` in place to the tensor shapes
    in ``state_dict`` (a pruned model's plain state_dict), so ``model.load_state_dict(state_dict)`` works
    without re-running the pruner. Parameters come back filled with placeholders: load the state_dict next.
    """
    model = unwrap(model)
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Conv2d):
            _resize_conv(name, m, state_dict, prefix)
        elif isinstance(m, nn.Linear):
            _resize_linear(m, state_dict, prefix)
        elif isinstance(m, nn.BatchNorm2d):
            _resize_batchnorm(m, state_dict, prefix)
        elif isinstance(m, nn.GroupNorm):
            _resize_groupnorm(m, state_dict, prefix)
    return model


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, the file's dict without the weights). Refuses anything but weights and
    plain containers (``weights_only=True``). A file that cannot give the model (missing, truncated,
    garbled, another format, tensors that fit no model) raises :class:`UnreadableModel` naming it."""
    problem = model_file_problem(Path(path), whole=True)  # (torch.load does not check tensors' checksums)
    if problem is not None:
        raise UnreadableModel(path, problem)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnreadableModel(path, f"torch.load failed ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("state_dict"), dict):
        raise UnreadableModel(path, f"not a {FORMAT} file")
    sd = blob["state_dict"]
    try:
        model = build_from_arch(blob["arch"], sd)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UnreadableModel(path, f"its tensors fit no {blob.get('arch')} model ({type(e).__name__}: {e})") from e
    if blob.get("dtype") == "float16":
        model = model.half()
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.to(device).eval(), info


def model_file_dtype(path: Path) -> torch.dtype:
    """The dtype of a model file's weights, without building the model (its tensors are mapped, not read)."""
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UnreadableModel(path, f"not a {FORMAT} file")
    name = blob.get("dtype", "float32")
    if name not in DTYPES:
        raise UnreadableModel(path, f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def save_model_file(
    path: str | os.PathLike, model: nn.Module, *, name: str, num_classes: int, shortcut: str = "A", norm: str = "batch"
) -> Path:
    """:func:`save_model` with the architecture given by its parts."""
    save_model(Path(path), model, {"name": name, "num_classes": int(num_classes), "shortcut": shortcut, "norm": norm})
    return Path(path)


def load_model_file(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a model file in eval mode (:func:`load_model` without the file's other fields)."""
    return load_model(Path(path), device)[0]


# --------------------------------------------------------------------------------------------------
# Exported programs (.pt2): an allow-list of what torch.export.save writes for a plain program
# --------------------------------------------------------------------------------------------------

# Entries of an archive (under its one top-level folder). No legacy pickled weights (data/weights/model.pt),
# no custom or opaque objects (pickled), no AOTInductor code, no extra files.
_PT2_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+|data/sample_inputs/model\.pt"
)
# Operators a graph may call: aten and the int8 (de)quantize ops; the deserializer would resolve any
# torch.* name, and running the graph would call it.
_PT2_TARGETS = re.compile(r"torch\.ops\.(aten|quantized_decomposed)\.\w+\.\w+|_operator\.getitem")
# Shape expressions are evaluated by sympy (eval): only symbols, integers and a few sympy constructors.
_SYMPY_WORDS = {"Symbol", "Integer", "Add", "Mul", "Max", "Min", "Mod", "FloorDiv", "positive", "integer"}
_SYMPY_WORDS |= {"nonnegative", "True", "False"}
_SYMBOL_NAME = re.compile(r"'[a-z]+\d+'")


def _pt2_refuse(path: Path, reason: str) -> UnreadableModel:
    return UnreadableModel(path, f"{reason}; refused (only plain exported programs are loaded: see README)")


def _safe_expression(text: Any) -> bool:
    if not isinstance(text, str) or len(text) > 1000:
        return False
    rest = _SYMBOL_NAME.sub("0", text)
    if not re.fullmatch(r"[A-Za-z0-9_(), =\-]*", rest) or "__" in rest:
        return False
    return all(w in _SYMPY_WORDS for w in re.findall(r"[A-Za-z_]\w*", rest))


def _walk(node: Any, key: str = "") -> Any:
    """(key, value) of every scalar in a JSON tree, the key being the nearest dict key above it."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _check_graph(path: Path, program: Any) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _pt2_refuse(path, "models/model.json is not an exported program")
    if program.get("guards_code"):  # Python source that .module() compiles and runs
        raise _pt2_refuse(path, "it carries guard code (Python source run at load)")
    for name in program.get("range_constraints") or {}:
        if not re.fullmatch(r"[a-z]+\d+", str(name)):
            raise _pt2_refuse(path, f"shape symbol {str(name)[:80]!r} is not a plain name")
    for key, value in _walk(program["graph_module"]):
        if key == "target" and not (isinstance(value, str) and _PT2_TARGETS.fullmatch(value)):
            raise _pt2_refuse(path, f"the graph calls {str(value)[:80]!r} (allowed: aten and quantized_decomposed ops)")
        if key == "expr_str" and not _safe_expression(value):
            raise _pt2_refuse(path, f"shape expression {str(value)[:80]!r} is not a plain sympy expression")


def _check_payloads(path: Path, archive: zipfile.ZipFile, root: str, config_name: str, prefix: str) -> None:
    config = _read_json(path, archive, root + config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnreadableModel(path, f"{config_name} is not a payload config")
    folder = config_name.rsplit("/", 1)[0]
    names = set(archive.namelist())
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _pt2_refuse(path, f"{fqn!r} in {config_name} is pickled (unpickling can run code)")
        file = str(meta.get("path_name", ""))
        if not re.fullmatch(prefix + r"\d+", file) or f"{root}{folder}/{file}" not in names:
            raise _pt2_refuse(path, f"{fqn!r} in {config_name} points at {file[:80]!r}, not a tensor of the archive")


def _read_json(path: Path, archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except KeyError:
        raise UnreadableModel(path, f"{name.split('/', 1)[-1]} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UnreadableModel(path, f"{name.split('/', 1)[-1]} is not JSON ({e})") from None


def _check_sample_inputs(path: Path, archive: zipfile.ZipFile, name: str) -> None:
    """torch.export.load tries ``weights_only=True`` on the sample inputs and, when that fails, loads them
    with full unpickling: they must load the safe way here first (or be empty, as save_int8 writes them)."""
    if name not in archive.namelist():
        return
    data = archive.read(name)
    if data:
        import torch

        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:
            raise _pt2_refuse(path, f"its sample inputs are not plain tensors ({type(e).__name__})") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UnreadableModel(path, "no such file") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UnreadableModel(path, f"not a whole zip archive (truncated or garbled: {e})") from None
    try:
        bad = archive.testzip()  # every entry's CRC: a flipped byte anywhere is found here
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        archive.close()
        raise UnreadableModel(path, f"damaged zip archive ({e})") from None
    if bad is not None:
        archive.close()
        raise UnreadableModel(path, f"damaged zip archive (entry {bad} fails its CRC check)")
    return archive


def _archive_root(path: Path, archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise UnreadableModel(path, "not a PT2 archive (its entries are not under one folder)")
    return f"{roots.pop()}/"


def check_pt2(path: Path) -> None:
    """Raise :class:`UnreadableModel` unless ``path`` is a whole PT2 archive holding a plain exported
    program: nothing pickled (weights, constants, custom objects), no guard code, no operator outside aten
    and quantized_decomposed, shape expressions of symbols and integers only, no native code."""
    path = Path(path)
    with _open_zip(path) as archive:
        root = _archive_root(path, archive)
        for name in archive.namelist():
            if not _PT2_ENTRIES.fullmatch(name[len(root) :]):
                raise _pt2_refuse(path, f"unexpected entry {name[len(root) :][:80]!r}")
        fmt = root + "archive_format"
        if fmt not in archive.namelist() or archive.read(fmt) != b"pt2":
            raise UnreadableModel(path, "not a PT2 archive (no archive_format 'pt2')")
        _check_payloads(path, archive, root, "data/weights/model_weights_config.json", "weight_")
        _check_payloads(path, archive, root, "data/constants/model_constants_config.json", "tensor_")
        _check_graph(path, _read_json(path, archive, root + "models/model.json"))
        _check_sample_inputs(path, archive, root + "data/sample_inputs/model.pt")


def load_pt2(path: Path) -> Any:
    """The ``torch.export.ExportedProgram`` in ``path``, after :func:`check_pt2`; any failure is an
    :class:`UnreadableModel` naming the file. Registers torchao's quantized_decomposed ops first (an int8
    program calls them)."""
    path = Path(path)
    check_pt2(path)
    import torch
    import torchao  # noqa: F401  (registers the quantized_decomposed ops)

    try:
        return torch.export.load(path)
    except Exception as e:
        raise UnreadableModel(path, _first_line(e)) from e


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


# --------------------------------------------------------------------------------------------------
# The AOTInductor package: native code, loaded only when it is the file the quantize stage wrote
# --------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_int8_package(path: Path, sha256: str) -> Callable[..., Any]:
    """The runnable of an AOTInductor package (``torch._inductor.aoti_load_package``), only when the file's
    sha256 is ``sha256`` (what the quantize stage recorded when it wrote it): a package is a shared library,
    and loading one runs its code. Any failure is an :class:`UnreadableModel` naming the file."""
    path = Path(path)
    if not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
        raise UnreadableModel(path, "no sha256 recorded for it; refused (a package is native code)")
    try:
        actual = sha256_of(path)
    except FileNotFoundError:
        raise UnreadableModel(path, "no such file") from None
    except OSError as e:
        raise UnreadableModel(path, f"{type(e).__name__}: {e}") from None
    if actual != sha256:
        raise UnreadableModel(
            path, "its sha256 is not the one the quantize stage recorded; refused (a package is native code)"
        )
    with _open_zip(path) as archive:
        _archive_root(path, archive)
    import torch._inductor

    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as e:
        raise UnreadableModel(path, _first_line(e)) from e
