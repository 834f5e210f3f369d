"""int8 speed as users get it: the quantize stage compiles the int8 program once into an AOTInductor
package (real compile, real job), measure times that package against fp32 run eagerly in the same job, and
the tables and plots show int8 speed only from a compiled form, compare speed only within a job, and say
when the CPU has no int8 instructions (hand-built records for those)."""

from __future__ import annotations

import json

import pytest

from pipeline.models.files import sha256_of
from pipeline.collect import Options, build
from pipeline.report import plots
from pipeline.report.writers import markdown
from tests.conftest import run_cli
from tests.report_runs import entry, finish, make_sweep, swept, train_record
from tests.test_stages import run_job

# --------------------------------------------------------------------------------------------------
# Tables and plots, from hand-built records
# --------------------------------------------------------------------------------------------------


def _sweep(tmp_path, int8_extra: dict, measure_extra: dict | None = None, slow_structured: float = 1.0):
    """Two runs of one training: unpruned and structured, each with int8; the structured run's job ran on
    a machine ``slow_structured`` times slower (every timing of that job scaled)."""
    body = "set: {prune.sparsity: 0.5, quant.method: int8}\nvariants:\n  - {prune.method: none}\n  - {prune.method: structured}\n"
    tmp_path.mkdir(parents=True, exist_ok=True)
    sweep_dir, runs = make_sweep(tmp_path, body)
    for run in runs:
        method = swept(run)["prune.method"]
        slow = slow_structured if method == "structured" else 1.0
        models = [
            entry("trained", 0.80, 0.99, 270_000, 1_120_000, 4.0 * slow),
            entry("int8", 0.79, 0.99, 269_000, 470_000, 1.0 * slow, **int8_extra),
        ]
        prune = {"status": "done", "method": "none"}
        if method == "structured":
            models.insert(1, entry("pruned", 0.78, 0.99, 135_000, 580_000, 2.0 * slow))
            prune = {"status": "done", "method": "structured", "during": "finetune", "sparsity": 0.5}
            prune.update(sparsity_target=0.5, test_acc=0.78)
        finish(
            run,
            train_record(test_acc=0.80),
            prune=prune,
            quantize={"status": "done", "method": "int8", "test_acc": 0.79},
            measure={"status": "done", "models": models, **(measure_extra or {})},
        )
    return sweep_dir


def _models_block(sweep_dir) -> tuple[dict[str, dict[str, str]], str]:
    rep = build([sweep_dir], Options(table="models"))
    (table,) = rep.models
    text = markdown(table)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    return {r["model"]: r for r in rows}, text


def test_int8_timed_eagerly_shows_no_speed_and_says_why(tmp_path):
    sweep_dir = _sweep(tmp_path, {"runtime": "eager"})
    rows, text = _models_block(sweep_dir)
    assert rows["int8"]["ms/img"] == "" and rows["int8"]["faster"] == ""  # not "×4.0" of a meaningless run
    assert rows["structured 50%"]["faster"] == "×2.0"
    assert "not timed, having no compiled form" in text and "slower than fp32" in text
    runs = build([sweep_dir], Options()).runs[0]
    assert all(row["int8_latency_ms"] is None for row in runs.rows)


def test_int8_from_a_compiled_form_is_compared_with_fp32_eager_of_the_same_job(tmp_path):
    # an older record: no runtime field, compiled by inductor in the job; then the package's
    old = {"runtime": None, "compile": {"compiled": True, "backend": "inductor"}}
    for extra in (old, {"runtime": "aoti"}):
        rows, text = _models_block(_sweep(tmp_path / str(bool(extra["runtime"])), extra))
        assert rows["int8"]["faster"] == "×4.0" and rows["int8"]["ms/img"] == "1.00"
        assert "fp32 run eagerly (as a user runs it)" in text and "both timed in the same job" in text
        assert "no VNNI" not in text  # records without CPU flags say nothing about them


def test_a_cpu_without_int8_instructions_is_named_beside_the_factor(tmp_path):
    flags = {"cpu_flags": {"avx2": True, "avx512f": False, "avx512_vnni": False}, "cpu_int8": False}
    rows, text = _models_block(_sweep(tmp_path, {"runtime": "aoti"}, flags))
    assert rows["int8"]["faster"] == "×4.0 (no VNNI)" and rows["structured 50%"]["faster"] == "×2.0"
    assert "without int8 dot-product instructions" in text and "avx512_vnni" in text
    rows, text = _models_block(_sweep(tmp_path / "vnni", {"runtime": "aoti"}, {**flags, "cpu_int8": True}))
    assert rows["int8"]["faster"] == "×4.0" and "no VNNI" not in text


def test_speed_plot_compares_each_model_with_the_base_of_its_own_job(tmp_path):
    # the structured run's job ran 3x slower: in raw ms its pruned model (6 ms) looks slower than the
    # other job's base (4 ms); against its own job's base (12 ms) it is 2x faster
    sweep_dir = _sweep(tmp_path, {"runtime": "aoti"}, slow_structured=3.0)
    rep = build([sweep_dir], Options())
    raw = {p.label: p.x for p in plots.accuracy_series(rep.records, "latency_b1_ms")}
    assert raw["structured 50%"] == 6.0 and raw["base"] == 4.0
    points = plots.accuracy_series(rep.records, "speed_factor")
    speed = {p.label: p.x for p in points}
    assert speed == {"base": 1.0, "int8": 4.0, "structured 50%": 2.0, "structured 50% + int8": 4.0}
    front = [points[i].label for i in plots.pareto_front(points, "max")]
    # faster is better: the pruned model (2x, 78%) is beaten by both int8 models (4x, 79%)
    assert front == ["base", "int8", "structured 50% + int8"]


# --------------------------------------------------------------------------------------------------
# The real stages: package compiled once, measured from it, refused when it is not the recorded one
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantize_packages_int8_once_and_measure_times_the_package(tmp_path, synthetic_root):
    run = run_job(tmp_path, synthetic_root, "quant.method=int8", "quant.calib_batches=2", "measure.compile=true")
    quant, meas = run.read_metrics("quantize"), run.read_metrics("measure")
    package = quant["package"]
    path = run.models / "int8.so.pt2"
    assert package["file"] == "int8.so.pt2" and package["sha256"] == sha256_of(path)
    assert package["kernels"] == {"qconv": 19, "qlinear": 1}  # oneDNN int8 kernels, not fp32 ones
    # inductor's cache beside the sweep folders (<out>/.cache/inductor, as <out>/.shared), for every job
    assert any((run.path.parent.parent / ".cache" / "inductor").iterdir())
    by_name = {e["name"]: e for e in meas["models"]}
    assert by_name["trained"]["runtime"] == "eager" and by_name["int8"]["runtime"] == "aoti"
    assert by_name["int8"]["loader"]["kind"] == "package" and by_name["int8"]["latency_b1_ms"] > 0
    # the package computes what the int8 program does (it was once fed the wrong memory format: 70% error)
    assert abs(by_name["int8"]["test_top1"] - quant["test_acc"]) <= 0.025  # 5 of 200 images
    assert by_name["int8"]["file_bytes"] == (run.models / "int8.pt2").stat().st_size  # the model file's size
    assert set(meas["cpu_flags"]) >= {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}
    assert isinstance(meas["cpu_int8"], bool)

    # a package that is not the one the quantize stage recorded is never loaded: measure fails naming it
    path.write_bytes(path.read_bytes() + b"\0")
    run.metrics_path("measure").unlink()
    r = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=600)
    assert r.returncode != 0
    log = run.log.read_text()
    assert f"model file {path} cannot be loaded" in log and "sha256" in log, log[-2000:]
    json.dumps(meas)  # measure.json stays plain JSON
