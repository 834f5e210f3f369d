"""bench/gpu_check.py (every CUDA path in one command) kept from rotting by its --cpu-dry-run, and the CUDA-only
branches of the pipeline made to run on the CPU where they can (README "GPUs").

No GPU here: where a test must pretend one is present (``torch.cuda.is_available``), it says so; the code it
then runs is the real CPU code of that branch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.models.files import TRAINED, arch_of, save_model
from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.rundir import RunDir
from tests.conftest import REPO
from tests.report_runs import entry, finish, make_sweep, train_record

SCRIPT = REPO / "bench" / "gpu_check.py"
PATHS = [
    "train-fp32",
    "train-fp16",
    "train-bf16",
    "channels_last+compile",
    "loader",
    "fast-recipe",
    "airbench94",
    "pipeline-fp16",
    "pipeline-int8",
    "ddp",
]


def run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cpu_dry_run_runs_every_path_and_writes_the_figures(tmp_path):
    out = tmp_path / "dry.json"
    r = run_script("--cpu-dry-run", "--json", str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = {ln.split(":", 1)[0].removeprefix("gpu "): ln for ln in r.stdout.splitlines() if ln.startswith("gpu ")}
    for name in PATHS:
        assert name in lines, (name, r.stdout[-3000:])
    assert lines["airbench94"].endswith("[0 s]") and "SKIP (airbench hard-wires CUDA)" in lines["airbench94"]
    assert all(" PASS " in lines[n] for n in PATHS if n != "airbench94"), r.stdout
    # the fallbacks say what happened instead of pretending
    assert "fp16 fell back to fp32 on cpu" in lines["train-fp16"] and "aot_eager" in lines["channels_last+compile"]
    header = r.stdout.splitlines()[0]
    assert header.startswith(f"gpu check: torch {torch.__version__}") and "no GPU (CPU dry run)" in header

    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["environment"]["torch"] == torch.__version__
    assert list(data["paths"]) == PATHS
    figures = data["paths"]
    assert figures["train-fp32"]["figures"]["loss_later_steps"] < figures["train-fp32"]["figures"]["loss_first_steps"]
    assert figures["channels_last+compile"]["figures"]["grad_rel_diff"] < 2e-2
    assert figures["loader"]["figures"]["images"] > 0 and "speed not judged in a dry run" in lines["loader"]
    assert figures["pipeline-int8"]["figures"]["int8_test_acc"] is not None
    assert figures["ddp"]["figures"]["world_size"] == 2 and figures["ddp"]["figures"]["weight_update_rel_gap"] < 0.05
    # the BENCHMARKS.md rows, one per path
    table = r.stdout[r.stdout.index("| path | figure | result |") :]
    assert all(f"| {name} |" in table for name in PATHS)


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (bench/ is not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_check


def test_without_a_gpu_it_says_use_the_dry_run_and_bad_paths_exit_2(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run for real")
    assert gpu_check.main(["--paths", "1"]) == 2
    assert "no CUDA device is visible; use --cpu-dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--cpu-dry-run", "--paths", "1,7"])
    assert e.value.code == 2 and "[7] not among the paths 1-6" in capsys.readouterr().err


def test_a_failing_path_is_one_fail_line_and_the_exit_code_is_1(gpu_check, tmp_path, monkeypatch, capsys):
    """A path that raises is reported as FAIL with its reason, the other paths still run, exit 1."""

    def broken(check, precision):
        raise RuntimeError(f"no kernel for {precision}\nsecond line")

    monkeypatch.setattr(gpu_check, "path_precision", broken)  # a stand-in for a GPU failure
    code = gpu_check.main(["--cpu-dry-run", "--paths", "1,3", "--json", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert code == 1
    assert "gpu train-fp16: - FAIL (RuntimeError: no kernel for fp16)" in out
    assert "gpu loader: DeviceLoader" in out and "FAILED: train-fp32, train-fp16, train-bf16" in out
    saved = json.loads((tmp_path / "g.json").read_text())["paths"]
    assert saved["train-bf16"]["status"] == "FAIL" and "Traceback" in saved["train-bf16"]["figures"]["traceback"]
    assert saved["loader"]["status"] == "PASS", saved["loader"]


# --------------------------------------------------------------------------------------------------
# CUDA-only branches, run on the CPU
# --------------------------------------------------------------------------------------------------


def test_cuda_settings_without_a_gpu_stop_with_a_clear_error(tmp_path):
    """train.device=cuda on a machine without CUDA names CUDA_VISIBLE_DEVICES; a CUDA measurement refuses."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from pipeline.compress.measure import Artifact, measure_artifacts
    from pipeline.stages.setup import resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="train.device=cuda but no CUDA device is visible .CUDA_VISIBLE_DEVICES="):
        resolve_device("cuda")
    path = tmp_path / "m.pt"
    save_model(path, build_model("resnet20", 10), {"name": "resnet20", "num_classes": 10, "shortcut": "A"})
    art = Artifact.from_model_file("trained-cuda", path, device="cuda")
    with pytest.raises(ValueError, match="trained-cuda: device cuda but CUDA is not available"):
        measure_artifacts([art], [(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))], threads=1)


def test_fp16_quantize_stage_evaluates_the_half_model_with_half_inputs(tmp_path, synthetic_root, monkeypatch):
    """quant.method=fp16 evaluates the half model only when CUDA is available. The loaders give fp32
    batches, which half weights refuse ("Input type ... and weight type ... should be the same") unless
    the inputs are cast. Pretending CUDA is available (no GPU here) runs that branch on the CPU."""
    from pipeline.stages.quantize import quantize_stage
    from pipeline.stages.loop import evaluate
    from pipeline.stages.setup import make_loaders

    cfg = load_config(
        [REPO / "configs" / "base.yaml"],
        [f"data.root={synthetic_root}", "data.name=synthetic", "data.val_size=100", "model.name=resnet20"]
        + ["train.device=cpu", "quant.method=fp16", "train.precision=fp32"],
    )
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    save_model(run.models / TRAINED, model, arch_of(cfg, 10))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    metrics = quantize_stage(run, cfg)
    assert metrics["status"] == "done" and metrics["device"] == "cpu" and (run.models / "fp16.pt").is_file()
    fp32 = evaluate(model, make_loaders(cfg, torch.device("cpu"))[3])
    assert metrics["test_acc"] == pytest.approx(fp32["acc"], abs=0.02)  # fp16 rounding moves a few images
    assert metrics["test_loss"] == pytest.approx(fp32["loss"], rel=0.02)


@pytest.mark.slow
def test_a_compiled_fp16_model_file_compiles_in_its_own_dtype(tmp_path):
    """measure.compile on a GPU compiles the fp16 model too (the fp16-cuda row): its warm-up input must be
    fp16, or the compile fails and the model is measured eagerly. The same code on the CPU."""
    from pipeline.compress.measure import load_from_spec

    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    path = tmp_path / "fp16.pt"
    save_model(path, model.half(), {"name": "resnet20", "num_classes": 10, "shortcut": "A", "norm": "batch"})
    fn = load_from_spec({"kind": "state_dict", "path": str(path), "compile": True}, channels_last=True)
    info = fn.compile_info  # type: ignore[attr-defined]
    assert info["compiled"] is True, info["fallback_reason"]
    x = torch.randn(4, 3, 32, 32).half().contiguous(memory_format=torch.channels_last)
    assert fn(x).dtype == torch.float16


def test_collect_shows_a_gpu_only_fp16_model_with_its_cuda_time(tmp_path):
    """In a GPU job the fp16 model is measured only on the GPU (an 'fp16-cuda' entry with no CPU twin);
    the models table must still show it, with its CUDA time, and no CPU latency."""
    from pipeline.collect import Options, collect

    sweep_dir, (run,) = make_sweep(tmp_path, "set: {quant.method: fp16}\n")
    base = entry("trained", 0.80, 0.99, 270_000, 1_100_000, 4.0)
    base_cuda = {**base, "name": "trained-cuda", "device": "cuda", "self_cuda_ms_per_batch": 2.0}
    half = {**entry("fp16-cuda", 0.79, 0.99, 270_000, 550_000, 0.5), "device": "cuda"}
    half.update(self_cuda_ms_per_batch=1.25, self_cpu_ms_per_batch=3.0, dtype="float16")
    finish(
        run,
        train_record(test_acc=0.80, device="cuda:0"),
        quantize={"status": "done", "method": "fp16", "test_acc": 0.79, "device": "cuda:0"},
        measure={"status": "done", "models": [base, base_cuda, half]},
    )
    md, _ = collect(sweep_dir, Options(plots=False))
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in md.split("## Models")[1].splitlines() if ln.startswith("| ")}
    assert "fp16" in rows, md
    cells = [c.strip() for c in rows["fp16"].strip("|").split(" | ")]
    header = [c.strip() for c in rows["model"].strip("|").split(" | ")]
    fp16 = dict(zip(header, cells))
    assert fp16["CUDA ms/batch"] == "1.25" and fp16["top-1 error"].startswith("21.00%")
    assert fp16["ms/img"] == "" and fp16["CPU ms/batch"] == "" and fp16["smaller"] == "×2.0"


def test_the_device_wrapper_runs_the_check_and_writes_to_out(tmp_path):
    """bench/gpu_check.sh (what the lent GPU machine runs): without wheels in .whl/ it uses this Python's
    packages, says so, and leaves the figures in $OUT/gpu.json."""
    if any((REPO / ".whl").glob("*.whl")):
        pytest.skip("wheels in .whl/ would be installed into GPU_SITE")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_SITE": str(tmp_path / "site")}
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--paths", "3"],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no wheels in .whl/ (make gpu-wheels)" in r.stderr and "gpu loader: DeviceLoader" in r.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["paths"]["loader"]["status"] == "PASS"
