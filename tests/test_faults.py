"""Every fault this project promises to survive, what happens, what the user does, and the tests that show it.

FAULTS is the list; the README's "What survives what" table is printed from it
(``python -m tests.test_faults``) and a test checks that the README holds exactly that table, so the table
cannot claim a row no test backs. The tests themselves live beside the code they exercise (named in each
row) and inject each fault for real: kill -9, a full tmpfs, scancel, a garbled file, a crafted pickle, a
second submitter, a recycled PID. This file also holds the few fault tests that have no better home.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
BEGIN, END = "<!-- faults table: python -m tests.test_faults -->", "<!-- end of faults table -->"


@dataclass(frozen=True)
class Fault:
    fault: str
    happens: str
    you_do: str
    tests: tuple[str, ...]  # "file.py::test_name"


FAULTS: tuple[Fault, ...] = (
    # ---- jobs killed, preempted, out of time
    Fault(
        "job killed (`kill -9`, node crash) mid-epoch",
        "last checkpoint (every epoch, and at the step a signal arrives) is whole",
        "submit the sweep again: it resumes bitwise (CPU)",
        (
            "test_end_to_end.py::test_resume_after_kill_9_matches_unbroken_run",
            "test_train.py::test_signal_mid_epoch_saves_step_checkpoint_and_resume_matches_unbroken",
            "test_stages.py::test_kill_9_during_pruning_finetune_resumes_bitwise",
        ),
    ),
    Fault(
        "Slurm time limit, preemption, `scontrol requeue`",
        "SIGUSR2 before the limit: checkpoint at the next step, requeued up to `slurm.max_requeues`",
        "nothing; past the limit it shows `time-limit`",
        (
            "test_slurm_requeue.py::test_time_limit_signal_requeue_and_scontrol_requeue_end_like_an_unbroken_run",
            "test_slurm_requeue.py::test_plain_sbatch_script_checkpoints_and_requeues_on_sigusr2",
            "test_submit_faults.py::test_scancel_shows_cancelled_and_a_time_limit_without_requeues_shows_time_limit",
        ),
    ),
    Fault(
        "`scancel`, out of memory, node failure",
        "status and collect say `cancelled (by <user>)`, `out-of-memory`, `node-failure` (sacct, else the run folder)",
        "raise `slurm.mem_gb` if OOM; submit again to resume",
        (
            "test_submit_faults.py::test_scancel_shows_cancelled_and_a_time_limit_without_requeues_shows_time_limit",
            "test_submit_faults.py::test_classify_names_each_scheduler_ending",
            "test_submit_faults.py::test_classify_from_the_run_folder_when_the_scheduler_cannot_tell",
        ),
    ),
    # ---- submission
    Fault(
        "two `pipeline.sweep` of one sweep at once; a submitter killed",
        "a link-based lock (NFS-safe): the second exits 2 naming host, pid, since; a dead holder's lock is taken over",
        "wait, or run it again",
        (
            "test_submit_faults.py::test_live_lock_refuses_a_second_submitter_and_a_killed_holders_lock_is_taken_over",
            "test_submit_faults.py::test_lock_of_a_live_process_with_a_recycled_pid_or_another_host",
            "test_submit_faults.py::test_two_submitters_at_once_submit_each_run_once",
        ),
    ),
    Fault(
        "submitter killed between arrays",
        "the manifest names each array as soon as sbatch answers; an unrecorded one is found by its token",
        "run it again: only the rest is submitted",
        (
            "test_submit_faults.py::test_submitter_killed_between_arrays_leaves_an_exact_manifest_and_the_rerun_submits_the_rest",
            "test_submit_faults.py::test_an_array_queued_but_not_recorded_is_found_by_its_token",
        ),
    ),
    Fault(
        "sbatch refuses one array; the controller does not answer",
        "the others are submitted, the refused runs and sbatch's words listed, exit 2; controller down: exit 3, nothing written",
        "fix it and run again: only what was refused is submitted",
        (
            "test_submit_faults.py::test_sbatch_refusing_one_array_submits_the_others_once_and_the_fixed_rerun_only_it",
            "test_submit_faults.py::test_controller_not_answering_exits_3_before_writing_and_auto_does_not_fall_back_to_local",
        ),
    ),
    # ---- local jobs and run folders
    Fault(
        "`kill -9` of a local job id; its PID reused or a zombie; a crash just before a rerun",
        "the training stops with a checkpoint; identity is PID + start time, so a reused PID is never signalled",
        "submit again: resumes, each epoch once; `--rerun failed` works at once",
        (
            "test_localjobs.py::test_killing_the_shown_job_id_stops_the_whole_job_and_a_rerun_trains_once",
            "test_localjobs.py::test_a_reused_pid_is_not_the_job_and_cancel_leaves_that_process_alone",
            "test_localjobs.py::test_zombie_counts_as_dead",
            "test_localjobs.py::test_a_rerun_right_after_a_crash_is_not_skip_active",
            "test_localjobs.py::test_a_job_that_recorded_its_end_does_not_hold_its_run_and_a_resubmission_waits_for_it_to_exit",
        ),
    ),
    Fault(
        "logout or Ctrl-C after a local sweep; a sweep run under `nohup` or in a script's background",
        "local jobs run in their own session, not attached to the terminal, with SIGINT at its default",
        "nothing; `pipeline.status DIR --cancel` stops them",
        ("test_localjobs.py::test_a_local_sweep_returns_at_once_and_its_jobs_leave_the_terminal",),
    ),
    Fault(
        "two jobs on one run folder",
        "the second refuses, naming the owner (`owner.json`); a dead owner is taken over",
        "wait for the first, or cancel it",
        (
            "test_localjobs.py::test_a_second_job_on_a_busy_run_folder_refuses_and_writes_nothing",
            "test_localjobs.py::test_a_live_owner_refuses_a_second_job_and_a_dead_one_is_taken_over",
            "test_localjobs.py::test_an_unreadable_owner_record_is_taken_over",
        ),
    ),
    Fault(
        "run folder deleted under a running job; `<out>/.shared` deleted under the job training it",
        "the job stops within seconds, says so in one line, recreates nothing; a deleted store shows its run failed",
        "submit again to start that run (or training) afresh",
        (
            "test_localjobs.py::test_a_run_folder_deleted_under_a_running_job_stays_deleted",
            "test_vanished_store.py::test_shared_store_deleted_under_its_training_stops_the_job_and_shows_the_run_failed",
        ),
    ),
    Fault(
        "runs started without the launcher: `sbatch sbatch/array.sh`, `python -m pipeline.run` by hand",
        "status and collect take the job from `owner.json` (running) and `ending.json` (sacct: `cancelled (by <user>)`)"
        ", not only from the manifest",
        "nothing",
        ("test_plain_jobs.py::test_plain_array_tasks_and_a_hand_run_are_shown_running_then_cancelled",),
    ),
    # ---- training
    Fault(
        "loss turns NaN or infinite",
        "stopped within `train.nan_check_steps` steps as `diverged` (epoch, step, last finite loss), every rank"
        " at the same step; other runs go on",
        "lower the learning rate",
        (
            "test_training_faults.py::test_huge_lr_stops_training_within_k_steps_and_the_record_and_status_say_where",
            "test_training_faults.py::test_pruning_finetune_and_qat_that_diverge_stop_early_with_the_same_record",
            "test_training_faults.py::test_a_nan_on_one_rank_stops_both_ranks_at_the_same_step",
            "test_training_faults.py::test_a_diverging_two_rank_job_ends_on_both_ranks_with_rank_0_s_record",
            "test_end_to_end.py::test_diverging_run_stops_cleanly_beside_a_healthy_one",
        ),
    ),
    Fault(
        "disk full during training",
        "the previous checkpoint is intact; the run fails naming the file and `No space left on device`",
        "free space, submit again: resumes bitwise",
        (
            "test_training_faults.py::test_full_disk_during_training_keeps_the_checkpoint_says_why_and_resumes_bitwise",
            "test_training_faults.py::test_a_sweep_submitted_again_resumes_a_run_that_failed_writing",
            "test_training_faults.py::test_a_disk_already_full_stops_the_job_at_once_naming_the_run_folder",
            "test_hostile_input.py::test_disk_full_while_writing_run_folders_is_reported_with_the_path",
        ),
    ),
    Fault(
        "disk full during a training several runs share",
        "its owner fails writing, checkpoint intact; the runs sharing it are not blocked and do not retry it on the full disk",
        "free space, submit the sweep again (no `--rerun`): the one training resumes, every run finishes",
        ("test_share_sweep.py::test_a_shared_training_that_failed_writing_resumes_when_the_sweep_is_submitted_again",),
    ),
    Fault(
        "quota exceeded during training (a real btrfs quota)",
        "the previous checkpoint is intact; the run fails naming the folder and `Disk quota exceeded`",
        "raise or free the quota, submit again: resumes",
        ("test_training_faults.py::test_quota_exceeded_during_training_says_so_and_resumes_once_raised",),
    ),
    Fault(
        "file system turns read-only under a training (a real ext4 error)",
        "the job stops saying `Read-only file system` in one line per writer, no traceback; the checkpoint is intact",
        "repair the mount, submit again: resumes from the last checkpoint",
        ("test_training_faults.py::test_a_filesystem_gone_read_only_under_a_training_stops_it_and_a_rerun_resumes",),
    ),
    Fault(
        "latest checkpoint truncated or garbled",
        "moved to `.corrupt`; resumes from `<name>.prev.pt` with a warning and a status note; never silently from scratch",
        "nothing (one epoch lost)",
        (
            "test_training_faults.py::test_corrupt_latest_checkpoint_resumes_from_the_previous_one_in_training_and_pruning",
            "test_training_faults.py::test_checkpoint_rotation_keeps_the_previous_one_and_every_kill_point_loads",
            "test_training_faults.py::test_unreadable_latest_and_previous_checkpoint_is_an_error_naming_both",
            "test_training_faults.py::test_corrupt_latest_qat_checkpoint_resumes_from_the_previous_one",
        ),
    ),
    Fault(
        "a model file a finished stage made is truncated, garbled or gone (`trained.pt`, `int8.pt2`, ...)",
        "the stage that needs it fails naming the file and marks the stage that made it failed; runs already "
        "finished stay done; a truncated shared model is never reused",
        "`--rerun failed`: makes the file again (a shared training is moved aside and trained once)",
        (
            "test_unreadable_models.py::test_unreadable_shared_training_is_trained_again_once_by_rerun_failed",
            "test_unreadable_models.py::test_unreadable_int8_program_fails_quantize_and_rerun_failed_makes_it_again",
        ),
    ),
    Fault(
        "a stage fails (prune, quantize, measure)",
        "the training and its metrics are kept; status names the failed stage",
        "fix it, `--rerun failed`: redoes that stage and the ones after",
        (
            "test_stages.py::test_failed_prune_stage_keeps_the_training_and_rerun_failed_redoes_only_it",
            "test_end_to_end.py::test_failed_run_is_reported_skipped_and_rerun_on_request",
        ),
    ),
    Fault(
        "a shared training fails or is killed",
        "its followers show `blocked by <run>`; a killed one resumes once, never trains twice",
        "fix it, `--rerun failed`",
        (
            "test_share_sweep.py::test_failed_training_blocks_its_followers_until_rerun_failed",
            "test_share_sweep.py::test_kill_9_during_a_shared_training_then_resubmit_resumes_it",
            "test_share_sweep.py::test_rerun_all_of_a_follower_keeps_the_shared_training",
        ),
    ),
    Fault(
        "a shared training fails on Slurm",
        "Slurm cancels the followers (`--kill-on-invalid-dep`, reason Dependency); status and collect "
        "show them `blocked by <run>`, not cancelled",
        "fix it, `--rerun failed`: it trains once, then they run",
        (
            "test_share_slurm.py::test_failed_training_blocks_followers_until_rerun_failed",
            "test_share_slurm.py::test_followers_wait_for_their_owners_task_and_each_training_runs_once",
        ),
    ),
    Fault(
        "a shared pruning fails",
        "the runs waiting for it show `blocked by <run>`; the shared training is kept",
        "fix it, `--rerun failed`: it prunes again (not trains); `share.prune=false` prunes one run alone",
        (
            "test_share_sweep.py::test_one_training_one_pruning_two_quantizations_identical_to_unshared_runs_and_blocked",
            "test_share_sweep.py::test_rerun_all_with_share_prune_false_prunes_in_the_run_folder",
        ),
    ),
    # ---- hostile files
    Fault(
        "a crafted checkpoint, model file, `.pt2` or CIFAR batch",
        "refused without running code (`weights_only=True`, an allow-list unpickler, a `.pt2` checked entry by "
        "entry before loading), naming the file; an int8 package loads only with the sha256 its stage recorded",
        "use files you trust (a `.so.pt2` package is native code)",
        (
            "test_faults.py::test_crafted_checkpoint_and_model_file_are_refused_without_running_code",
            "test_model_files.py::test_crafted_pt2_is_refused_without_running_code",
            "test_model_files.py::test_anything_but_a_plain_program_is_refused_naming_the_file",
            "test_int8_speed.py::test_quantize_packages_int8_once_and_measure_times_the_package",
            "test_hostile_input.py::test_crafted_batch_is_refused_without_running_code",
            "test_hostile_input.py::test_read_cifar_pickle_refuses_every_other_global",
        ),
    ),
    Fault(
        "a binary, truncated, empty, wrong-type or not UTF-8 (latin-1, UTF-16) file a reader opens: config, meta,"
        " metrics, progress, shared/key/trainer/owner/ending.json, manifest",
        "status and collect (tables, plots, HParams) name the file, leave out what cannot be read and show every"
        " other run",
        "rerun that run",
        (
            "test_bad_files.py::test_a_bad_file_is_named_and_every_other_run_shown",
            "test_bad_files.py::test_a_bad_manifest_is_named_and_every_run_shown",
            "test_collect.py::test_bad_files_in_one_run_do_not_hide_the_sweep",
            "test_report.py::test_corrupt_metrics_and_config_are_named_and_the_rest_is_shown",
        ),
    ),
    Fault(
        "folders with a `config.yaml` that is no run config (a list, a word, binary) and nothing else of a run",
        "status and collect name each as no run, never as a pending run, and write nothing into it",
        "remove them",
        ("test_bad_files.py::test_folders_whose_config_is_no_run_config_are_named_and_left_untouched",),
    ),
    Fault(
        "a bad sweep or config file (binary, duplicate keys, NaN, `???`, huge grid)",
        "exit 2 naming the file, key and allowed values; nothing written",
        "fix the file",
        (
            "test_hostile_input.py::test_binary_or_latin1_file_is_a_config_error",
            "test_hostile_input.py::test_duplicate_top_level_key_in_a_sweep_file",
            "test_hostile_input.py::test_every_float_setting_refuses_non_finite_numbers",
            "test_hostile_input.py::test_missing_marker_is_refused",
            "test_hostile_input.py::test_huge_grid_is_refused_before_expanding",
        ),
    ),
    Fault(
        "`--out` a file, read-only, or with a newline; collect on a read-only folder",
        "exit 2 naming the path; nothing on disk changed",
        "choose another folder",
        (
            "test_hostile_input.py::test_out_that_is_a_file_exits_2_and_keeps_it",
            "test_hostile_input.py::test_out_with_a_newline_exits_2_and_writes_nothing",
            "test_hostile_input.py::test_out_on_a_file_system_that_refuses_writes",
            "test_hostile_input.py::test_collect_on_a_read_only_folder_names_it_and_exits_2",
        ),
    ),
    Fault(
        "a lab mate reads your results; a kill mid-write leaves a temporary",
        "files follow the umask; stale temporaries are cleaned on the next write",
        "nothing",
        (
            "test_hostile_input.py::test_atomic_writes_follow_the_umask",
            "test_hostile_input.py::test_sweep_writing_run_folders_cleans_their_stale_temporaries",
        ),
    ),
    Fault(
        "`sbatch sbatch/min_project.sh` without the environment on PATH",
        "finds `PIPELINE_PYTHON`, the `.venv`, conda; otherwise one line saying what to set",
        "set `PIPELINE_PYTHON` or activate the environment",
        (
            "test_slurm.py::test_min_project_script_finds_the_environment_without_it_on_path",
            "test_slurm.py::test_min_project_script_without_an_environment_says_what_to_set",
        ),
    ),
)


def table() -> str:
    """The README's "What survives what" table, from FAULTS."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| fault | what happens | what you do | tests |", "|---|---|---|---|"]
    for f in FAULTS:
        tests = ", ".join(f"`{file}`" for file in dict.fromkeys(t.split("::")[0] for t in f.tests))
        lines.append(f"| {cell(f.fault)} | {cell(f.happens)} | {cell(f.you_do)} | {tests} |")
    return "\n".join(lines)


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_fault_names_tests_that_exist():
    missing = []
    for f in FAULTS:
        assert f.tests, f.fault
        for t in f.tests:
            file, name = t.split("::")
            if name not in _test_functions(TESTS / file):
                missing.append(t)
    assert not missing, f"FAULTS names tests that do not exist: {missing}"


def test_readme_table_is_the_fault_list():
    text = README.read_text()
    assert BEGIN in text and END in text, f"README.md lacks the markers {BEGIN!r} ... {END!r}"
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == table(), "README's 'What survives what' is out of date: run python -m tests.test_faults"


def test_crafted_checkpoint_and_model_file_are_refused_without_running_code(tmp_path):
    import torch

    from pipeline.models import files as artifacts
    from pipeline.stages.checkpoint import load_checkpoint

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    ckpt = tmp_path / "checkpoints" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "extra": RunsCode()}, ckpt, pickle_protocol=2)
    with pytest.raises(RuntimeError, match=re.escape(str(ckpt))):
        load_checkpoint(ckpt)
    model_file = tmp_path / "models" / "trained.pt"
    model_file.parent.mkdir()
    torch.save({"format": artifacts.FORMAT, "state_dict": RunsCode()}, model_file)
    with pytest.raises(artifacts.UnreadableModel, match=re.escape(str(model_file))):
        artifacts.load_model(model_file)
    assert not marker.exists()
    # the payload is real: plain unpickling runs it
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


if __name__ == "__main__":
    sys.stdout.write(f"{BEGIN}\n{table()}\n{END}\n")
