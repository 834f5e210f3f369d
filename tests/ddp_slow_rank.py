"""One rank of a two-process gloo job that takes a run folder through its stages, rank 1 slow to start
each stage (it looks for the stage's record a second late, as a loaded node makes it).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.ddp_slow_rank RUN_DIR

Used by tests/test_train.py: the slow rank must run every stage the fast one runs (a record rank 0 wrote
meanwhile does not make it skip one and leave rank 0 alone in its last barrier). Exits 0 when the run
ends done on this rank.
"""

from __future__ import annotations

import os
import sys
import time

from pipeline.stages import runner


def main() -> int:
    if os.environ["RANK"] != "0":
        looked_up = runner._earlier_record

        def late(job, target, stage):
            time.sleep(1.0)  # rank 0 meanwhile ends the stage (a skipped one takes no time)
            return looked_up(job, target, stage)

        runner._earlier_record = late
    return 0 if runner.execute(sys.argv[1]) == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
