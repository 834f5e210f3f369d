"""Peak CPU memory of inference of one model, in this (fresh) process; prints one line of JSON.

    python -m pipeline.compress.measure_memory SPEC_JSON

SPEC: ``{"loader": {...}, "dtype": "float32", "channels_last": false, "input_shape": [3, 32, 32],
"batches": [1, 256], "threads": 2, "warmup": 2}`` (``loader`` as for
:func:`pipeline.compress.measure.load_from_spec`). For each batch size: ``warmup`` untimed forwards (all
sizes first), then ``echo 5 > /proc/self/clear_refs`` (VmHWM := VmRSS), VmRSS, one forward, VmHWM: the peak
is VmHWM minus that VmRSS, in bytes (page granularity). Started by ``measure_artifacts`` with
``MALLOC_MMAP_THRESHOLD_`` set low, so freed tensors leave the resident set instead of being reused from
pages the warm-up left resident (which would hide them).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any


def _status() -> dict[str, int]:
    """VmHWM and VmRSS of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pipeline.compress.measure import load_from_spec
    from pipeline.models.files import DTYPES

    threads = int(spec.get("threads") or torch.get_num_threads())
    torch.set_num_threads(threads)
    dtype = DTYPES[spec.get("dtype", "float32")]
    channels_last = bool(spec.get("channels_last", False))
    shape = tuple(int(s) for s in spec["input_shape"])
    batches = [int(b) for b in spec["batches"]]
    warmup = max(1, int(spec.get("warmup", 1)))

    fn = load_from_spec(spec["loader"], device="cpu", channels_last=channels_last)
    if isinstance(fn, torch.nn.Module):
        try:
            fn.eval()
        except NotImplementedError:
            pass
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for b in batches:
        x = torch.randn((b, *shape), generator=gen).to(dtype)
        inputs[b] = x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
    peak, before_rss, after_rss = {}, {}, {}
    with torch.no_grad():
        for b in batches:
            for _ in range(warmup):
                del_out = fn(inputs[b])
                del del_out
        gc.collect()
        loaded_rss = _status()["VmRSS"]
        for b in batches:
            gc.collect()
            _reset_peak()
            before = _status()["VmRSS"]
            out = fn(inputs[b])
            st = _status()
            del out
            peak[str(b)] = max(0, st["VmHWM"] - before)
            before_rss[str(b)], after_rss[str(b)] = before, st["VmRSS"]
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    method = (
        f"cpu, fresh subprocess (python -m pipeline.compress.measure_memory), {threads} threads"
        + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")
        + f": {warmup} warm-up forwards, echo 5 > /proc/self/clear_refs, one forward, "
        f"VmHWM - VmRSS before the forward ({os.sysconf('SC_PAGE_SIZE') // 1024} KiB pages)"
    )
    return {
        "peak_bytes": peak,
        "rss_before_bytes": before_rss,
        "rss_after_bytes": after_rss,
        "rss_loaded_bytes": loaded_rss,
        "method": method,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.compress.measure_memory SPEC_JSON", file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
