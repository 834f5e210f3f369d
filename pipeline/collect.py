"""``python -m pipeline.collect <out>/<sweep>``: one table row per run, from the run folders alone.

Prints a markdown table and writes ``results.md`` and ``results.csv`` into the sweep folder. Columns:
the swept values, then training loss, train best acc, val loss, val best acc, test acc, status.
Unfinished runs show their status in place of numbers. Also writes TensorBoard HParams into each run's
tb/ folder (pipeline/tb_hparams.py), so ``tensorboard --logdir <out>/<sweep>`` shows the same table. Torch-free.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline import cli
from pipeline.config import COMMAND_LINE, ConfigError
from pipeline.rundir import STAGES, atomic_write_text, list_runs

# (column title, metrics/train.json key, formatter)
METRIC_COLUMNS: list[tuple[str, str, str]] = [
    ("training loss", "train_loss", "loss"),
    ("train best acc", "train_acc_best", "pct"),
    ("val loss", "val_loss", "loss"),
    ("val best acc", "val_acc_best", "pct"),
    ("test acc", "test_acc", "pct"),
]


def _measured(r: dict[str, Any], model: str, key: str) -> Any:
    """A figure of one model of a run from metrics/measure.json (None when not measured)."""
    for entry in r["stages"].get("measure", {}).get("models") or []:
        if isinstance(entry, dict) and entry.get("name") == model:
            return entry.get(key)
    return None


def _stage(r: dict[str, Any], stage: str, key: str) -> Any:
    m = r["stages"].get(stage) or {}
    return m.get(key) if m.get("status") == "done" and m.get("method", "none") != "none" else None


def _quant_acc(r: dict[str, Any]) -> Any:
    return _stage(r, "quantize", "test_acc") if _stage(r, "quantize", "method") in ("int8", "qat") else None


def _quant_size(r: dict[str, Any]) -> Any:
    return _measured(r, "int8", "file_bytes") or (_stage(r, "quantize", "raw") if _quant_acc(r) is not None else None)


# The compression stages' key figures, shown when any run of the sweep prunes or quantizes:
# (column title, CSV key, value of a record, formatter). The full compression table is collect's own report.
COMPRESSION_COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], Any], str]] = [
    ("removed", "sparsity", lambda r: _stage(r, "prune", "sparsity"), "pct"),  # weights (or parameters) pruned
    (
        "pruned acc",
        "pruned_test_acc",
        lambda r: _stage(r, "prune", "test_acc") if _stage(r, "prune", "during") == "finetune" else None,
        "pct",
    ),
    ("int8 acc", "int8_test_acc", _quant_acc, "pct"),
    ("fp32 size", "fp32_bytes", lambda r: _measured(r, "trained", "file_bytes"), "bytes"),
    ("int8 size", "int8_bytes", _quant_size, "bytes"),
    (
        "int8 gzip",
        "int8_gzip_bytes",
        lambda r: (
            _measured(r, "int8", "file_gzip_bytes")
            or (_stage(r, "quantize", "gzip") if _quant_acc(r) is not None else None)
        ),
        "bytes",
    ),
    ("fp32 ms/img", "fp32_latency_ms", lambda r: _measured(r, "trained", "latency_b1_ms"), "ms"),
    ("int8 ms/img", "int8_latency_ms", lambda r: _measured(r, "int8", "latency_b1_ms"), "ms"),
]


def _compresses(records: list[dict[str, Any]]) -> bool:
    return any(
        (r["stages"].get(s) or {}).get("method", "none") != "none" for r in records for s in ("prune", "quantize")
    )


def _format(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "bytes":
        return f"{float(value) / 1e6:.2f} MB" if value >= 1e5 else f"{float(value) / 1e3:.1f} kB"
    if kind == "ms":
        return f"{float(value):.2f}"
    if kind == "pct":
        return f"{100 * float(value):.2f}%"
    if kind == "loss":
        return f"{float(value):.4f}"
    return cli.fmt(value)


def gather(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(swept keys, one record per run with its swept values, metrics and status)."""
    runs = list_runs(sweep_dir)
    records = []
    for run in runs:
        meta = run.read_meta()
        stages = {stage: run.read_metrics(stage) or {} for stage in STAGES}
        records.append(
            {
                "id": run.id,
                "swept": meta.get("swept", {}),
                "metrics": stages["train"],
                "stages": stages,
                "status": run.status(),
                "progress": run.read_progress(),
                "log": str(run.log),
            }
        )
    keys = list(dict.fromkeys(k for r in records for k in r["swept"]))
    records.sort(key=lambda r: ([str(r["swept"].get(k, "")) for k in keys], r["id"]))
    return keys, records


def rows(keys: list[str], records: list[dict[str, Any]], *, raw: bool = False) -> tuple[list[str], list[list[str]]]:
    titles = cli.short_keys(keys)
    extra = COMPRESSION_COLUMNS if _compresses(records) else []
    header = ["run"] + [titles[k] for k in keys] + [c[0] for c in METRIC_COLUMNS] + [c[0] for c in extra] + ["status"]
    out = []
    for r in records:
        row = [r["id"]] + [cli.fmt(r["swept"].get(k, "")) for k in keys]
        finished = r["metrics"].get("status") in ("done", "diverged")  # training's figures, once it ended
        values = [(r["metrics"].get(key) if finished else None, kind) for _, key, kind in METRIC_COLUMNS]
        values += [(get(r), kind) for _, _, get, kind in extra]
        for value, kind in values:
            row.append(("" if value is None else repr(value)) if raw else _format(value, kind))
        status = r["status"]
        if status == "running" and r["progress"]:
            stage = r["progress"].get("stage", "train")
            status = (
                f"running ({'' if stage == 'train' else stage + ', '}epoch {r['progress'].get('epoch')}/"
                f"{r['progress'].get('epochs')})"
            )
        elif status == "diverged" and r["metrics"].get("diverged_epoch"):
            status = f"diverged (epoch {r['metrics']['diverged_epoch']})"
        elif status == "failed":
            stage = next((k for k, m in r["stages"].items() if m.get("status") == "failed"), None)
            where = f"{stage} stage; " if stage and stage != "train" else ""
            status = f"failed ({where}log {r['log']})" if not raw else "failed"
        row.append(status)
        out.append(row)
    return header, out


def markdown(header: list[str], body: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    numeric = [all(_looks_numeric(r[i]) for r in body if r[i]) and any(r[i] for r in body) for i in range(len(header))]
    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _looks_numeric(s: str) -> bool:
    try:
        float(s.rstrip("%"))
        return True
    except ValueError:
        return False


def to_csv(header: list[str], body: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def collect(sweep_dir: Path) -> tuple[str, str]:
    """Write results.md and results.csv into the sweep folder; returns (markdown, csv) text."""
    keys, records = gather(sweep_dir)
    header, body = rows(keys, records)
    md = markdown(header, body)
    raw_header, raw_body = rows(keys, records, raw=True)
    # CSV keeps full dotted keys and unrounded numbers, for plotting and papers
    extra = [c[1] for c in COMPRESSION_COLUMNS] if _compresses(records) else []
    raw_header = ["run"] + keys + [c[1] for c in METRIC_COLUMNS] + extra + ["status"]
    text = to_csv(raw_header, raw_body)
    atomic_write_text(sweep_dir / "results.md", md)
    atomic_write_text(sweep_dir / "results.csv", text)
    from pipeline.tb_hparams import write_hparams

    try:
        write_hparams(sweep_dir, keys, records)  # after the tables: they never wait on TensorBoard
    except ImportError as e:  # tensorboard missing: only the optional TensorBoard view is lost
        print(f"warning: no TensorBoard HParams written ({e})", file=sys.stderr)
    return md, text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a sweep's results folder, e.g. runs/optimizers")
    args = p.parse_args(argv)
    con = cli.console()
    with cli.exit_on_config_error():
        if not args.sweep_dir.is_dir():
            raise ConfigError(COMMAND_LINE, f"'{args.sweep_dir}' is not a folder", key="sweep_dir")
        if not list_runs(args.sweep_dir):
            raise ConfigError(args.sweep_dir, "holds no run folders (*/config.yaml)")
    with cli.exit_on_os_error():  # a read-only or full results folder: the path and the reason, exit 2
        md, _ = collect(args.sweep_dir)
    con.print(md, markup=False, highlight=False, soft_wrap=True)
    con.print(f"wrote {args.sweep_dir / 'results.md'} and {args.sweep_dir / 'results.csv'}")
    from pipeline.tb_hparams import HPARAMS_FILE

    runs = list_runs(args.sweep_dir)
    n = sum((r.tensorboard / HPARAMS_FILE).is_file() for r in runs)
    if n:
        con.print(
            f"HParams of {n}/{len(runs)} runs in <run>/tb/{HPARAMS_FILE}: tensorboard --logdir "
            f"{args.sweep_dir} (restart a running TensorBoard to see changes)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
