import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight OpenVLA checkpoint in the real on-disk format, made once per test session."""
    from rtloop.policy.checkpoint import make_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "openvla-tiny"
    make_checkpoint("tiny", out, seed=0)
    return out
