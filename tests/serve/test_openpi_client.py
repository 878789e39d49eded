"""The real `openpi-client` package (0.1.2) talks to `rtloop serve`. It pins numpy<2, so it lives in its own
venv, .venv-openpi (`make openpi-client` creates it; `make test` does so first), and runs as a subprocess."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

OPENPI_PYTHON = Path(__file__).parents[2] / ".venv-openpi" / "bin" / "python"

# What openpi's examples/libero/main.py does with a LIBERO frame, then a request with a bad image.
CLIENT = r"""
import json, sys
import numpy as np
from openpi_client import image_tools, websocket_client_policy

client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=int(sys.argv[1]))
frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
img = image_tools.convert_to_uint8(image_tools.resize_with_pad(np.ascontiguousarray(frame[::-1, ::-1]), 224, 224))
element = {"observation/image": img, "observation/wrist_image": img,
           "observation/state": np.zeros(8), "prompt": "pick up the alphabet soup and place it in the basket"}
out = [client.infer(element) for _ in range(2)][-1]
try:
    client.infer({"observation/image": img[:, :, :2].copy(), "prompt": "x"})
    error = None
except Exception as e:
    error = str(e)
print(json.dumps({"metadata": client.get_server_metadata(), "actions": np.asarray(out["actions"]).tolist(),
                  "server_timing": out["server_timing"], "error": error, "numpy": np.__version__}))
"""


@pytest.mark.skipif(not OPENPI_PYTHON.exists(), reason="no .venv-openpi: `make openpi-client` creates it")
def test_openpi_client_gets_actions_from_rtloop_serve(server):
    run = subprocess.run([str(OPENPI_PYTHON), "-c", CLIENT, str(server.port)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["numpy"].startswith("1.")  # openpi-client's own pins, apart from rtloop's numpy 2
    assert got["metadata"]["server"] == "rtloop" and got["metadata"]["action_shape"] == [1, 7]
    assert len(got["actions"]) == 1 and len(got["actions"][0]) == 7
    assert got["server_timing"]["infer_ms"] > 0 and got["server_timing"]["queue_ms"] >= 0
    assert "bad_shape: observation/image must be HxWx3" in got["error"]
