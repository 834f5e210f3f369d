"""Hostile and malformed input: crafted data files, odd encodings, duplicate YAML keys, odd override
shapes, non-finite numbers, huge sweeps, unusable output folders and file permissions. Every case ends in
a clear error naming the file or key (exit code 2 at the command line, no traceback) or in safe behaviour;
nothing on disk is lost."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, tree_snapshot, write


# --------------------------------------------------------------------------------------------------
# 1. Data files are unpickled with an allow-list of globals
# --------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a shell command (what a crafted CIFAR batch would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _copy_data(src_root: Path, dst_root: Path) -> Path:
    folder = dst_root / "synthetic-batches-py"
    folder.mkdir(parents=True)
    for p in (src_root / "synthetic-batches-py").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_crafted_batch_is_refused_without_running_code(tmp_path, synthetic_root):
    folder = _copy_data(synthetic_root, tmp_path / "data")
    marker = tmp_path / "code-ran"
    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [0]}, f, protocol=2)
    r = run_cli("pipeline.data", "info", "synthetic", "--root", str(tmp_path / "data"))
    assert r.returncode == 2, r.stderr
    assert not marker.exists()
    err = " ".join(r.stderr.split())  # rich may wrap
    assert "Traceback" not in r.stderr
    assert str(folder / "data_batch_3") in err and "refused to load global 'posix.system'" in err, err


def test_data_error_with_brackets_in_the_path_is_printed_as_text(tmp_path):
    root = tmp_path / "[/x]"
    r = run_cli("pipeline.data", "info", "synthetic", "--root", str(root))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"missing folder {root / 'synthetic-batches-py'}" in " ".join(r.stderr.split())


@pytest.mark.parametrize("target", [eval, getattr, __import__, os.system])
def test_read_cifar_pickle_refuses_every_other_global(tmp_path, target):
    from pipeline.data.cifar import UnsafePickleError, read_cifar_pickle

    class Crafted:
        def __reduce__(self):
            return target, ("1",)

    p = tmp_path / "batches.meta"
    p.write_bytes(pickle.dumps({"label_names": Crafted()}, protocol=4))
    with pytest.raises(UnsafePickleError, match=f"{p}: refused to load global '.*{target.__name__}'"):
        read_cifar_pickle(p)


def test_codecs_encode_is_admitted_for_latin1_only(tmp_path):
    import _codecs

    from pipeline.data.cifar import read_cifar_pickle

    class OtherCodec:
        def __reduce__(self):
            return _codecs.encode, ("x", "rot13")

    p = tmp_path / "batches.meta"
    p.write_bytes(pickle.dumps({"label_names": OtherCodec()}, protocol=2))
    with pytest.raises(ValueError, match=f"{p}: not a readable CIFAR pickle.*only \\(str, 'latin1'\\)"):
        read_cifar_pickle(p)


def test_damaged_file_is_a_value_error_naming_it(tmp_path):
    from pipeline.data.cifar import read_cifar_pickle

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({"data": b"x" * 100}, protocol=2)[:-20])
    with pytest.raises(ValueError, match=f"{p}: not a readable CIFAR pickle"):
        read_cifar_pickle(p)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_pickles_of_every_protocol_still_read(tmp_path, protocol):
    from pipeline.data.cifar import read_cifar_pickle

    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    p = tmp_path / "data_batch_1"
    p.write_bytes(
        pickle.dumps(
            {"data": data, "labels": [1, 2], "batch_label": "b", "filenames": ["a", "b"], b"bytes_key": b"v"},
            protocol=protocol,
        )
    )
    d = read_cifar_pickle(p)
    assert np.array_equal(d["data"], data) and d["data"].dtype == np.uint8
    assert d["labels"] == [1, 2] and d["filenames"] == ["a", "b"] and d["bytes_key"] == "v"


def test_python2_style_and_synthetic_files_still_load(tmp_path, synthetic_root):
    from pipeline.data.cifar import load_cifar, read_cifar_pickle
    from tests.test_data import _Py2Pickler, _to_bytes  # Python-2 str opcodes, as in the real files

    folder = _copy_data(synthetic_root, tmp_path)
    for p in folder.iterdir():
        obj = _to_bytes(read_cifar_pickle(p))
        with p.open("wb") as f:
            _Py2Pickler(f, protocol=2).dump(obj)
    with (folder / "data_batch_1").open("rb") as f:  # what torchvision does with the real files
        assert pickle.load(f, encoding="latin1")["data"].dtype == np.uint8
    ref, got = load_cifar("synthetic", synthetic_root, val_size=10), load_cifar("synthetic", tmp_path, val_size=10)
    assert np.array_equal(ref.train.images.numpy(), got.train.images.numpy())
    assert ref.class_names == got.class_names


# --------------------------------------------------------------------------------------------------
# 2. Binary, latin-1 and unreadable sweep and config files
# --------------------------------------------------------------------------------------------------

SWEEP = "name: s\nbase: [{base}]\ngrid: {{optim.lr: [0.1, 0.2]}}\n"


def _assert_usage_error(r, *fragments: str) -> str:
    """Exit code 2, no traceback, every fragment in the (unwrapped) error text; returns that text."""
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write(tmp_path / "configs/base.yaml", "train: {epochs: 2}\n")
    return tmp_path


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "holds NUL bytes"),
        (b"\xff\xd8\xff\xe0\x10JFIF", "not UTF-8 text (byte 0xff on line 1)"),
        ("name: caf\u00e9\nbase: [configs/base.yaml]\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 on line 1)"),
    ],
    ids=["png", "jpeg", "latin-1"],
)
@pytest.mark.parametrize("which", ["sweep", "base"])
def test_binary_or_latin1_file_is_a_config_error(project, content, fragment, which):
    bad = project / ("sweeps/s.yaml" if which == "sweep" else "configs/bad.yaml")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(content)
    sweep = bad if which == "sweep" else write(project / "sweeps/s.yaml", SWEEP.format(base="configs/bad.yaml"))
    r = run_cli("pipeline.sweep", str(sweep), "--no-submit", "--out", str(project / "runs"), cwd=project)
    _assert_usage_error(r, f"{bad}: {fragment}")
    assert not (project / "runs").exists()


def test_folder_given_as_the_sweep_file(project):
    (project / "sweeps/s.yaml").mkdir(parents=True)
    r = run_cli("pipeline.sweep", str(project / "sweeps/s.yaml"), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{project / 'sweeps/s.yaml'}: is a folder, not a YAML file")


@pytest.mark.parametrize("key, ref", [("base", "configs"), ("cluster", "configs/cluster.yaml")])
def test_folder_given_as_a_base_or_cluster_file(project, key, ref):
    (project / "configs/cluster.yaml").mkdir(parents=True)
    sweep = write(project / "sweeps/s.yaml", f"name: s\n{key}: {ref}\n")
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", "--cluster", "local", cwd=project)
    _assert_usage_error(r, f"{sweep}: {key}: '{ref}' is a folder ({project / ref}), not a config file")
    assert "not found" not in r.stderr


def test_base_file_that_cannot_be_read(project):
    # /proc/self/mem is a regular file that fails to read (EIO at offset 0), even for root
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="/proc/self/mem"))
    r = run_cli("pipeline.sweep", str(sweep), "--no-submit", "--out", str(project / "runs"), cwd=project)
    _assert_usage_error(r, "/proc/self/mem: cannot read the file:")
    assert not (project / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_sweep_file_without_read_permission(project):
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    sweep.chmod(0)
    try:
        r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project)
    finally:
        sweep.chmod(0o644)
    _assert_usage_error(r, f"{sweep}: cannot read the file: Permission denied")


# --------------------------------------------------------------------------------------------------
# 3. Duplicate YAML keys
# --------------------------------------------------------------------------------------------------


def test_duplicate_top_level_key_in_a_sweep_file(project):
    sweep = write(
        project / "sweeps/s.yaml",
        "name: s\nbase: [configs/base.yaml]\nset: {train.epochs: 3}\n"
        "grid: {optim.lr: [0.1, 0.2]}\nset: {train.seed: 1}\n",
    )
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{sweep}: set: given twice in one mapping, on lines 3 and 5")


@pytest.mark.parametrize(
    "text, key, where",
    [
        ("optim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n", "lr", "on lines 2 and 4"),
        ("train: {epochs: 3, epochs: 4}\n", "epochs", "on line 1 (columns 9 and 20)"),
        ("train: {epochs: 3}\nmodel: {name: resnet20}\ntrain: {seed: 1}\n", "train", "on lines 1 and 3"),
    ],
)
def test_duplicate_key_in_a_config_file(tmp_path, text, key, where):
    from pipeline.config import ConfigError, load_config

    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=re.escape(f"{f}: {key}: given twice in one mapping, {where} ")):
        load_config([f])


def test_duplicate_key_in_a_base_file_via_the_cli(project):
    write(project / "configs/base.yaml", "train:\n  epochs: 2\n  epochs: 3\n")
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    r = run_cli("pipeline.sweep", str(sweep), "--no-submit", "--out", str(project / "runs"), cwd=project)
    _assert_usage_error(r, f"{project / 'configs/base.yaml'}: epochs: given twice in one mapping, on lines 2 and 3")
    assert not (project / "runs").exists()


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from pipeline.config import load_config

    f = write(tmp_path / "c.yaml", "train: {<<: {epochs: 3, seed: 1}, seed: 2}\n")
    cfg = load_config([f])
    assert (cfg.train.epochs, cfg.train.seed) == (3, 2)


@pytest.mark.parametrize("text", ["optim.lr: 0.1\noptim: {lr: 0.2}\n", "optim: {lr: 0.2}\noptim.lr: 0.1\n"])
def test_key_given_dotted_and_nested_in_one_file(tmp_path, text):
    from pipeline.config import ConfigError, load_config

    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(
        ConfigError, match=re.escape(f"{f}: optim.lr: given twice, once as a dotted key and once nested")
    ):
        load_config([f])


def test_key_given_dotted_and_nested_in_a_sweep_section(project):
    sweep = write(
        project / "sweeps/s.yaml",
        "name: s\nbase: [configs/base.yaml]\ngrid: {optim.lr: [0.1], optim: {lr: [0.2, 0.3]}}\n",
    )
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{sweep} (grid): optim.lr: given twice")


# --------------------------------------------------------------------------------------------------
# 4. Overrides of the wrong shape: a mapping for a section, a value for a section, a list for a leaf
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "optim={lr: 0.5}",
            "command line: optim: is a section, not a setting: give its keys one at a time "
            "(on the command line: optim.lr=0.5)",
        ),
        ("optim=3", "command line: optim: is a section, not a setting"),
        ("optim.lr=[1,2]", "command line: optim.lr: expected a value of type float, got [1, 2]"),
        ("optim.lr.x=1", "command line: optim.lr.x: 'optim.lr' is a setting, not a section"),
    ],
)
def test_override_of_the_wrong_shape_exits_2(project, override, fragment):
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    r = run_cli("pipeline.sweep", str(sweep), override, "--no-submit", "--out", str(project / "runs"), cwd=project)
    _assert_usage_error(r, fragment)
    assert not (project / "runs").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim={}", "optim"),
        ("optim=", "optim"),
        ("optim=[1]", "optim"),
        ("model={name: {x: 1}}", "model"),
        ("optim.betas={a: 1}", "optim.betas"),
        ("optim.betas=[{a: 1}, 2]", "optim.betas"),
        ("slurm.setup=[[a]]", "slurm.setup"),
        ("optim.name=[sgd]", "optim.name"),
        ("optim.lr={a: 1}", "optim.lr"),
        ("train.epochs=[1]", "train.epochs"),
        ("schedule.milestones=0.5", "schedule.milestones"),
    ],
)
def test_every_override_shape_is_a_config_error(override, key):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert e.value.source == "command line" and e.value.key == key


def test_section_given_a_value_in_a_file(tmp_path):
    from pipeline.config import ConfigError, load_config

    f = write(tmp_path / "c.yaml", "optim: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: optim: is a section, not a setting")):
        load_config([f])


# --------------------------------------------------------------------------------------------------
# 5. Non-finite numbers, omegaconf's '???' and a memory request that rounds to 0 MB
# --------------------------------------------------------------------------------------------------


def _float_keys() -> list[str]:
    from pipeline.config import schema_fields

    return [k for k, f in schema_fields().items() if str(f.type) in ("float", "list[float]")]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_setting_refuses_non_finite_numbers(value):
    from pipeline.config import ConfigError, load_config, schema_fields

    keys = _float_keys()
    assert "optim.lr" in keys and "slurm.mem_gb" in keys and "optim.betas" in keys and len(keys) > 20
    for key in keys:
        given = f"[{value}, 0.5]" if str(schema_fields()[key].type).startswith("list") else value
        with pytest.raises(ConfigError) as e:
            load_config([], [f"{key}={given}"])
        assert e.value.key == key and "must be " in str(e.value) and "finite number" in str(e.value), str(e.value)


def test_non_finite_number_in_a_grid_exits_2(project):
    sweep = write(project / "sweeps/s.yaml", "name: s\nbase: [configs/base.yaml]\ngrid: {optim.lr: [0.1, .nan]}\n")
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{sweep} (grid): optim.lr: must be a finite number, got nan.")


def test_non_finite_string_in_a_config_file(tmp_path):
    from pipeline.config import ConfigError, load_config

    f = write(tmp_path / "c.yaml", "optim: {weight_decay: 'inf'}\n")  # omegaconf turns 'inf' into a float
    with pytest.raises(ConfigError, match=re.escape(f"{f}: optim.weight_decay: must be a finite number, got inf.")):
        load_config([f])


def test_missing_marker_is_refused(tmp_path, project):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(
        ConfigError,
        match=r"command line: model.name: '\?\?\?' \(omegaconf's marker of a missing "
        r"value\) is not a value: give the setting. Allowed values: resnet20",
    ):
        load_config([], ["model.name=???"])
    f = write(tmp_path / "c.yaml", "slurm: {setup: ['module load x', '???']}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: slurm.setup: '???'")):
        load_config([f])
    write(project / "configs/base.yaml", "model: {name: '???'}\n")
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{project / 'configs/base.yaml'}: model.name: '???'")
    sweep = write(project / "sweeps/v.yaml", "name: v\nvariants: [{model.name: '???'}]\n")
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{sweep} (variants[0]): model.name: '???'")


def test_memory_request_of_less_than_a_megabyte_is_refused():
    from pipeline.config import ConfigError, load_config

    for small in ("1e-9", "0.0009", "0"):
        with pytest.raises(ConfigError, match=r"command line: slurm.mem_gb: must be >= 0.001"):
            load_config([], [f"slurm.mem_gb={small}"])
    smallest = load_config([], ["slurm.mem_gb=0.001"]).slurm.mem_gb
    assert int(smallest * 1024) == 1  # how submitit renders a fractional mem_gb: --mem=1MB


# --------------------------------------------------------------------------------------------------
# 6. Sweeps too big to expand are refused before expanding
# --------------------------------------------------------------------------------------------------


def test_huge_grid_is_refused_before_expanding(project):
    axes = {"optim.lr": "0.1", "optim.weight_decay": "0.0001", "train.seed": "1", "optim.momentum": "0.5"}
    grid = "\n".join(f"  {k}: [{', '.join([v] * 100)}]" for k, v in axes.items())  # 100^4 = 10^8 points
    sweep = write(
        project / "sweeps/huge.yaml",
        f"name: huge\nbase: [configs/base.yaml]\ngrid:\n{grid}\n"
        "variants: [{model.name: resnet20}, {model.name: resnet32}]\n",
    )
    r = run_cli("pipeline.sweep", str(sweep), "--dry-run", cwd=project, timeout=120)
    _assert_usage_error(
        r,
        f"{sweep}: grid: expands to 200,000,000 runs (grid 100 x 100 x 100 x 100, zip 1, "
        "variants 2), more than the limit of 100,000 runs per sweep (pipeline.submit.expand.MAX_RUNS)",
    )


def test_run_limit_counts_grid_zip_and_variants(project, monkeypatch):
    from pipeline.submit import expand as sweep_mod
    from pipeline.config import ConfigError

    spec = sweep_mod.read_sweep(
        write(
            project / "sweeps/s.yaml",
            "name: s\nbase: [configs/base.yaml]\n"
            "grid: {optim.lr: [0.1, 0.2, 0.3], train.seed: [1, 2]}\n"
            "zip: {optim.momentum: [0.5, 0.6], optim.weight_decay: [0.1, 0.2]}\n"
            "variants: [{model.name: resnet20}, {model.name: resnet32}]\n",
        )
    )
    assert sweep_mod.count_runs(spec) == 3 * 2 * 2 * 2
    monkeypatch.setattr(sweep_mod, "MAX_RUNS", 24)
    assert len(sweep_mod.expand_sweep(spec, cwd=project)) == 24
    monkeypatch.setattr(sweep_mod, "MAX_RUNS", 23)
    with pytest.raises(ConfigError, match="expands to 24 runs .* more than the limit of 23 runs"):
        sweep_mod.expand_sweep(spec, cwd=project)


# --------------------------------------------------------------------------------------------------
# 7. Output folders that cannot be used, and file-system refusals while writing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["[/x].yaml", "[bold]x[/].yaml"])
def test_error_text_with_brackets_is_printed_as_text(project, name):
    r = run_cli("pipeline.sweep", str(project / name), "--dry-run", cwd=project)
    _assert_usage_error(r, f"{project / name}: file not found")


@pytest.mark.parametrize("mode", ["--no-submit", "--dry-run"])
@pytest.mark.parametrize("where", ["out", "below-out", "sweep-dir"])
def test_out_that_is_a_file_exits_2_and_keeps_it(project, mode, where):
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    blocker = write(project / ("results" if where != "sweep-dir" else "results/s"), "my notes\n")
    out = {"out": blocker, "below-out": blocker / "more", "sweep-dir": project / "results"}[where]
    before = tree_snapshot(project)
    r = run_cli("pipeline.sweep", str(sweep), mode, "--out", str(out), cwd=project)
    _assert_usage_error(r, f"command line: --out: '{blocker}' exists and is not a folder")
    assert tree_snapshot(project) == before and blocker.read_text() == "my notes\n"


def test_out_with_a_newline_exits_2_and_writes_nothing(project):
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    before = sorted(p.name for p in project.iterdir())
    r = run_cli("pipeline.sweep", str(sweep), "--no-submit", "--out", "runs\nx", cwd=project)
    _assert_usage_error(r, "command line: --out: 'runs\\nx' contains a newline or another control character")
    assert sorted(p.name for p in project.iterdir()) == before


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs a mounted sysfs")
def test_out_on_a_file_system_that_refuses_writes(project):
    # sysfs takes no new folders (read-only in containers, EPERM otherwise), for root too
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    r = run_cli("pipeline.sweep", str(sweep), "--no-submit", "--out", "/sys/pipeline-hostile-test", cwd=project)
    _assert_usage_error(r, "command line: --out: cannot write in '/sys':")
    assert not Path("/sys/pipeline-hostile-test").exists()


def test_disk_full_while_writing_run_folders_is_reported_with_the_path(project, monkeypatch, capsys):
    import errno

    from pipeline import rundir, sweep as sweep_mod

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "fdopen", FullDisk)
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as e:
        sweep_mod.main([str(sweep), "--no-submit", "--out", str(project / "runs")])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: " in err and "/config.yaml: No space left on device" in err, err
    assert not [p for p in (project / "runs").rglob("*") if p.is_file()]  # no temporaries left behind


def test_exit_on_os_error_lets_other_errors_through(capsys):
    import errno

    from pipeline import console as cli

    with pytest.raises(SystemExit) as e, cli.exit_on_os_error():
        raise PermissionError(errno.EACCES, "Permission denied", "/x/results.md")
    assert e.value.code == 2 and "error: /x/results.md: Permission denied" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError), cli.exit_on_os_error():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")


# --------------------------------------------------------------------------------------------------
# 8. Atomically written files follow the umask
# --------------------------------------------------------------------------------------------------


def _python(code: str, umask: int, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter under ``umask``; returns its stdout."""
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    code = (
        "import os, stat; from pathlib import Path; from pipeline.rundir import atomic_write_text, "
        "atomic_write_json\n"
        "atomic_write_text(Path('t/a.txt'), 'x'); atomic_write_text(Path('t/a.txt'), 'y', fsync=False)\n"
        "atomic_write_json(Path('t/b.json'), {})\n"
        "print(' '.join(oct(stat.S_IMODE(os.stat(p).st_mode)) for p in ('t/a.txt', 't/b.json')))\n"
        "print(oct(os.umask(0)))"
    )
    out = _python(code, umask, tmp_path).split("\n")
    assert out[0] == f"{oct(mode)} {oct(mode)}" and out[1] == oct(umask)  # and the umask left as it was


def test_run_folders_are_readable_by_the_group_under_umask_022(project):
    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    _python(f"from pipeline.sweep import main; main([{str(sweep)!r}, '--no-submit', '--out', 'runs'])", 0o022, project)
    written = [p for p in (project / "runs").rglob("*") if p.is_file()]
    assert len(written) == 2 * 2 + 1  # config.yaml and meta.json per run, array_runs.txt
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}


def test_umask_fallback_without_proc_leaves_the_umask_unchanged(monkeypatch):
    from pipeline import rundir

    monkeypatch.setattr(rundir, "_UMASK", None)
    real_read_text = Path.read_text

    def no_proc(self, *a, **k):
        if str(self) == "/proc/self/status":
            raise FileNotFoundError(str(self))
        return real_read_text(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", no_proc)
    old = os.umask(0o027)
    try:
        assert rundir.process_umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)
        monkeypatch.setattr(rundir, "_UMASK", None)


# --------------------------------------------------------------------------------------------------
# 9. Temporaries of killed atomic writes are cleaned up
# --------------------------------------------------------------------------------------------------


def _temporary(folder: Path, name: str, age_s: float) -> Path:
    """A temporary named as atomic_write_text names them, last modified ``age_s`` ago."""
    import tempfile
    import time

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.write(fd, b"half a fi")
    os.close(fd)
    then = time.time() - age_s
    os.utime(tmp, (then, then))
    return Path(tmp)


def test_clean_stale_temporaries_removes_only_old_write_temporaries(tmp_path):
    import time

    from pipeline.rundir import clean_stale_temporaries

    stale = _temporary(tmp_path, "meta.json", 2 * 3600)
    fresh = _temporary(tmp_path, "config.yaml", 60)  # a live writer could still hold it
    keep = [
        write(tmp_path / "notes.tmp", "mine"),
        write(tmp_path / ".meta.json.tmp", "mine"),
        write(tmp_path / ".x.abcdefgh.tmp.bak", "mine"),
        write(tmp_path / "sub/.a.abcdefgh.tmp", "below"),
    ]
    (tmp_path / ".d.abcdefgh.tmp").mkdir()
    (tmp_path / ".l.abcdefgh.tmp").symlink_to(tmp_path / "notes.tmp")
    for p in [*keep, tmp_path / ".d.abcdefgh.tmp"]:
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists() and all(p.exists() for p in keep)
    assert (tmp_path / ".d.abcdefgh.tmp").is_dir() and (tmp_path / ".l.abcdefgh.tmp").is_symlink()
    assert clean_stale_temporaries(tmp_path, older_than_s=30) == [fresh]
    assert clean_stale_temporaries(tmp_path / "missing") == []


def test_sweep_writing_run_folders_cleans_their_stale_temporaries(project, monkeypatch):
    from pipeline.sweep import main

    sweep = write(project / "sweeps/s.yaml", SWEEP.format(base="configs/base.yaml"))
    out = project / "runs"
    monkeypatch.chdir(project)
    main([str(sweep), "--no-submit", "--out", str(out)])
    run = next(p for p in (out / "s").iterdir() if p.is_dir())
    config = run.joinpath("config.yaml").read_text()
    stale = [_temporary(run, "meta.json", 7200), _temporary(out / "s", "array_runs.txt", 7200)]
    fresh = _temporary(run, "progress.json", 5)
    main([str(sweep), "--no-submit", "--out", str(out)])
    assert not any(p.exists() for p in stale) and fresh.exists()
    assert run.joinpath("config.yaml").read_text() == config


def test_collect_on_a_read_only_folder_names_it_and_exits_2(tmp_path, repo):
    """A sweep folder collect may not write in (here: a read-only bind of it): path and reason, exit 2."""
    import shutil
    import subprocess

    from pipeline.submit.expand import expand_sweep, read_sweep
    from pipeline.submit.plan import write_run

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(f"name: s\nbase: [{repo / 'configs/base.yaml'}]\n")
    spec = read_sweep(spec_path)
    (run,) = [write_run(tmp_path / "runs/s", spec, r) for r in expand_sweep(spec, cwd=tmp_path)]
    ro = tmp_path / "ro"
    ro.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "--bind", "-o", "ro", str(tmp_path / "runs/s"), str(ro)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs root and mount --bind (CI has both)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        r = run_cli("pipeline.collect", str(ro), cwd=tmp_path)
        assert r.returncode == 2 and "Read-only file system" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
