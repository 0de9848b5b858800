"""The project files agree with each other: conda.yaml installs the project, and every
MLproject entry point calls an existing CLI command with options it has."""

from __future__ import annotations

import configparser
import re
import shlex

import yaml

from seg_mlops.cli import cli
from tests.conftest import REPO


def test_conda_env_installs_the_project():
    # conda.yaml installs the package itself, so setup.cfg is the one list of dependencies, and the
    # Python it pins is one setup.cfg accepts.
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip == ["-e ."]
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    minimum = setup["options"]["python_requires"].removeprefix(">=")
    assert tuple(map(int, python.removeprefix("python=").split("."))) >= tuple(map(int, minimum.split(".")))


def test_mlproject_entry_points_call_real_commands():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    points = project["entry_points"]
    assert {"main", "train", "evaluate", "infer", "register"} <= set(points)
    for name, point in points.items():
        words = shlex.split(point["command"])
        assert words[:3] == ["python", "-m", "seg_mlops.cli"], name
        command = cli.commands[words[3]]
        options = {opt for param in command.params for opt in param.opts}
        used = [w for w in words[4:] if w.startswith("--")]
        assert set(used) <= options, (name, set(used) - options)
        # every {placeholder} is a declared parameter, and every parameter is used
        placeholders = set(re.findall(r"\{(\w+)\}", point["command"]))
        assert placeholders == set(point.get("parameters", {})), name
