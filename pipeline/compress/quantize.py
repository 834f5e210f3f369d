"""int8 quantization of the CIFAR CNNs through torch.export + torchao PT2E, for fast CPU inference.

Only the non-deprecated path is used: ``torch.export`` -> ``prepare_pt2e`` / ``prepare_qat_pt2e`` with
the x86 inductor quantizer -> ``convert_pt2e`` -> ``torch.compile`` (inductor, freezing). Nothing here
imports ``torch.ao.quantization`` (it warns at import); torchao itself registers the
``quantized_decomposed`` ops that the converted graphs use.

The saved artefact is an exported program (``.pt2``) that holds the int8 weights and the activation
scales (they live in the graph, not in a state_dict), so it loads with ``torch.export.load`` in a
process that cannot import this project. That process must ``import torchao`` first: plain torch does
not know the ``quantized_decomposed`` ops and the load fails ("We failed to resolve
torch.ops.quantized_decomposed.dequantize_per_channel.default to an operator").
"""

from __future__ import annotations

import copy
import gzip
import io
import logging
import os
import re
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch._inductor.config
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule
from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
from torchao.quantization.pt2e.export_utils import model_is_exported
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from pipeline.models.files import load_pt2, sha256_of
from pipeline.rundir import atomic_write_bytes

log = logging.getLogger("pipeline.compress.quantize")

__all__ = [
    "compile_int8",
    "convert_qat",
    "export_model",
    "file_sizes",
    "fp16_state_dict",
    "int8_kernel_calls",
    "load_int8",
    "package_int8",
    "prepare_qat",
    "quantize_int8",
    "quantize_op_count",
    "save_int8",
    "set_exported_mode",
    "to_fp16",
    "use_inductor_cache",
]

# The largest batch an exported program accepts; export needs an upper bound only to reason about
# shapes, so it is far above anything that fits in memory.
_MAX_BATCH = 1 << 16


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _export_example(example: torch.Tensor) -> torch.Tensor:
    """A detached example with at least 2 rows: export specialises a dimension traced at size 1."""
    x = example.detach()
    if x.shape[0] < 2:
        x = torch.cat([x, x])  # cat keeps channels_last when its inputs are channels_last
    return x


def _export(model: nn.Module, example: torch.Tensor, *, train: bool, strict: bool = False) -> ExportedProgram:
    batch = Dim("batch", min=1, max=_MAX_BATCH)
    args, shapes = (_export_example(example),), ({0: batch},)
    if model_is_exported(model):  # its mode is baked into the graph; .train()/.eval() raise
        return torch.export.export(model, args, dynamic_shapes=shapes, strict=strict)
    was_training = model.training
    model.train(train)
    try:
        return torch.export.export(model, args, dynamic_shapes=shapes, strict=strict)
    finally:
        model.train(was_training)


def export_model(model: nn.Module, example: torch.Tensor) -> ExportedProgram:
    """Export ``model`` in eval mode with a dynamic batch dimension.

    A static batch would make every other batch size fail with "Guard failed: x.size()[0] == 1".
    Strides are not part of the program, so contiguous and channels_last inputs both run. The model's
    train/eval flag is restored afterwards.
    """
    return _export(model, example, train=False)


# --------------------------------------------------------------------------------------------------
# Post-training quantization
# --------------------------------------------------------------------------------------------------


def _residual_maxpools(gm: GraphModule) -> list[str] | None:
    """Module names of the max-pools whose output feeds an add directly (None: one is functional).

    Quantized, such a pool hands the add an int8 operand while the other operand is the fp32 output
    of a conv+ReLU that feeds nothing quantized (ResNet-9: ConvBNReLU -> MaxPool2d -> x + res(x)).
    Inductor then matches a conv-add fusion on a conv that already has ReLU fused and fails under
    freezing (``assert kwargs["postop_name"] == "none"`` in torchao's x86 inductor passes). Left in
    fp32, the pool gives the add an fp32 operand, the pattern no longer matches and every conv stays
    int8.
    """
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.target is not torch.ops.aten.max_pool2d.default:
            continue
        if not any(u.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) for u in node.users):
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if not stack or not str(stack[-1][1]).endswith("MaxPool2d"):
            return None
        path = stack[-1][0]
        names.append(path[len("L['self'].") :] if path.startswith("L['self'].") else path)
    return names


def _quantizer(gm: GraphModule, *, is_qat: bool, fp32_modules: Sequence[str] = ()) -> X86InductorQuantizer:
    # Without set_global the quantizer annotates nothing and prepare/convert silently return fp32.
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=is_qat))
    pools = _residual_maxpools(gm)
    if pools is None:
        log.info("leaving every max-pool in fp32 (one that feeds an add is not an nn.MaxPool2d)")
        quantizer.set_module_type_qconfig(nn.MaxPool2d, None)
    for name in pools or ():
        log.info("leaving max-pool %s in fp32 (it feeds a residual add)", name)
        quantizer.set_module_name_qconfig(name, None)
    for name in fp32_modules:  # a module name wins over the global config
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _prepare(gm: GraphModule, *, is_qat: bool, fp32_modules: Sequence[str] = ()) -> GraphModule:
    quantizer = _quantizer(gm, is_qat=is_qat, fp32_modules=fp32_modules)
    return (prepare_qat_pt2e if is_qat else prepare_pt2e)(gm, quantizer)


def _export_and_prepare(
    model: nn.Module, example: torch.Tensor, *, is_qat: bool, fp32_modules: Sequence[str] = ()
) -> GraphModule:
    """``model`` exported (training mode for QAT) with observers or fake-quantizers in place.

    Exported non-strict first (the default, fast); if the quantizer then annotated nothing, exported
    again with ``strict=True``: torch 2.11's non-strict export records no ``source_fn_stack``, which the
    x86 inductor quantizer matches on (README, GPUs), while strict export records it on every version.
    """
    for strict in (False, True):
        prepared = _prepare(
            _export(model, example, train=is_qat, strict=strict).module(), is_qat=is_qat, fp32_modules=fp32_modules
        )
        if _observer_count(prepared) > 0:
            return prepared
        if not strict:
            log.warning("the quantizer annotated nothing in the non-strict export; exporting again with strict=True")
    raise RuntimeError("the quantizer annotated nothing: no observer was inserted (is a global config set?)")


def quantize_op_count(gm: GraphModule) -> int:
    """Number of quantize nodes (``quantized_decomposed.quantize_*``) in a converted graph."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace == "quantized_decomposed" and node.target.__name__.startswith("quantize_"):
                count += 1
    return count


def _observer_count(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and "activation_post_process" in str(n.target))


def _require_quantized(converted: GraphModule) -> GraphModule:
    if quantize_op_count(converted) == 0:
        raise RuntimeError("convert_pt2e inserted no quantize op: the model was left in fp32")
    return converted


def quantize_int8(
    model: nn.Module, calib: Iterable[torch.Tensor], example: torch.Tensor, *, fp32_modules: Sequence[str] = ()
) -> GraphModule:
    """Post-training static int8 (per-channel weights, per-tensor activations) for x86 inductor.

    ``calib`` yields input batches normalised like training inputs (a few hundred images are enough for
    min/max observers). The model is copied to the CPU first: folding BatchNorm into the convolutions
    must not touch the caller's weights. Raises if no quantize op ended up in the graph.
    ``fp32_modules`` (qualified module names, e.g. ``layer1.1.conv2``) stay in fp32: their inputs are
    not quantized for them (:mod:`pipeline.compress.budget.int8` picks them to meet an accuracy budget).
    """
    model = copy.deepcopy(model).cpu()
    prepared = _export_and_prepare(model, example.cpu(), is_qat=False, fp32_modules=fp32_modules)
    batches = 0
    with torch.no_grad():
        for x in calib:
            prepared(x.cpu())
            batches += 1
    if batches == 0:
        raise ValueError("quantize_int8 needs at least one calibration batch")
    return _require_quantized(convert_pt2e(prepared))


# --------------------------------------------------------------------------------------------------
# Quantization-aware training
# --------------------------------------------------------------------------------------------------


def prepare_qat(model: nn.Module, example: torch.Tensor, *, fp32_modules: Sequence[str] = ()) -> GraphModule:
    """A copy of ``model`` exported in training mode with fake-quantize modules in place.

    Train it like any module (``set_exported_mode(gm, True)``, an optimizer over ``gm.parameters()``);
    its ``state_dict()`` loads with ``weights_only=True`` into another ``prepare_qat`` of the same
    architecture, which is how an interrupted QAT fine-tune resumes.
    """
    model = copy.deepcopy(model).cpu()
    return _export_and_prepare(model, example.cpu(), is_qat=True, fp32_modules=fp32_modules)


def set_exported_mode(gm: GraphModule, train: bool) -> GraphModule:
    """Switch BatchNorm/dropout of an exported module; ``gm.train()``/``gm.eval()`` raise on these."""
    if train:
        move_exported_model_to_train(gm)
    else:
        move_exported_model_to_eval(gm)
    return gm


def convert_qat(gm: GraphModule) -> GraphModule:
    """The int8 module of a QAT-prepared one; ``gm`` itself is left trainable (a copy is converted)."""
    gm = copy.deepcopy(gm)
    set_exported_mode(gm, False)
    return _require_quantized(convert_pt2e(gm))


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------

# Node metadata that only serves debugging and provenance; inference and re-export do not read it.
_DEBUG_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node", "custom")


def _drop_unused_state(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` without the parameters, buffers and tensor attributes no node reads."""
    gm = copy.deepcopy(gm)
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def is_used(name: str) -> bool:
        return any(name == u or name.startswith(u + ".") for u in used)

    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if not is_used(name):
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    return gm


def _tensor_bytes(ep: ExportedProgram) -> bytes:
    chunks = [
        t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for t in list(ep.state_dict.values()) + list(ep.constants.values())
        if isinstance(t, torch.Tensor)
    ]
    return b"".join(chunks)


def save_int8(gm: GraphModule, path: Path, example: torch.Tensor) -> dict[str, int]:
    """Save a converted int8 module as a self-contained exported program and return its sizes.

    The converted module still carries the original fp32 weights, so a plain save is larger than the
    fp32 model: every parameter/buffer no node reads is dropped before re-export, and the program is
    stripped of its sample inputs (the example batch, e.g. 98 KB for 8 CIFAR images) and of per-node
    debug metadata (stack traces, module stacks, source provenance). ResNet-20: naive 1.82 MB ->
    unused state dropped 0.72 MB -> no sample inputs 0.62 MB -> no debug metadata 0.47 MB (fp32
    state_dict 1.12 MB). What is left: the int8 weights with their per-channel scales, fp32 biases
    (0.28 MB together) and the graph JSON (~0.15 MB: nodes with the activation scales inlined, the
    signature and every node's shape, all needed to load it; it gzips to a few KB). Written
    atomically (temporary file in the same folder, fsync, rename).

    Returns ``raw`` and ``gzip`` (level 9) bytes of the file, ``tensors`` (bytes of the weight
    tensors alone) and ``tensors_gzip``.
    """
    ep = export_model(_drop_unused_state(gm), example)
    ep.example_inputs = None
    for node in ep.graph.nodes:
        for key in _DEBUG_META:
            node.meta.pop(key, None)
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(Path(path), data)  # a full disk: OSError naming the file, the old file intact
    tensors = _tensor_bytes(ep)
    return {
        "raw": len(data),
        "gzip": len(gzip.compress(data, 9)),
        "tensors": len(tensors),
        "tensors_gzip": len(gzip.compress(tensors, 9)),
    }


def load_int8(path: Path) -> nn.Module:
    """The int8 module saved by ``save_int8``, read through :func:`pipeline.models.files.load_pt2` (the archive
    is checked first: nothing pickled, no code; :class:`pipeline.models.files.UnreadableModel` names the file
    otherwise). Elsewhere: ``import torchao`` (registers the ops), then ``torch.export.load(path).module()``
    on a file you trust; this project is not needed."""
    return load_pt2(Path(path)).module()


def file_sizes(path: Path) -> dict[str, int]:
    """Raw bytes and gzip (level 9, in memory) bytes of a file: the size a model costs to ship."""
    data = Path(path).read_bytes()
    return {"raw": len(data), "gzip": len(gzip.compress(data, 9))}


# --------------------------------------------------------------------------------------------------
# Fast inference
# --------------------------------------------------------------------------------------------------


def _failure_reason(exc: BaseException) -> str:
    """One line: the exception, the one inside it (dynamo wraps compiler errors) and where it was raised."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = [line.strip() for line in str(inner).splitlines()]
    message = next((line for line in lines if line and not line.startswith("Set TORCHDYNAMO")), "")
    frames = traceback.extract_tb(inner.__traceback__ or exc.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        where = f" at {'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno}"
        if frame.line:
            where += f" ({frame.line.strip()})"
    head = type(exc).__name__ if inner is exc else f"{type(exc).__name__}: {type(inner).__name__}"
    return f"{head}{where}" + (f": {message}" if message else "")


def compile_int8(
    module: nn.Module, example: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """``torch.compile`` (inductor, freezing) of an int8 module, warmed up on ``example``.

    Freezing lets inductor constant-fold the int8 weights into prepacked oneDNN kernels and fuse
    q/dq into them; without it an int8 model is no faster than fp32. Inductor reads
    ``torch._inductor.config.freezing`` globally when a graph compiles (the ``options=`` route of
    torch.compile does not reach it: prepacking then fails on fake tensors), so the returned callable
    sets it only around each call, which also covers recompiles for a new input shape or memory
    format, and restores it after. Freezing applies only with gradients off: calls run under
    ``torch.no_grad()``. If the warm-up compile fails, the eager int8 module is returned and
    ``info["fallback_reason"]`` says why; ``info["compile_s"]`` is the warm-up time (compile included).
    """
    compiled = torch.compile(module, backend="inductor")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(x)

    start = time.perf_counter()
    try:
        run(example)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager int8
        reason = _failure_reason(exc)
        log.warning("int8 compile failed, using the eager int8 module: %s", reason)

        def eager(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        # what measure counts and unwraps
        eager._orig_mod = module  # type: ignore[attr-defined]
        return eager, {
            "compiled": False,
            "backend": "eager",
            "fallback_reason": reason,
            "compile_s": round(time.perf_counter() - start, 2),
        }
    run._orig_mod = module  # type: ignore[attr-defined]
    return run, {
        "compiled": True,
        "backend": "inductor",
        "fallback_reason": None,
        "compile_s": round(time.perf_counter() - start, 2),
    }


# --------------------------------------------------------------------------------------------------
# The deployable int8 model: an AOTInductor package, compiled once
# --------------------------------------------------------------------------------------------------

INDUCTOR_CACHE = Path(".cache") / "inductor"  # under the output root: shared by every job of its sweeps


def use_inductor_cache(out_root: Path) -> Path:
    """Point inductor's on-disk cache (compiled C++ kernels, precompiled headers) at
    ``<out_root>/.cache/inductor``, so the jobs of a sweep (on any node that sees the folder) compile
    each kernel once. Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks for its cache."""
    folder = Path(out_root).absolute() / INDUCTOR_CACHE
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def int8_kernel_calls(package: Path) -> dict[str, int]:
    """Calls of oneDNN's quantized kernels in the generated wrapper source of an AOTInductor package:
    ``qconv`` and ``qlinear`` (inductor can silently leave a PT2E graph in fp32 kernels: then both are 0)."""
    with zipfile.ZipFile(package) as archive:
        source = "".join(
            archive.read(n).decode(errors="replace") for n in archive.namelist() if n.endswith("wrapper.cpp")
        )
    return {kind: len(re.findall(rf"aoti_torch_cpu__{kind}\w*\(", source)) for kind in ("qconv", "qlinear")}


def package_int8(program: Path, package: Path, example: torch.Tensor) -> dict[str, Any]:
    """Compile the int8 program saved at ``program`` (read back through the safe loader) once with
    AOTInductor, freezing on and gradients off (otherwise the int8 weights are not prepacked and the
    kernels stay fp32), into ``package``: a shared library with the weights, for the dynamic batch size
    the program was exported with, taking NCHW-contiguous input (call it on ``x.contiguous()``: it does
    not check strides); ``torch._inductor.aoti_load_package`` runs it without compiling.

    It is native code for this CPU type (the vector instructions of the machine that compiled it).
    Written atomically. Returns what the quantize stage records: ``file`` (name), ``sha256`` (what the
    measure stage checks before loading it), ``bytes``, ``compile_s``, ``kernels``
    (:func:`int8_kernel_calls`); or, when the compile fails, ``error`` (one line) and no file.
    """
    # The package is specialised to the input strides the program was exported with and does not check
    # them: from a program exported on channels_last batches, contiguous inputs gave wrong outputs (69.9%
    # top-1 error instead of 7.5%). Re-exported on a contiguous example, it takes plain NCHW input.
    x = _export_example(example.cpu()).contiguous()
    ep = export_model(load_pt2(program).module(), x)
    ep.example_inputs = ((x,), {})
    buffer = io.BytesIO()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(ep, package_path=buffer, inductor_configs={"freezing": True})
    except Exception as exc:  # noqa: BLE001 - a compiler failure leaves int8 without a fast form, said why
        reason = _failure_reason(exc)
        log.warning("int8 AOTInductor compile failed: %s", reason)
        return {"file": None, "error": reason, "compile_s": round(time.perf_counter() - start, 2)}
    compile_s = time.perf_counter() - start
    atomic_write_bytes(Path(package), buffer.getbuffer())
    return {
        "file": Path(package).name,
        "sha256": sha256_of(package),
        "bytes": Path(package).stat().st_size,
        "compile_s": round(compile_s, 2),
        "kernels": int8_kernel_calls(package),
    }


# --------------------------------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------------------------------


def to_fp16(model: nn.Module) -> nn.Module:
    """A half-precision eval-mode copy for GPU inference (CPUs here have no fast fp16 kernels)."""
    return copy.deepcopy(model).half().eval()


def fp16_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with floating tensors in fp16 (integer buffers such as BN counters unchanged)."""
    return {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
