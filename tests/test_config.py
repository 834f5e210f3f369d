"""The config schema: defaults, merging, and an error naming source, key and allowed values for every
kind of bad input (exit code 2 at the command line, nothing written)."""

from __future__ import annotations


import pytest

from pipeline.config import ConfigError, load_config, run_id, schema_fields
from tests.conftest import run_cli, tree_snapshot

FIXED_KEYS = [
    "data.name",
    "data.root",
    "model.name",
    "optim.name",
    "optim.lr",
    "optim.momentum",
    "optim.weight_decay",
    "schedule.name",
    "train.epochs",
    "train.batch_size",
    "train.num_workers",
    "train.seed",
    "train.device",
]


def test_fixed_dotted_names_exist():
    fields = schema_fields()
    for key in FIXED_KEYS:
        assert key in fields, key
    for section in ("data", "model", "optim", "schedule", "train", "prune", "quant", "slurm", "output"):
        assert any(k.startswith(section + ".") for k in fields), section


def test_base_yaml_holds_study1_defaults(repo, monkeypatch):
    monkeypatch.delenv("PIPELINE_DATA", raising=False)
    cfg = load_config([repo / "configs/base.yaml"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("nesterov", 0.1, 0.9, 1e-4)
    assert (cfg.train.batch_size, cfg.train.num_workers, cfg.train.epochs) == (128, 4, 100)
    assert cfg.data.name == "cifar10" and cfg.data.root == "data"
    monkeypatch.setenv("PIPELINE_DATA", "/scratch/me/cifar")
    assert load_config([repo / "configs/base.yaml"]).data.root == "/scratch/me/cifar"


def test_files_then_overrides_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train: {epochs: 7, batch_size: 64}\noptim: {lr: 0.5}\n")
    b = tmp_path / "b.yaml"
    b.write_text("train.epochs: 9\n")  # dotted keys are accepted in files too
    cfg = load_config([a, b], ["optim.lr=0.01", "optim.betas=[0.8,0.9]"])
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 64
    assert cfg.optim.lr == 0.01 and list(cfg.optim.betas) == [0.8, 0.9]


def test_yaml_float_without_dot_is_accepted():
    # YAML 1.1 reads 1e-4 as a string; the schema's float type converts it
    assert load_config([], ["optim.weight_decay=1e-4"]).optim.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "content, key, fragment",
    [
        ("train: {batchsize: 3}\n", "train.batchsize", "Did you mean 'train.batch_size'"),
        ("trian: {epochs: 3}\n", "trian.epochs", "Did you mean 'train'"),
        ("train: {epochs: three}\n", "train.epochs", "expected a value of type int"),
        ("train: {batch_size: 0}\n", "train.batch_size", "must be >= 1, got 0"),
        ("optim: {name: adamm}\n", "optim.name", "Did you mean 'adam'? Allowed values: sgd, nesterov"),
        ("optim: {lr: 0}\n", "optim.lr", "must be > 0"),
        ("data: {name: imagenet}\n", "data.name", "Allowed values: cifar10, cifar100, synthetic"),
        ("schedule: {milestones: [0.8, 0.3]}\n", "schedule.milestones", "increasing fractions"),
    ],
)
def test_bad_file_names_file_key_and_allowed(tmp_path, content, key, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config([f])
    assert e.value.source == str(f) and e.value.key == key
    assert fragment in str(e.value) and str(f) in str(e.value)


def test_bad_override_names_command_line():
    with pytest.raises(ConfigError) as e:
        load_config([], ["optim.name=adamm"])
    assert e.value.source == "command line" and "Allowed values" in str(e.value)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config([], ["train.epochs"])


def test_yaml_syntax_error_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: YAML syntax error \(line"):
        load_config([f])
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_config([tmp_path / "missing.yaml"])


def test_run_id_is_stable_and_ignores_scheduling_only_settings():
    a = load_config([], ["train.epochs=3"])
    assert run_id(a) == run_id(load_config([], ["train.epochs=3"]))
    assert run_id(a) != run_id(load_config([], ["train.epochs=4"]))
    assert run_id(a) == run_id(load_config([], ["train.epochs=3", "slurm.time_min=999", "slurm.partition=v100"]))
    assert run_id(a) != run_id(load_config([], ["train.epochs=3", "slurm.tasks_per_node=2"]))


# (the run's own settings, a setting that does nothing in such a run): same run id either way
INERT = [
    (["prune.method=none"], "prune.sparsity=0.7"),
    (["prune.method=none"], "prune.during=train"),
    (["prune.method=unstructured"], "prune.importance=l1"),
    (["prune.method=unstructured"], "prune.round_to=4"),
    (["prune.method=unstructured", "prune.schedule=constant"], "prune.power=2"),
    (["prune.method=unstructured", "prune.during=train"], "prune.epochs=3"),
    (["prune.method=unstructured", "prune.during=train"], "prune.lr=0.5"),
    (["prune.method=structured"], "prune.scope=layer"),
    (["prune.method=structured"], "prune.schedule=constant"),
    (["quant.method=none"], "quant.calib_batches=3"),
    (["quant.method=int8"], "quant.epochs=5"),
    (["quant.method=qat"], "quant.calib_batches=3"),
    (["measure.enabled=false"], "measure.latency_repeats=7"),
    ([], "train.eval_batch_size=64"),  # each image's output is the same in any batch
    (["data.loader=device"], "train.num_workers=1"),  # no worker processes
]
# ... and settings that do change the run: another run id
ACTIVE = [
    (["prune.method=unstructured"], "prune.sparsity=0.7"),
    (["prune.method=unstructured", "prune.schedule=polynomial"], "prune.power=2"),
    (["prune.method=unstructured"], "prune.epochs=3"),
    (["prune.method=structured"], "prune.importance=l1"),
    (["quant.method=int8"], "quant.calib_batches=3"),
    (["quant.method=qat"], "quant.epochs=5"),
    (["data.loader=dataloader"], "train.num_workers=1"),  # other workers, other augmentation draws
    ([], "measure.latency_repeats=5"),  # other figures measured
    ([], "measure.compile=false"),
]


@pytest.mark.parametrize("run, setting", INERT)
def test_a_setting_that_does_nothing_in_a_run_does_not_change_its_id(run, setting):
    assert run_id(load_config([], run)) == run_id(load_config([], [*run, setting]))


@pytest.mark.parametrize("run, setting", ACTIVE)
def test_a_setting_that_changes_a_run_changes_its_id(run, setting):
    assert run_id(load_config([], run)) != run_id(load_config([], [*run, setting]))


def test_run_ids_made_before_inert_settings_were_left_out_stay_the_same():
    """Ids computed before this change, of runs whose inert and measure settings had their defaults."""
    assert run_id(load_config([], [])) == "3606df9c1a"
    assert run_id(load_config([], ["prune.method=unstructured"])) == "83b8db9b26"
    assert run_id(load_config([], ["prune.method=structured", "quant.method=int8"])) == "2b7d42cb2c"
    during_train = ["prune.method=unstructured", "prune.during=train", "data.loader=dataloader", "train.num_workers=2"]
    assert run_id(load_config([], during_train)) == "7d9f51fcdf"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.name=adamm", "optim.name: 'adamm' is not allowed. Did you mean 'adam'?"),
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("model.name=resnet21", "Allowed values: resnet20"),
    ],
)
def test_run_cli_bad_override_exits_2_and_writes_nothing(tmp_path, repo, override, fragment):
    before = tree_snapshot(tmp_path)
    r = run_cli(
        "pipeline.run", str(repo / "configs/base.yaml"), override, "--out", str(tmp_path / "runs"), cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert "command line" in r.stderr and fragment in r.stderr
    assert tree_snapshot(tmp_path) == before and not (tmp_path / "runs").exists()
