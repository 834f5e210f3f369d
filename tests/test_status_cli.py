"""The status command line itself: stopping ``--watch`` with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.report_runs import make_sweep


def test_ctrl_c_stops_watch_quietly_with_code_130(tmp_path):
    sweep_dir, _ = make_sweep(tmp_path, "grid: {optim.lr: [0.1]}\n")  # pending: --watch keeps refreshing
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        watch = subprocess.Popen(
            [sys.executable, "-m", "pipeline.status", str(sweep_dir), "--watch", "--interval", "0.2"],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 60
            while out.read_text().count("1 runs: 1 pending") < 2:  # refreshed at least once
                assert watch.poll() is None and time.monotonic() < deadline, out.read_text() + err.read_text()
                time.sleep(0.1)
            watch.send_signal(signal.SIGINT)
            code = watch.wait(timeout=30)
        finally:
            watch.kill()
            watch.wait()
    assert code == 130 and err.read_text() == "", err.read_text()
