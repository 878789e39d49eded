"""The MuJoCo pin: one version in pyproject.toml and in the check. The warning a LIBERO run prints once and
records: tests/runtime/test_run_cli.py (read from the LIBERO run those tests share)."""

import re
from pathlib import Path

from rtloop.sim.versions import PINNED_MUJOCO, mujoco_version_warning

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_checked_version():
    pins = re.findall(r'"mujoco==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pins == [PINNED_MUJOCO]


def test_warning_names_both_versions_and_the_fix():
    message = mujoco_version_warning("3.17.0")
    assert message.startswith(f"MuJoCo 3.17.0 is installed, but LIBERO is validated with {PINNED_MUJOCO}")
    assert message.endswith(f"pip install mujoco=={PINNED_MUJOCO}") and "\n" not in message
    assert mujoco_version_warning(PINNED_MUJOCO) is None


def test_run_flags_centre_crop_default_and_off():
    from rtloop.cli import build_parser

    parser = build_parser("run")
    assert parser.parse_args(["run"]).center_crop is True
    assert parser.parse_args(["run", "--no-center-crop"]).center_crop is False
