import os
import signal

import pytest
import torch

# A runner started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and so
# would every rtloop process these tests start: the Ctrl-C tests need the signal as a terminal delivers it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; read when rtloop.policy.kernels is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def fixed_kernel_tiles():
    """On a GPU, engines built by tests run one fixed GEMV tile and no split timing: the tests check
    results, and tuning made a GPU test file take minutes (`rtloop bench` measures the tuned kernels)."""
    from rtloop.policy import kernels

    default = kernels.DEFAULT_OPTIONS
    kernels.DEFAULT_OPTIONS = kernels.KernelOptions(autotune=False)
    yield
    kernels.DEFAULT_OPTIONS = default


@pytest.fixture(autouse=True)
def unfrozen_heap():
    """Every run freezes the heap it starts with (rtloop.runtime.heap); between tests it goes back to the
    collector, so that one test's garbage never outlives it."""
    yield
    import gc

    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight OpenVLA checkpoint in the real on-disk format, made once per test session."""
    from rtloop.policy.checkpoint import make_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "openvla-tiny"
    make_checkpoint("tiny", out, seed=0)
    return out
