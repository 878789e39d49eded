"""The MuJoCo pin: one version in pyproject.toml and in the check, the warning a LIBERO run prints once."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rtloop.sim.versions import PINNED_MUJOCO, installed_mujoco, mujoco_version_warning

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_checked_version():
    pins = re.findall(r'"mujoco==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pins == [PINNED_MUJOCO]


def test_warning_names_both_versions_and_the_fix():
    message = mujoco_version_warning("3.17.0")
    assert message.startswith(f"MuJoCo 3.17.0 is installed, but LIBERO is validated with {PINNED_MUJOCO}")
    assert message.endswith(f"pip install mujoco=={PINNED_MUJOCO}") and "\n" not in message
    assert mujoco_version_warning(PINNED_MUJOCO) is None


def _run(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "rtloop", "run", *argv, "--metrics-port", "0", "--quiet"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _header(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def test_run_flags_centre_crop_default_and_off():
    from rtloop.cli import build_parser

    parser = build_parser("run")
    assert parser.parse_args(["run"]).center_crop is True
    assert parser.parse_args(["run", "--no-center-crop"]).center_crop is False


@pytest.mark.slow
def test_libero_run_warns_once_on_another_mujoco_and_records_it(tmp_path):
    done = _run("--max-steps", "1", "--trace", str(tmp_path / "t.jsonl"), "--no-center-crop", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    header = _header(tmp_path / "t.jsonl")
    assert header["versions"]["mujoco"] == installed_mujoco()
    assert header["config"]["center_crop"] is False
    expected = mujoco_version_warning()
    assert header["mujoco_warning"] == expected
    warnings = [line for line in done.stderr.splitlines() if line.startswith("rtloop: warning: MuJoCo")]
    assert warnings == ([f"rtloop: warning: {expected}"] if expected else [])
