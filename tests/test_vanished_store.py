"""``<out>/.shared`` deleted under the job that trains a shared training (real job, tiny data): the job
stops with one line, writes nothing back into the store, and status and collect show its run failed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.rundir import list_runs, read_json
from tests.conftest import REPO, run_cli

SWEEP = """\
name: gone
base: [{base}]
set:
  data.name: synthetic
  data.root: {root}
  data.val_size: 50
  data.train_size: 64
  train.epochs: 400
  train.device: cpu
  train.batch_size: 32
  train.threads: 1
  output.log_every: 1000
  model.name: resnet20
  measure.enabled: false
"""


@pytest.mark.slow
def test_shared_store_deleted_under_its_training_stops_the_job_and_shows_the_run_failed(tmp_path, synthetic_root):
    spec = tmp_path / "gone.yaml"
    spec.write_text(SWEEP.format(base=REPO / "configs/base.yaml", root=synthetic_root))
    out = tmp_path / "runs"
    # the debug executor trains inside the sweep process: its output is the job's
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sweep", str(spec), "--cluster", "debug", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_WATCH_S": "0.5", "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any((read_json(p) or {}).get("epoch", 0) >= 2 for p in out.glob(".shared/train/*/progress.json")):
            assert job.poll() is None and time.monotonic() < deadline, "the shared training did not start"
            time.sleep(0.1)
        shutil.rmtree(out / ".shared")
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    (run,) = list_runs(out / "gone")
    assert not (out / ".shared").exists()  # nothing written back: no failure record, no new folders
    said = f"shared store {out / '.shared' / 'train'}"
    assert said in stderr and "was deleted or replaced while this job was running" in stderr, stderr
    assert "Traceback" not in stdout + stderr and "FileNotFoundError" not in stdout + stderr, stdout + stderr
    assert "Traceback" not in run.log.read_text()
    ending = read_json(run.path / "ending.json")
    assert ending["state"] == "failed" and said in ending["reason"], ending

    s = run_cli("pipeline.status", str(out / "gone"), cwd=tmp_path, env={"COLUMNS": "400"})
    assert s.returncode == 0 and "1 runs: 0 pending, 0 running, 0 done, 1 failed" in s.stdout, s.stdout + s.stderr
    assert "failed (shared store" in s.stdout and "blocked" not in s.stdout, s.stdout
    c = run_cli("pipeline.collect", str(out / "gone"), "--no-plots", "--format", "markdown", cwd=tmp_path)
    line = next(ln for ln in c.stdout.splitlines() if ln.startswith(f"- `{run.id}`"))
    assert c.returncode == 0 and f"**failed**: {said}" in line and "blocked" not in line, c.stdout
    assert not (out / ".shared").exists() and run.config.is_file()  # the run folder itself is intact


def test_a_background_writer_whose_folder_was_deleted_says_one_line_not_a_traceback(tmp_path, capfd):
    """TensorBoard's writer thread raises FileNotFoundError when the store is deleted under it, and re-raises
    it in its own thread after handing it to the stage: which of the two prints first is a race, so the
    thread's report must be one line whatever the order (CI once showed its traceback)."""
    import threading

    from pipeline.stages.logs import quiet_disk_errors

    gone = tmp_path / "tb" / "events.out.tfevents.1"

    def write() -> None:
        open(gone, "ab").close()

    previous = threading.excepthook
    threading.excepthook = quiet_disk_errors
    try:
        thread = threading.Thread(target=write, name="tb-writer")
        thread.start()
        thread.join()
    finally:
        threading.excepthook = previous
    err = capfd.readouterr().err
    assert err == f"error: background writer tb-writer stopped: {gone} is gone\n", err
