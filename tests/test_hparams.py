"""collect writes TensorBoard HParams into each run's tb/ folder: one fixed file per run, rewritten
in place, the swept values and final metrics as TensorBoard reads them back, training files untouched."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from pipeline.collect import collect
from pipeline.rundir import atomic_write_json, list_runs
from pipeline.submit.expand import expand_sweep, read_sweep
from pipeline.submit.plan import write_run
from pipeline.report.hparams import HPARAMS_FILE, METRIC_TAG, METRICS
from tests.conftest import REPO, finished, write_done

KEYS = ["optim.name", "optim.lr"]


def f32(x: float) -> float:
    """What a TensorBoard scalar (float32) holds for ``x``."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


@pytest.fixture
def sweep(tmp_path, repo):
    """4 runs of a name x lr grid in every state, plus one run of an older sweep file that swept only
    optim.name (its meta.json lacks optim.lr), and a real SummaryWriter file in one run."""
    base = repo / "configs/base.yaml"
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(f"name: s\nbase: [{base}]\ngrid: {{optim.name: [adam, sgd], optim.lr: [0.1, 0.05]}}\n")
    spec = read_sweep(spec_path)
    sweep_dir = tmp_path / "runs/s"
    runs = {
        (r.swept["optim.name"], r.swept["optim.lr"]): write_run(sweep_dir, spec, r)
        for r in expand_sweep(spec, cwd=tmp_path)
    }
    old_path = tmp_path / "old.yaml"
    old_path.write_text(f"name: s\nbase: [{base}]\ngrid: {{optim.name: [adamw]}}\n")
    old = read_sweep(old_path)
    (r,) = expand_sweep(old, cwd=tmp_path)
    runs["adamw"] = write_run(sweep_dir, old, r)

    write_done(runs["sgd", 0.1], finished("done"))
    runs["sgd", 0.05].write_metrics("train", finished("diverged", diverged_epoch=2, test_acc=None, test_top5=None))
    runs["adam", 0.1].write_metrics("train", {"status": "failed", "error": "RuntimeError: boom"})
    atomic_write_json(runs["adam", 0.05].progress, {"epoch": 1, "epochs": 3, "val_acc_best": 0.5})
    write_done(runs["adamw"], finished("done", test_acc=0.5))

    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(runs["sgd", 0.1].tensorboard))
    for epoch in (1, 2, 3):
        w.add_scalar("train/loss", 1.0 / epoch, epoch)
    w.close()
    return sweep_dir, runs


def read_tb(tb_dir):
    """(session start hparams, session end status, metric values, experiment) as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}
    start = data["_hparams_/session_start_info"].session_start_info
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    tags = set(acc.Tags()["scalars"])
    metrics = {m: acc.Scalars(METRIC_TAG.format(m))[-1].value for m in METRICS if METRIC_TAG.format(m) in tags}
    return (
        hparams,
        data["_hparams_/session_end_info"].session_end_info.status,
        metrics,
        data["_hparams_/experiment"].experiment,
    )


def test_hparams_per_run_match_meta_and_metrics_and_leave_training_files_alone(sweep):
    from tensorboard.plugins.hparams import api_pb2

    sweep_dir, runs = sweep
    tb_file = next(runs["sgd", 0.1].tensorboard.glob("events.out.tfevents.*"))
    training_bytes = tb_file.read_bytes()

    collect(sweep_dir)
    first = {r.id: (r.tensorboard / HPARAMS_FILE).stat().st_mtime_ns for r in list_runs(sweep_dir)}
    collect(sweep_dir)  # idempotent: same files, not even rewritten
    assert {r.id: (r.tensorboard / HPARAMS_FILE).stat().st_mtime_ns for r in list_runs(sweep_dir)} == first

    assert tb_file.read_bytes() == training_bytes
    assert sorted(p.name for p in runs["sgd", 0.1].tensorboard.iterdir()) == sorted([HPARAMS_FILE, tb_file.name])
    status_code = {
        "done": api_pb2.STATUS_SUCCESS,
        "diverged": api_pb2.STATUS_FAILURE,
        "failed": api_pb2.STATUS_FAILURE,
        "running": api_pb2.STATUS_RUNNING,
        "pending": api_pb2.STATUS_UNKNOWN,
    }
    experiments = set()
    for run in list_runs(sweep_dir):
        assert [p.name for p in run.tensorboard.iterdir() if "hparams" in p.name] == [HPARAMS_FILE]
        hparams, status, metrics, experiment = read_tb(run.tensorboard)
        swept = run.read_meta()["swept"]
        expected = dict(swept) if "optim.lr" in swept else {**swept, "optim.lr": 0.1}  # base.yaml's lr
        assert hparams == expected, run.id
        assert status == status_code[run.status()], run.id
        m = run.read_metrics("train") or {}
        shown = {k: f32(m[k]) for k in METRICS if m.get(k) is not None} if run.status() in ("done", "diverged") else {}
        assert metrics == shown, run.id
        experiments.add(experiment.SerializeToString())
    assert len(experiments) == 1  # every run carries the same experiment
    assert [h.name for h in experiment.hparam_infos] == KEYS
    domains = {
        h.name: [getattr(v, v.WhichOneof("kind")) for v in h.domain_discrete.values] for h in experiment.hparam_infos
    }
    assert domains == {"optim.name": ["adam", "adamw", "sgd"], "optim.lr": [0.05, 0.1]}
    assert [h.type for h in experiment.hparam_infos] == [api_pb2.DATA_TYPE_STRING, api_pb2.DATA_TYPE_FLOAT64]
    assert [(m.name.tag, m.display_name) for m in experiment.metric_infos] == [
        (METRIC_TAG.format(m), m) for m in METRICS
    ]

    running = runs["adam", 0.05]  # finishes: its file is replaced, still one, now with metrics
    write_done(running, finished("done"))
    collect(sweep_dir)
    assert [p.name for p in running.tensorboard.iterdir()] == [HPARAMS_FILE]
    hparams, status, metrics, _ = read_tb(running.tensorboard)
    assert status == api_pb2.STATUS_SUCCESS and metrics == {k: f32(finished("done")[k]) for k in METRICS}


@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
def test_hparams_plugin_lists_one_session_per_run(sweep):
    """What the HParams dashboard asks TensorBoard's own plugin for: one row per run, with its values."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import hparams_plugin
    from werkzeug.test import Client

    sweep_dir, runs = sweep
    collect(sweep_dir)
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    ctx = base_plugin.TBContext(
        logdir=str(sweep_dir), multiplexer=mux, data_provider=data_provider.MultiplexerDataProvider(mux, str(sweep_dir))
    )
    apps = hparams_plugin.HParamsPlugin(ctx).get_plugin_apps()
    request = {
        "experimentName": "",
        "startIndex": 0,
        "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [
            {"hparam": "optim.name", "filterDiscrete": ["adam", "adamw", "sgd"]},
            {"hparam": "optim.lr", "filterDiscrete": [0.05, 0.1]},
        ],
    }
    r = Client(apps["/session_groups"]).post("/", json=request)
    assert r.status_code == 200, r.get_data(as_text=True)
    groups = {g["name"]: g for g in json.loads(r.get_data())["sessionGroups"]}
    assert set(groups) == {f"{run.id}/tb" for run in list_runs(sweep_dir)}
    done = groups[f"{runs['sgd', 0.1].id}/tb"]
    assert done["hparams"] == {"optim.name": "sgd", "optim.lr": 0.1}
    assert {v["name"]["tag"]: v["value"] for v in done["metricValues"]} == {
        METRIC_TAG.format(m): f32(finished("done")[m]) for m in METRICS
    }
    assert groups[f"{runs['adam', 0.05].id}/tb"]["sessions"][0]["status"] == "STATUS_RUNNING"


def test_collect_cli_writes_hparams_without_torch(sweep):
    """The login-node command writes the HParams without ever importing torch or torchvision."""
    sweep_dir, _ = sweep
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['pipeline.collect', {str(sweep_dir)!r}]\n"
        "try:\n"
        "    runpy.run_module('pipeline.collect', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('MODULES', ','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'torchao', 'torch_pruning'))))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"tensorboard --logdir {sweep_dir}" in r.stdout
    assert r.stdout.split("MODULES", 1)[1].strip() == ""
    assert all((run.tensorboard / HPARAMS_FILE).is_file() for run in list_runs(sweep_dir))


def test_hparams_of_a_compressing_sweep_carry_the_compression_metrics(tmp_path):
    """One metric list for the whole sweep (the train metrics and the compression figures), each run's
    values where it has them: sparsity, int8 accuracy, sizes and latencies from its records."""
    from pipeline.report.hparams import COMPRESSION_METRICS
    from tests.report_runs import entry, finish, make_sweep, swept, train_record

    sweep_dir, runs = make_sweep(
        tmp_path, "set: {quant.method: int8}\nvariants: [{prune.method: none}, {prune.method: unstructured}]\n"
    )
    for run in runs:
        pruned = swept(run)["prune.method"] == "unstructured"
        prune = {"status": "done", "method": "unstructured", "during": "finetune", "sparsity": 0.7, "test_acc": 0.8}
        finish(
            run,
            train_record(),
            prune=prune if pruned else {"status": "done", "method": "none"},
            quantize={"status": "done", "method": "int8", "test_acc": 0.83},
            measure={
                "status": "done",
                "models": [
                    entry("trained", 0.84, 0.99, 1000, 1_120_000, 3.0),
                    entry("int8", 0.83, 0.99, 1000, 470_000, 2.0),
                ],
            },
        )
    collect(sweep_dir)
    names = [METRIC_TAG.format(m) for m in METRICS + COMPRESSION_METRICS]
    for run in runs:
        _, _, _, experiment = read_tb(run.tensorboard)
        assert [m.name.tag for m in experiment.metric_infos] == names
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run.tensorboard))
        acc.Reload()
        values = {t.split("/", 1)[1]: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}
        assert values["int8_test_acc"] == pytest.approx(0.83) and values["fp32_bytes"] == 1_120_000
        assert values["int8_bytes"] == 470_000 and values["int8_latency_ms"] == pytest.approx(2.0)
        if swept(run)["prune.method"] == "unstructured":
            assert values["sparsity"] == pytest.approx(0.7) and values["pruned_test_acc"] == pytest.approx(0.8)
        else:
            assert "sparsity" not in values and "pruned_test_acc" not in values
