"""Sweep files: expansion (grid, zip, variants, overrides, stable ids), every sweep-file error (exit 2,
file and key named, nothing written) and --dry-run writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.submit.expand import expand_sweep, merge_notes, read_sweep
from tests.conftest import run_cli, tree_snapshot, write


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder laid out like the repo: configs/base.yaml and sweeps/."""
    write(tmp_path / "configs/base.yaml", "model: {name: resnet20}\ntrain: {epochs: 2}\n")
    return tmp_path


FULL = """
name: full
base: [configs/base.yaml]
set: {train.batch_size: 32}
grid:
  optim.name: [sgd, nesterov, adam]
  optim.weight_decay: [1.0e-4, 5.0e-4]
zip:
  optim.lr: [0.1, 0.01]
  train.seed: [1, 2]
variants:
  - {model.name: resnet20}
  - {model.name: resnet44, train.epochs: 3}
"""


def test_grid_zip_variants_sizes_and_values(project):
    spec = read_sweep(write(project / "sweeps/full.yaml", FULL))
    runs = expand_sweep(spec, cwd=project)
    assert len(runs) == 2 * 3 * 2 * 2
    assert len({r.id for r in runs}) == len(runs)
    for r in runs:
        assert r.cfg.train.batch_size == 32  # set
        assert (r.cfg.optim.lr, r.cfg.train.seed) in [(0.1, 1), (0.01, 2)]  # zip goes together
        assert r.cfg.train.epochs == (3 if r.cfg.model.name == "resnet44" else 2)  # variant over base
        assert set(r.swept) == {
            "model.name",
            "train.epochs",
            "optim.name",
            "optim.weight_decay",
            "optim.lr",
            "train.seed",
        } - ({"train.epochs"} if r.cfg.model.name == "resnet20" else set())
    names = [(r.cfg.model.name, r.cfg.optim.name) for r in runs]
    assert names.count(("resnet44", "adam")) == 4


def test_ids_are_stable_and_overrides_apply_to_every_run(project):
    path = write(project / "sweeps/full.yaml", FULL)
    first = [r.id for r in expand_sweep(read_sweep(path), cwd=project)]
    assert first == [r.id for r in expand_sweep(read_sweep(path), cwd=project)]
    over = expand_sweep(read_sweep(path), {"train.epochs": 5}, cwd=project)
    assert all(r.cfg.train.epochs == 5 for r in over)
    assert not set(first) & {r.id for r in over}
    # an override of a swept key wins, and runs it makes identical are kept once
    same = expand_sweep(read_sweep(path), {"optim.name": "sgd"}, cwd=project)
    assert len(same) == 2 * 2 * 2 and all(r.cfg.optim.name == "sgd" for r in same)


def test_grid_points_that_give_one_run_are_named_with_the_reason(project):
    """The trial's case: prune.method [none, none] x measure.latency_repeats [3, 5] gave "1 runs" and
    never measured 5. Measure settings are part of the run id now; the repeated value is said to merge."""
    text = "name: m\nbase: [configs/base.yaml]\ngrid: {prune.method: [none, none], measure.latency_repeats: [3, 5]}\n"
    runs = expand_sweep(read_sweep(write(project / "sweeps/m.yaml", text)), cwd=project)
    assert sorted(r.cfg.measure.latency_repeats for r in runs) == [3, 5]
    notes = merge_notes(runs)
    assert len(notes) == 2 and all("the same settings" in n for n in notes)
    assert "{prune.method: none, measure.latency_repeats: 5} is the same run as" in notes[1]


def test_a_setting_that_does_nothing_merges_with_its_reason(project):
    text = (
        "name: m\nbase: [configs/base.yaml]\n"
        "grid: {prune.method: [none, unstructured], prune.sparsity: [0.5, 0.7], slurm.time_min: [10, 20]}\n"
    )
    runs = expand_sweep(read_sweep(write(project / "sweeps/m.yaml", text)), cwd=project)
    assert len(runs) == 3  # none once (sparsity does nothing there), unstructured at 0.5 and 0.7
    (unpruned,) = [r for r in runs if r.cfg.prune.method == "none"]
    assert len(unpruned.merged) == 3
    notes = merge_notes(runs)
    assert len(notes) == 5
    assert sum("prune.sparsity does nothing with prune.method=none" in n for n in notes) == 2
    assert sum("slurm.time_min is not part of the run id" in n and "slurm.time_min=10" in n for n in notes) == 4
    assert len(merge_notes(runs * 3)) == 11 and "--all" in merge_notes(runs * 3)[-1]  # long lists are cut


def test_dry_run_prints_each_merge(project):
    text = "name: m\nbase: [configs/base.yaml]\ngrid: {prune.method: [none], prune.sparsity: [0.5, 0.7]}\n"
    path = write(project / "sweeps/m.yaml", text)
    r = run_cli(
        "pipeline.sweep", str(path), "--dry-run", "--cluster", "local", "--out", str(project / "runs"), cwd=project
    )
    assert r.returncode == 0, r.stderr
    assert "note: {prune.method: none, prune.sparsity: 0.7} is the same run as" in r.stdout
    assert "prune.sparsity does nothing with prune.method=none; it runs once" in r.stdout and "1 runs" in r.stdout


@pytest.mark.parametrize("dry", [True, False])
def test_cuda_without_a_gpu_in_the_slurm_settings_exits_2_before_writing(project, dry):
    path = write(project / "sweeps/g.yaml", "name: g\nbase: [configs/base.yaml]\nset: {train.device: cuda}\n")
    args = ["--cluster", "slurm", "--out", str(project / "runs")] + (["--dry-run"] if dry else [])
    before = tree_snapshot(project)
    r = run_cli("pipeline.sweep", str(path), *args, cwd=project)
    assert r.returncode == (0 if dry else 2) and "Traceback" not in r.stderr, r.stdout + r.stderr
    err = " ".join((r.stdout if dry else r.stderr).split())  # a dry run shows the plan, with a warning
    assert ("warning:" in err and "a submission would stop here" in err) if dry else "error:" in err
    assert f"{path}: train.device: 'cuda' needs a GPU" in err and "slurm.gpus_per_node is 0" in err
    assert "set slurm.gpus_per_node" in err and "train.device=auto" in err
    assert tree_snapshot(project) == before and not (project / "runs").exists()
    ok = run_cli("pipeline.sweep", str(path), "slurm.gpus_per_node=1", "--cluster", "slurm", "--dry-run", cwd=project)
    assert ok.returncode == 0, ok.stderr


def test_cuda_in_a_cluster_profile_without_gpus_names_the_profile(project, repo):
    text = f"name: g\nbase: [configs/base.yaml]\ncluster: {repo / 'configs/cluster/v100.yaml'}\n"
    path = write(project / "sweeps/g.yaml", text)
    r = run_cli("pipeline.sweep", str(path), "slurm.gpus_per_node=0", "--cluster", "slurm", "--dry-run", cwd=project)
    assert "in the cluster profile" in r.stdout and "v100.yaml" in r.stdout and "warning:" in r.stdout, r.stdout


def test_cuda_on_the_local_executor_without_a_visible_gpu_exits_2(project):
    path = write(project / "sweeps/g.yaml", "name: g\nbase: [configs/base.yaml]\nset: {train.device: cuda}\n")
    for cluster in ("local", "debug"):
        r = run_cli(
            "pipeline.sweep",
            str(path),
            "--cluster",
            cluster,
            "--out",
            str(project / "runs"),
            cwd=project,
            env={"CUDA_VISIBLE_DEVICES": ""},  # no GPU for this machine's jobs, whatever the machine has
        )
        assert r.returncode == 2, r.stdout + r.stderr
        assert "train.device: 'cuda' needs a GPU" in r.stderr and "no GPU is visible" in r.stderr
        assert not (project / "runs").exists()


def test_relative_data_root_is_stored_absolute(project):
    path = write(project / "sweeps/s.yaml", "name: s\nbase: [configs/base.yaml]\nset: {data.root: mydata}\n")
    (run,) = expand_sweep(read_sweep(path), cwd=project)
    assert run.cfg.data.root == str((project / "mydata").resolve())


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("name: x\nbase: [configs/base.yaml]\ngird: {optim.lr: [1]}\n", "gird", "Did you mean 'grid'"),
        ("name: x\nbase: [configs/base.yaml]\ngrid: {optim.lr: []}\n", "grid.optim.lr", "non-empty list"),
        ("name: x\nbase: [configs/base.yaml]\nzip: {optim.lr: [0.1, 0.2], train.seed: [1]}\n", "zip", "equal lengths"),
        ("name: x\nbase: [configs/nope.yaml]\n", "base", "'configs/nope.yaml' not found"),
        ("name: ../evil\nbase: [configs/base.yaml]\n", "name", "folder name"),
        ("name: 'a b'\nbase: [configs/base.yaml]\n", "name", "folder name"),
        ("name: x\nbase: [configs/base.yaml]\ngrid: {optim.lrr: [0.1]}\n", "optim.lrr", "Did you mean 'optim.lr'"),
        ("name: x\nbase: [configs/base.yaml]\nvariants: [{}]\n", "variants", "non-empty mappings"),
    ],
)
def test_sweep_file_errors(project, text, key, fragment):
    path = write(project / "sweeps/bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        read_sweep(path)
    assert e.value.key == key and fragment in str(e.value) and str(path) in str(e.value)


def test_bad_value_in_grid_names_the_sweep_file(project):
    path = write(project / "sweeps/bad.yaml", "name: x\nbase: [configs/base.yaml]\ngrid: {optim.name: [sgd, adamm]}\n")
    with pytest.raises(ConfigError) as e:
        expand_sweep(read_sweep(path), cwd=project)
    assert e.value.key == "optim.name" and str(path) in e.value.source and "Did you mean 'adam'" in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "name: x\nbase: [configs/base.yaml]\ngrid: {optim.lr: [0.1,\n",  # YAML syntax error
        "name: x\nbase: [configs/base.yaml]\nzip: {optim.lr: [0.1, 0.2], train.seed: [1]}\n",
        "name: x\nbase: [configs/base.yaml]\ngrid: {train.batch_size: [0]}\n",
    ],
)
def test_cli_errors_exit_2_and_write_nothing(project, text):
    path = write(project / "sweeps/bad.yaml", text)
    before = tree_snapshot(project)
    r = run_cli("pipeline.sweep", str(path), "--out", str(project / "runs"), "--cluster", "local", cwd=project)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "bad.yaml" in r.stderr and "error:" in r.stderr
    assert tree_snapshot(project) == before


def test_cli_bad_choice_flags_exit_2(project):
    path = write(project / "sweeps/ok.yaml", "name: ok\nbase: [configs/base.yaml]\n")
    for flag, value in (("--cluster", "pbs"), ("--rerun", "some")):
        r = run_cli("pipeline.sweep", str(path), flag, value, cwd=project)
        assert r.returncode == 2 and "Allowed values" in r.stderr, r.stderr
    assert not (project / "runs").exists()


def test_dry_run_lists_runs_and_writes_nothing(project):
    path = write(project / "sweeps/full.yaml", FULL)
    before = tree_snapshot(project)
    r = run_cli(
        "pipeline.sweep", str(path), "--dry-run", "--cluster", "local", "--out", str(project / "runs"), cwd=project
    )
    assert r.returncode == 0, r.stderr
    ids = [run.id for run in expand_sweep(read_sweep(path), cwd=project)]
    assert all(i in r.stdout for i in ids) and "24 runs" in r.stdout
    assert tree_snapshot(project) == before and not (project / "runs").exists()


# Every sweep file the repository ships, with the number of runs it expands to. A new sweep file, or a
# changed grid, is added here on purpose.
REPO_SWEEPS = {
    "batch_workers.yaml": 9,
    "budget.yaml": 12,
    "compression.yaml": 3,
    "fast.yaml": 3,
    "mixed_precision.yaml": 8,
    "optimizers.yaml": 5,
    "quickstart.yaml": 3,
    "search.yaml": 1,  # one study: its trials are sampled, not expanded
    "sparsity.yaml": 16,
}


def test_repo_sweep_files_expand(repo):
    found = {path.name: path for path in (repo / "sweeps").glob("*.yaml")}
    assert sorted(found) == sorted(REPO_SWEEPS)
    for name, expected in REPO_SWEEPS.items():
        runs = expand_sweep(read_sweep(found[name]), cwd=repo)
        assert len(runs) == expected, name
        assert len({r.id for r in runs}) == expected, f"{name}: two runs with one id"


def test_auto_cluster_falls_back_to_local_without_a_slurm_controller(monkeypatch, tmp_path):
    from pipeline.jobs import slurm
    from pipeline.submit import launch

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, no srun: a laptop
    assert not slurm.controller_answers()
    assert launch.resolve_cluster("auto") == "local"
    assert launch.resolve_cluster("slurm") == "slurm"
