"""TensorBoard HParams for a sweep, written by ``collect`` from the run folders alone. Torch-free.

Each run gets one event file of its own, ``<run>/tb/events.out.tfevents.0.pipeline-hparams``, next to
the scalars its training wrote (those files are never opened). It holds, all at step 0:

- the experiment: every swept key (with the discrete values seen across the sweep) and every metric;
  the same in every run, so any one of them describes the sweep
- the session start: the run's swept values, the same key set in every run (a key a run lacks, from an
  older version of the sweep file, takes its value from the run's config.yaml, else "")
- the metrics of metrics/train.json as scalars ``hparams/<name>`` (finished runs only), and when the
  sweep prunes or quantizes, the compression figures too (sparsity, int8 accuracy, fp32/int8 file
  size, fp32/int8 latency): the metric list is the sweep's, the same in every run
- the session end: the run's status (done → success, diverged/failed → failure, running → running,
  pending → unknown)

``tensorboard --logdir <out>/<sweep>`` then shows one HParams row per run (session ``<run id>/tb``).
The file is rebuilt on every collect and replaced atomically, only when its bytes change (event times
come from file modification times, not the clock), so collecting twice never adds sessions.

tensorboard is imported only when writing (its protobuf modules and its record writer, which brings
numpy along: about 0.3 s); torch never is.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from pipeline.rundir import RunDir

if TYPE_CHECKING:
    from pipeline.report.records import Record

HPARAMS_FILE = "events.out.tfevents.0.pipeline-hparams"  # sorts before SummaryWriter's files (by time)
METRICS: tuple[str, ...] = ("train_loss", "train_acc_best", "val_loss", "val_acc_best", "test_acc", "test_top5")
METRIC_TAG = "hparams/{}"  # the scalar tag of each metric (training writes train/loss, val/acc, ...)
METRIC_HELP = {
    "train_loss": "training loss of the last epoch",
    "train_acc_best": "best training accuracy over the epochs (0-1)",
    "val_loss": "validation loss of the last epoch",
    "val_acc_best": "best validation accuracy over the epochs (0-1)",
    "test_acc": "test accuracy, top-1 (0-1)",
    "test_top5": "test accuracy, top-5 (0-1)",
}
# Added to the metrics when some run of the sweep prunes or quantizes (collect's compression columns)
COMPRESSION_METRICS: tuple[str, ...] = (
    "sparsity",
    "pruned_test_acc",
    "int8_test_acc",
    "fp32_bytes",
    "int8_bytes",
    "int8_gzip_bytes",
    "fp32_latency_ms",
    "int8_latency_ms",
)
METRIC_HELP.update(
    {
        "sparsity": "fraction of weights (unstructured) or parameters (structured) pruned (0-1)",
        "pruned_test_acc": "test accuracy of the pruned, fine-tuned model (0-1)",
        "int8_test_acc": "test accuracy of the int8 model (0-1)",
        "fp32_bytes": "file size of the trained fp32 model (bytes)",
        "int8_bytes": "file size of the int8 model (bytes)",
        "int8_gzip_bytes": "gzip-compressed size of the int8 model file (bytes)",
        "fp32_latency_ms": "fp32 latency per image at batch 1 (ms)",
        "int8_latency_ms": "int8 latency per image at batch 1 (ms)",
    }
)
MISSING = ""  # a swept key that neither meta.json nor config.yaml of a run holds
WITH_METRICS = ("done", "diverged")  # statuses whose metrics are shown (as in the results table)

_EXPERIMENT_TAG = "_hparams_/experiment"  # tensorboard.plugins.hparams.metadata (not imported: numpy)
_SESSION_START_TAG = "_hparams_/session_start_info"
_SESSION_END_TAG = "_hparams_/session_end_info"


# --------------------------------------------------------------------------------------------------
# hyperparameter values
# --------------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_string(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_as_string(x) for x in v) + "]"
    return str(v)


def column_types(keys: Sequence[str], values: Sequence[dict[str, Any]]) -> dict[str, str]:
    """'bool', 'number' or 'string' per key: a key is a number (or bool) only if every run's value is."""
    types = {}
    for k in keys:
        vs = [v[k] for v in values]
        if vs and all(isinstance(x, bool) for x in vs):
            types[k] = "bool"
        elif vs and all(_is_number(x) and math.isfinite(x) for x in vs):
            types[k] = "number"
        else:
            types[k] = "string"
    return types


def _typed(value: Any, kind: str) -> Any:
    return value if kind in ("bool", "number") else _as_string(value)


# --------------------------------------------------------------------------------------------------
# protos and the event file
# --------------------------------------------------------------------------------------------------


def _pb() -> SimpleNamespace:
    """tensorboard's generated protobuf modules, imported on first use."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    return SimpleNamespace(
        event=event_pb2,
        summary=summary_pb2,
        tensor=tensor_pb2,
        shape=tensor_shape_pb2,
        types=types_pb2,
        api=api_pb2,
        plugin_data=plugin_data_pb2,
    )


def _set_value(msg, value: Any, kind: str) -> None:
    """Fill a google.protobuf.Value."""
    if kind == "bool":
        msg.bool_value = bool(value)
    elif kind == "number":
        msg.number_value = float(value)
    else:
        msg.string_value = _as_string(value)


def _hparams_summary(tag: str, plugin_data) -> Any:
    """A Summary holding one HParamsPluginData, as tensorboard.plugins.hparams.summary._summary builds it."""
    pb = _pb()
    plugin_data.version = 0  # metadata.PLUGIN_DATA_VERSION
    null_tensor = pb.tensor.TensorProto(  # metadata.NULL_TENSOR: float32, shape (0,)
        dtype=pb.types.DT_FLOAT, tensor_shape=pb.shape.TensorShapeProto(dim=[pb.shape.TensorShapeProto.Dim(size=0)])
    )
    meta = pb.summary.SummaryMetadata(
        plugin_data=pb.summary.SummaryMetadata.PluginData(
            plugin_name="hparams", content=plugin_data.SerializeToString()
        )
    )
    return pb.summary.Summary(value=[pb.summary.Summary.Value(tag=tag, metadata=meta, tensor=null_tensor)])


def experiment_proto(
    keys: Sequence[str], types: dict[str, str], values: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS
):
    """api_pb2.Experiment: each key with its discrete domain (sorted values seen), each metric."""
    api_pb2 = _pb().api
    data_type = {
        "bool": api_pb2.DATA_TYPE_BOOL,
        "number": api_pb2.DATA_TYPE_FLOAT64,
        "string": api_pb2.DATA_TYPE_STRING,
    }
    exp = api_pb2.Experiment()
    for k in keys:
        seen = sorted({_typed(v[k], types[k]) for v in values})
        info = exp.hparam_infos.add(name=k, type=data_type[types[k]], differs=len(seen) > 1)
        for x in seen:
            _set_value(info.domain_discrete.values.add(), x, types[k])
    for m in metrics:
        exp.metric_infos.add(
            name=api_pb2.MetricName(tag=METRIC_TAG.format(m)), display_name=m, description=METRIC_HELP.get(m, "")
        )
    return exp


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def run_events(
    run: RunDir,
    experiment,
    hparams: dict[str, Any],
    types: dict[str, str],
    status: str,
    metrics: dict[str, Any],
    names: Sequence[str] = METRICS,
) -> list:
    """The Event protos of one run's HParams file, in order; deterministic for the same folder."""
    pb = _pb()
    event_pb2, summary_pb2, api_pb2, plugin_data_pb2 = pb.event, pb.summary, pb.api, pb.plugin_data
    start = _mtime(run.config) or _mtime(run.meta)
    end = _mtime(run.metrics_path("train")) or start
    events = [
        event_pb2.Event(wall_time=start, file_version="brain.Event:2"),
        event_pb2.Event(
            wall_time=start,
            summary=_hparams_summary(_EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        ),
    ]
    ssi = plugin_data_pb2.SessionStartInfo(start_time_secs=start)
    for k, v in hparams.items():
        _set_value(ssi.hparams[k], v, types[k])
    events.append(
        event_pb2.Event(
            wall_time=start,
            summary=_hparams_summary(_SESSION_START_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=ssi)),
        )
    )
    # step 0 throughout: a resumed run's SummaryWriter(purge_step>=1) purges steps >= purge_step
    # simple_value is float32: TensorBoard's default (Rust) loader reads no float64 scalars anyway
    values = [
        summary_pb2.Summary.Value(tag=METRIC_TAG.format(m), simple_value=float(metrics[m]))
        for m in names
        if status in WITH_METRICS and _is_number(metrics.get(m)) and math.isfinite(metrics[m])
    ]
    if values:
        events.append(event_pb2.Event(wall_time=end, summary=summary_pb2.Summary(value=values)))
    code = {
        "done": api_pb2.STATUS_SUCCESS,
        "diverged": api_pb2.STATUS_FAILURE,
        "failed": api_pb2.STATUS_FAILURE,
        "running": api_pb2.STATUS_RUNNING,
    }.get(status, api_pb2.STATUS_UNKNOWN)
    sei = plugin_data_pb2.SessionEndInfo(status=code)
    if status in ("done", "diverged", "failed"):
        sei.end_time_secs = end
    events.append(
        event_pb2.Event(
            wall_time=end,
            summary=_hparams_summary(_SESSION_END_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=sei)),
        )
    )
    return events


def tfrecords(payloads: Iterable[bytes]) -> bytes:
    """Serialized events in TensorBoard's event-file framing, by tensorboard's own record writer (kept
    in memory so the file can get a fixed name and be replaced atomically)."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for data in payloads:
        writer.write(data)
    return buf.getvalue()


def _replace_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file (no 'tfevents' in its name, so TensorBoard
    never reads it) and a rename; nothing is written when the file already holds these bytes."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pipeline-hparams.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------


def write_hparams(sweep_dir: Path, keys: Sequence[str], records: Sequence[Record]) -> list[Path]:
    """One HParams file per run of ``pipeline.report.records.gather``'s records; returns the files in
    place afterwards. A run folder that cannot be written is reported on stderr and left out; the
    others still get theirs."""
    from pipeline.report.tables import COMPRESSION_COLUMNS, compresses

    runs = [r.run for r in records]
    values = [{k: r.setting(k, MISSING) for k in keys} for r in records]  # (swept values first, then config.yaml)
    types = column_types(keys, values)
    names = METRICS + (COMPRESSION_METRICS if compresses(records) else ())
    experiment = experiment_proto(keys, types, values, names)
    getters = {key: get for key, _, get, _, _ in COMPRESSION_COLUMNS}
    done = []
    for run, r, v in zip(runs, records, values):
        metrics = dict(r.metrics)
        metrics.update({m: getters[m](r) for m in names if m in getters})
        events = run_events(run, experiment, v, types, r.status, metrics, names)
        path = run.tensorboard / HPARAMS_FILE
        try:
            _replace_bytes(path, tfrecords(e.SerializeToString() for e in events))
        except OSError as e:
            print(f"warning: no TensorBoard HParams for run {run.id}: {e}", file=sys.stderr)
            continue
        done.append(path)
    return done
