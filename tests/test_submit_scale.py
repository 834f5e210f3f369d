"""Sweeps at scale: a 1,000-run sweep expands to exactly what per-run ``compose()`` gives (configs, ids,
config.yaml text, errors), arrays are split by MaxArraySize, values that reach sbatch are checked, the
dry-run header is right and the login-node path never imports torch. No timed assertions:
``bench/submit.py`` measures the speed."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from pipeline.submit import show as cli
from pipeline.submit import launch
from pipeline.config import (
    COMMAND_LINE,
    ConfigError,
    Layer,
    absolutize_paths,
    compose,
    file_layer,
    from_run_file,
    load_config,
    run_id,
    to_yaml,
)
from pipeline.rundir import list_runs
from pipeline.submit.expand import SweepSpec, expand_sweep, read_sweep
from pipeline.submit.plan import plan, write_run
from tests.conftest import REPO, run_cli, tree_snapshot, write

AXIS = 10
BIG = f"""
name: big
base: [configs/base.yaml]
cluster: configs/cluster/local.yaml
set: {{model.name: resnet20, train.epochs: 2, data.root: mydata}}
grid:
  optim.lr: {[round(0.01 * (i + 1), 3) for i in range(AXIS)]}
  optim.weight_decay: {[i * 1e-5 for i in range(AXIS)]}
  train.seed: {list(range(AXIS))}
"""

# Values that omegaconf converts (int -> float, 'yes'/off -> bool, 123 -> '123'), lists, '~', shell text.
ODD = """
name: odd
base: [configs/base.yaml]
set: {train.batch_size: 32, data.root: ~/cifar}
grid:
  optim.name: [sgd, adam]
  optim.weight_decay: [0, 1, 5.0e-4]
  optim.betas: [[0.9, 0.99], [0, 0.5]]
zip:
  optim.lr: [1, 0.01]
  train.seed: [1, 2]
variants:
  - {model.name: resnet20}
  - {model.name: resnet44, train.epochs: 3, slurm.partition: v100,
     slurm.setup: ["module load x", "echo 'a: b' # c"]}
  - {data.root: rel/data, slurm.mem_gb: 3, slurm.account: "123", train.compile: "yes",
     output.tensorboard: off}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder laid out like the repo, with the repo's own base config and cluster profiles."""
    write(tmp_path / "configs/base.yaml", (REPO / "configs/base.yaml").read_text())
    for p in (REPO / "configs/cluster").glob("*.yaml"):
        write(tmp_path / "configs/cluster" / p.name, p.read_text())
    return tmp_path


def points(spec: SweepSpec) -> list[tuple[int, dict, dict]]:
    """(variant index, grid point, zip point) of every run, in expansion order (no duplicates here)."""
    grid = [dict(zip(spec.grid, vs)) for vs in itertools.product(*spec.grid.values())]
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zips = [{k: v[i] for k, v in spec.zip.items()} for i in range(n_zip)]
    return [(vi, g, z) for vi in range(len(spec.variants or [{}])) for g in grid for z in zips]


def reference(spec: SweepSpec, point: tuple[int, dict, dict], overrides: dict, cwd: Path):
    """The slow path, as expansion worked before: compose() over every layer of one run."""
    layers = [file_layer(b) for b in spec.base]
    if spec.cluster is not None:
        layers.append(file_layer(spec.cluster))
    if spec.set:
        layers.append(Layer(f"{spec.path} (set)", spec.set))
    vi, g, z = point
    extra = [
        Layer(f"{spec.path} (variants[{vi}])", (spec.variants or [{}])[vi]),
        Layer(f"{spec.path} (grid)", g),
        Layer(f"{spec.path} (zip)", z),
    ]
    last = [Layer(COMMAND_LINE, dict(overrides))] if overrides else []
    return absolutize_paths(compose(layers + [x for x in extra if x.values] + last), cwd)


def assert_same_as_reference(spec: SweepSpec, run, point: tuple[int, dict, dict], overrides: dict, cwd: Path) -> None:
    cfg = reference(spec, point, overrides, cwd)
    assert run.config == OmegaConf.to_container(cfg)
    assert list(run.config) == list(OmegaConf.to_container(cfg))  # same key order
    assert run.id == run_id(cfg)
    assert run.yaml == to_yaml(cfg)
    assert OmegaConf.to_container(run.cfg) == OmegaConf.to_container(cfg)  # the lazy DictConfig


def test_1000_runs_expand_like_per_run_compose(project):
    spec = read_sweep(write(project / "sweeps/big.yaml", BIG))
    runs = expand_sweep(spec, cwd=project)
    assert len(runs) == AXIS**3 and len({r.id for r in runs}) == AXIS**3
    assert {(r.swept["optim.lr"], r.swept["optim.weight_decay"], r.swept["train.seed"]) for r in runs} == {
        (a, float(b), c)
        for a in spec.grid["optim.lr"]
        for b in spec.grid["optim.weight_decay"]
        for c in spec.grid["train.seed"]
    }  # YAML reads 5e-05 as a string: omegaconf makes it a float
    pts = points(spec)
    for i in random.Random(0).sample(range(len(runs)), 20):
        assert_same_as_reference(spec, runs[i], pts[i], {}, project)
    # the written config.yaml loads back to the same run
    r = runs[-1]
    rd = write_run(project / "runs/big", spec, r)
    assert rd.config.read_text() == to_yaml(reference(spec, pts[-1], {}, project))
    assert run_id(from_run_file(rd.config)) == r.id
    assert json.loads(rd.meta.read_text())["swept"] == r.swept


def test_converted_values_and_overrides_match_compose(project):
    spec = read_sweep(write(project / "sweeps/odd.yaml", ODD))
    overrides = {"train.epochs": 4, "slurm.time_min": 30}
    runs = expand_sweep(spec, overrides, cwd=project)
    assert len(runs) == 3 * 2 * 3 * 2 * 2
    for r, pt in list(zip(runs, points(spec)))[::3]:  # every variant, optimizer, betas and zip point
        assert_same_as_reference(spec, r, pt, overrides, project)
    assert {r.config["data"]["root"] for r in runs} == {"~/cifar", str((project / "rel/data").resolve())}
    assert all(
        isinstance(r.config["optim"]["lr"], float) and isinstance(r.config["train"]["compile"], bool) for r in runs
    )


def test_interpolations_other_than_env_take_the_compose_path(project, monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA", str(project / "envdata"))
    text = (
        "name: i\nbase: [configs/base.yaml]\nset: {train.eval_batch_size: '${train.batch_size}'}\n"
        "grid: {train.batch_size: [16, 64]}\n"
    )
    spec = read_sweep(write(project / "sweeps/i.yaml", text))
    runs = expand_sweep(spec, cwd=project)
    assert [r.config["train"]["eval_batch_size"] for r in runs] == [16, 64]
    assert all(r.config["data"]["root"] == str(project / "envdata") for r in runs)
    for r, pt in zip(runs, points(spec)):
        assert_same_as_reference(spec, r, pt, {}, project)


@pytest.mark.parametrize(
    "section, body, key, fragment",
    [
        ("grid", "grid: {optim.lr: [0.1, 0.2, abc]}", "optim.lr", "expected a value of type float"),
        ("grid", "grid: {optim.name: [sgd, adamm], train.seed: [1, 2]}", "optim.name", "Did you mean 'adam'"),
        ("zip", "zip: {train.batch_size: [32, 0], train.seed: [1, 2]}", "train.batch_size", "must be >= 1"),
        (
            "variants[1]",
            "variants: [{model.name: resnet20}, {slurm.partition: 'a b'}]",
            "slurm.partition",
            "cannot be passed to sbatch",
        ),
    ],
)
def test_error_in_a_later_run_names_file_section_and_key(project, section, body, key, fragment):
    path = write(project / "sweeps/bad.yaml", f"name: bad\nbase: [configs/base.yaml]\n{body}\n")
    spec = read_sweep(path)
    with pytest.raises(ConfigError) as e:
        expand_sweep(spec, cwd=project)
    assert e.value.key == key and e.value.source == f"{path} ({section})" and fragment in str(e.value)


def test_error_is_the_one_per_run_compose_raises_first(project):
    # the first run has the bad batch size, a later one the bad optimizer: the batch size is reported
    path = write(
        project / "sweeps/bad.yaml",
        "name: bad\nbase: [configs/base.yaml]\ngrid: {optim.name: [sgd, adamm]}\nzip: {train.batch_size: [0]}\n",
    )
    with pytest.raises(ConfigError) as e:
        expand_sweep(read_sweep(path), cwd=project)
    assert e.value.key == "train.batch_size" and e.value.source == f"{path} (zip)"


def test_a_bad_shared_value_is_reported_unless_every_run_replaces_it(project):
    # the shared layers' values are checked once, each run's own values per run: a bad value in set:
    # that a grid replaces in every run is no error (as per-run compose); one that it keeps is, named
    # in set:, like compose; and a cross-field rule between a shared and a swept value still holds
    replaced = "name: r\nbase: [configs/base.yaml]\nset: {optim.name: adamm}\ngrid: {optim.name: [sgd, adam]}\n"
    spec = read_sweep(write(project / "sweeps/r.yaml", replaced))
    runs = expand_sweep(spec, cwd=project)
    assert [r.config["optim"]["name"] for r in runs] == ["sgd", "adam"]
    for r, pt in zip(runs, points(spec)):
        assert_same_as_reference(spec, r, pt, {}, project)
    kept = "name: k\nbase: [configs/base.yaml]\nset: {train.batch_size: 0}\ngrid: {optim.name: [sgd, adam]}\n"
    path = write(project / "sweeps/k.yaml", kept)
    with pytest.raises(ConfigError) as e:
        expand_sweep(read_sweep(path), cwd=project)
    with pytest.raises(ConfigError) as ref:
        reference(read_sweep(path), points(read_sweep(path))[0], {}, project)
    assert (e.value.key, e.value.source, str(e.value)) == (ref.value.key, ref.value.source, str(ref.value))
    assert e.value.key == "train.batch_size" and e.value.source == f"{path} (set)"
    cross = "name: c\nbase: [configs/base.yaml]\nset: {train.epochs: 3}\ngrid: {schedule.warmup_epochs: [1, 3]}\n"
    path = write(project / "sweeps/c.yaml", cross)
    with pytest.raises(ConfigError) as e:
        expand_sweep(read_sweep(path), cwd=project)
    assert e.value.key == "schedule.warmup_epochs" and e.value.source == f"{path} (grid)"


# --------------------------------------------------------------------------------------------------
# Arrays split by MaxArraySize
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, max_size",
    [(2500, 1001), (2500, 1000), (1000, 1001), (1001, 1001), (1002, 1001), (7, 1), (5, 2), (1, 1000), (0, 10)],
)
def test_split_arrays_covers_every_run_once(n, max_size):
    idx = list(range(100, 100 + n))
    arrays = launch.split_arrays(idx, max_size)
    assert [i for a in arrays for i in a] == idx
    assert all(0 < len(a) <= max_size for a in arrays)
    assert len(arrays) == -(-n // max_size)


def test_arrays_share_the_parallelism_and_keep_groups_apart(monkeypatch):
    def cfg(partition: str) -> dict:
        slurm = {
            "partition": partition,
            "account": "",
            "qos": "",
            "constraint": "",
            "nodes": 1,
            "tasks_per_node": 1,
            "gpus_per_node": 0,
            "gpu_type": "",
            "cpus_per_task": 1,
            "mem_gb": 1.0,
            "time_min": 10,
            "array_parallelism": 64,
            "max_requeues": 1,
            "setup": [],
        }
        return {"slurm": slurm}

    cfgs = [cfg("debug")] * 2500 + [cfg("v100")] * 3
    arrays = launch._arrays(cfgs, "x", 1001)
    assert [len(idx) for _, idx in arrays] == [833, 833, 834, 3]
    assert [p["array_parallelism"] for p, _ in arrays] == [21, 21, 21, 64]
    assert sorted(i for _, idx in arrays for i in idx) == list(range(2503))
    headers = launch.sbatch_headers(Path("/tmp/x"), cfgs, "x", max_size=1001)
    assert len(headers) == 4 and "#SBATCH --array=0-832%21" in headers[0] and "--partition=v100" in headers[3]


def test_max_array_size_env_and_fallback(monkeypatch):
    launch.max_array_size.cache_clear()
    monkeypatch.setenv(launch.MAX_ARRAY_SIZE_ENV, "7")
    assert launch.max_array_size() == 7
    launch.max_array_size.cache_clear()
    monkeypatch.delenv(launch.MAX_ARRAY_SIZE_ENV)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol
    assert launch.max_array_size() == launch.DEFAULT_MAX_ARRAY_SIZE
    launch.max_array_size.cache_clear()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_max_array_size_is_read_from_scontrol(monkeypatch):
    monkeypatch.delenv(launch.MAX_ARRAY_SIZE_ENV, raising=False)
    launch.max_array_size.cache_clear()
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    assert launch.max_array_size() == int(re.search(r"MaxArraySize\s*=\s*(\d+)", out).group(1))
    launch.max_array_size.cache_clear()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_submission_above_max_array_size_makes_several_arrays(project):
    path = write(
        project / "sweeps/split.yaml",
        "name: split\nbase: [configs/base.yaml]\ncluster: local\n"
        "set: {model.name: resnet20, data.name: synthetic, train.epochs: 1, slurm.array_parallelism: 1}\n"
        "grid: {train.seed: [0, 1, 2, 3, 4]}\n",
    )
    out = project / "runs"
    r = run_cli(
        "pipeline.sweep",
        str(path),
        "--cluster",
        "slurm",
        "--out",
        str(out),
        cwd=project,
        env={launch.MAX_ARRAY_SIZE_ENV: "2", "PYTHONPROFILEIMPORTTIME": "1"},
    )
    mpath = out / "split/manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    job_ids = [e["job_id"] for e in manifest.get("runs", {}).values()]
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert not re.search(r"\|\s+torch(\.|\s*$)", r.stderr, re.MULTILINE), "submitting imported torch"
        assert len(job_ids) == 5 and len(set(job_ids)) == 5 and len(arrays) == 3
        # arrays of 1, 2 and 2 tasks (submitit submits a one-task array as a plain job: no _index)
        assert sorted(sum(j.split("_")[0] == a for j in job_ids) for a in arrays) == [1, 2, 2]
        seen = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", ",".join(arrays), "-o", "JobID"], capture_output=True, text=True
        ).stdout.split()
        queued = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i"], capture_output=True, text=True
        ).stdout.split()
        assert {j.split("_")[0] for j in seen + queued} == set(arrays), (seen, queued)
    finally:
        if arrays:
            subprocess.run(["scancel", *arrays], capture_output=True)


# --------------------------------------------------------------------------------------------------
# What reaches sbatch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, bad",
    [
        ("slurm.partition", "gpu;rm -rf ~"),
        ("slurm.account", "a b"),
        ("slurm.qos", "$(id)"),
        ("slurm.gpu_type", "v100:2"),
        ("slurm.constraint", "a&b`x`"),
        ("slurm.partition", "v100\n#SBATCH --x"),
    ],
)
def test_sbatch_values_are_checked(key, bad):
    with pytest.raises(ConfigError) as e:
        load_config([], {key: bad})
    assert e.value.key == key and e.value.source == COMMAND_LINE
    assert "cannot be passed to sbatch" in str(e.value) and "allowed" in str(e.value)


def test_good_sbatch_values_pass():
    cfg = load_config(
        [],
        {
            "slurm.partition": "gpu-v100_2.x",
            "slurm.account": "pr_123_general",
            "slurm.qos": "",
            "slurm.gpu_type": "rtx8000",
            "slurm.constraint": "[rack1|rack2]&intel,avx2:2*!slow",
            "slurm.gpus_per_node": 1,
        },
    )
    (header,) = launch.sbatch_headers(Path("runs/s"), [cfg], "s", max_size=1000)
    lines = header.splitlines()
    assert "#SBATCH --partition=gpu-v100_2.x" in lines, header
    assert "#SBATCH --account=pr_123_general" in lines, header
    assert not any(line.startswith("#SBATCH --qos") for line in lines), header  # empty: not asked for
    assert "#SBATCH --gres=gpu:rtx8000:1" in lines, header
    # submitit quotes it (its special characters) as it does for a shell
    assert "#SBATCH --constraint='[rack1|rack2]&intel,avx2:2*!slow'" in lines, header


def test_bad_sbatch_value_in_a_sweep_exits_2_and_writes_nothing(project):
    path = write(project / "sweeps/bad.yaml", "name: bad\nbase: [configs/base.yaml]\nset: {slurm.qos: 'a;b'}\n")
    before = tree_snapshot(project)
    r = run_cli("pipeline.sweep", str(path), "--cluster", "slurm", "--out", str(project / "runs"), cwd=project)
    assert r.returncode == 2 and f"{path} (set): slurm.qos" in r.stderr and "only letters" in r.stderr, r.stderr
    assert tree_snapshot(project) == before
    write(project / "configs/cluster/evil.yaml", "slurm: {constraint: 'a$(b)'}\n")
    path = write(project / "sweeps/evil.yaml", "name: e\nbase: [configs/base.yaml]\ncluster: evil\n")
    r = run_cli("pipeline.sweep", str(path), "--dry-run", "--cluster", "local", cwd=project)
    assert r.returncode == 2 and "evil.yaml: slurm.constraint" in r.stderr, r.stderr


def test_dry_run_sbatch_header_and_no_torch(project):
    path = write(project / "sweeps/gpu.yaml", "name: gpu\nbase: [configs/base.yaml]\ngrid: {train.seed: [0, 1]}\n")
    r = run_cli(
        "pipeline.sweep",
        str(path),
        "slurm.partition=v100",
        "slurm.gpus_per_node=1",
        "slurm.gpu_type=v100",
        "--dry-run",
        "--cluster",
        "slurm",
        "--out",
        str(project / "runs"),
        cwd=project,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --partition=v100" in r.stdout and "#SBATCH --gres=gpu:v100:1" in r.stdout, r.stdout
    assert "#SBATCH --array=0-1%" in r.stdout
    assert "pipeline.config" in r.stderr  # the import log is there ...
    assert not re.search(r"\|\s+torch(\.|\s*$)", r.stderr, re.MULTILINE)  # ... without torch
    assert not (project / "runs").exists()


# --------------------------------------------------------------------------------------------------
# The plan table of a big sweep
# --------------------------------------------------------------------------------------------------


def test_big_plan_table_shows_first_and_last_rows_unless_all(project):
    spec = read_sweep(write(project / "sweeps/odd.yaml", ODD))
    decisions = plan(expand_sweep(spec, cwd=project), project / "runs/odd", None, set())
    assert len(decisions) > cli.SHOWN_ROWS

    def draw(show_all: bool) -> str:
        con = Console(file=io.StringIO(), width=300, highlight=False)
        cli.print_plan(con, spec, decisions, show_all=show_all)
        return con.file.getvalue()

    short, full = draw(False), draw(True)
    shown = [d.run.id for d in decisions if d.run.id in short]
    assert shown == [d.run.id for d in decisions[: cli.SHOWN_ROWS - 5] + decisions[-5:]]
    assert f"... {len(decisions) - cli.SHOWN_ROWS} more" in short and f"{len(decisions)} runs" in short
    assert all(d.run.id in full for d in decisions)


# --------------------------------------------------------------------------------------------------
# What submitting with sharing on costs, in system calls (bench/submit.py times it)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_submitting_shared_runs_syncs_once_and_leaves_the_links_to_the_jobs(project, monkeypatch):
    """200 runs, each the owner of its training key (sharing on): the files go to disk with one sync of
    the file system, not one fsync each, and no link is made (each job makes its own when it starts);
    status and collect of the pending sweep read it whole."""
    from pipeline import sweep
    from pipeline.submit import plan

    path = write(
        project / "sweeps/many.yaml",
        "name: many\nbase: [configs/base.yaml]\ncluster: local\n"
        "set: {model.name: resnet20, data.name: synthetic, train.epochs: 1, slurm.setup: ['sleep 120']}\n"
        f"grid: {{train.seed: {list(range(200))}}}\n",
    )
    out = project / "runs"
    calls = {"fsync": 0, "symlink": 0, "syncfs": 0}
    links: list[str] = []

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            if name == "symlink":
                links.append(str(args[1]))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "fsync", counted("fsync", os.fsync))
    monkeypatch.setattr(os, "symlink", counted("symlink", os.symlink))
    monkeypatch.setattr(plan, "syncfs", counted("syncfs", getattr(plan, "syncfs", None)), raising=False)
    monkeypatch.chdir(project)
    try:
        assert sweep.main([str(path), "--cluster", "slurm", "--out", str(out)]) == 0
        monkeypatch.undo()
        # the manifest (before and after the one sbatch) and the lock: not one per run
        assert calls["fsync"] <= 4 and calls["syncfs"] == 1, calls
        # (submitit links its sbatch script into the job's log folder)
        assert all(Path(link).parent == out / "many" / "logs" for link in links), links
        runs = list_runs(out / "many")
        assert len(runs) == 200
        for run in runs:
            store = run.shared_store()
            assert store is not None and (store / "trainer.json").is_file(), run.path
            assert not any(p.is_symlink() for p in run.path.rglob("*")), run.path
            assert run.status() == "pending" and run.read_metrics("train") is None
        st = run_cli("pipeline.status", str(out / "many"), cwd=project, check=True)
        assert "200 runs:" in st.stdout, st.stdout
        c = run_cli("pipeline.collect", str(out / "many"), cwd=project)
        assert c.returncode == 0 and "Traceback" not in c.stderr, c.stdout + c.stderr
    finally:
        mpath = out / "many/manifest.json"
        runs_ = json.loads(mpath.read_text())["runs"] if mpath.exists() else {}
        arrays = sorted({e["job_id"].split("_")[0] for e in runs_.values()})
        if arrays:
            subprocess.run(["scancel", *arrays], capture_output=True)
