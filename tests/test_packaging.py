"""environment.yml (clusters) and pyproject.toml (pip) must list the same dependencies."""

from __future__ import annotations

import tomllib

import yaml


def test_environment_yml_matches_pyproject(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((repo / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip_deps = {d.replace(" ", "") for d in pip_section if not d.startswith("-")}
    assert pip_deps == {d.replace(" ", "") for d in project["dependencies"]}
    assert "torch==2.14.1" in pip_deps and "torchvision==0.29.1" in pip_deps
    assert not any("pytorch" in str(d) for d in env["dependencies"])  # no retired -c pytorch packages
    assert "pytorch" not in env.get("channels", [])
