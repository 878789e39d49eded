"""openpi's wire format, written by us: msgpack maps whose numpy arrays travel as
`{b"__ndarray__": True, b"data": bytes, b"dtype": str, b"shape": [..]}` (scalars as `__npgeneric__`), and
the requests `rtloop serve` accepts.

Decoding is the server's attack surface, so it is strict: a size limit before msgpack sees a byte, only
numeric dtypes (object, void and string arrays are refused: nothing here ever unpickles), the byte count
checked against dtype x shape, and every request key known. Each refusal is a ProtocolError whose `kind` is
one of ERROR_KINDS (a bounded Prometheus label) and whose message names the problem in one line.

Two request forms (docs-serve.md):
- openpi's LIBERO example: `observation/image` (the frame already rotated 180° and resized, 224x224x3
  uint8), `prompt`; optional `observation/wrist_image`, `observation/state` (OpenVLA uses neither).
- rtloop's own: `image` (the raw simulator frame, HxWx3 uint8, upside down as LIBERO renders it) and
  `instruction`; optional `unnorm_key`. The server runs OpenVLA's exact LIBERO image path on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from rtloop.errors import RtloopError

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a 256x256 frame is 192 KiB; openpi's two 224 images 294 KiB
MAX_IMAGE_SIDE = 2048
MAX_TEXT_CHARS = 1000
NUMERIC_KINDS = "biuf"  # bool, int, uint, float

# Bounded label values for rtloop_server_errors_total{kind}
ERROR_KINDS = (
    "malformed", "oversize", "missing_key", "unknown_key", "bad_type", "bad_shape", "bad_dtype",
    "object_array", "bad_value", "inference", "auth", "disconnected",
)

OPENPI_REQUIRED = ("observation/image", "prompt")
OPENPI_OPTIONAL = ("observation/wrist_image", "observation/state")
RTLOOP_REQUIRED = ("image", "instruction")
RTLOOP_OPTIONAL = ("unnorm_key",)


class ProtocolError(RtloopError):
    """A message the server refuses. `kind` is per instance, one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind


# --- encoding ----------------------------------------------------------------------------------------


def _encode_numpy(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in NUMERIC_KINDS:
            raise ValueError(f"cannot send a {obj.dtype} array: only bool, int, uint and float arrays travel")
        if isinstance(obj, np.ndarray):
            data = np.ascontiguousarray(obj)
            return {b"__ndarray__": True, b"data": data.tobytes(), b"dtype": data.dtype.str, b"shape": data.shape}
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__} over msgpack")


def pack(obj) -> bytes:
    return msgpack.packb(obj, default=_encode_numpy)


def _numeric_dtype(spec) -> np.dtype:
    if not isinstance(spec, str) or len(spec) > 8:
        raise ProtocolError("bad_dtype", f"array dtype must be a short dtype string like '|u1', got {spec!r}")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise ProtocolError("bad_dtype", f"array dtype {spec!r} is not a numpy dtype") from None
    if dtype.kind == "O":
        raise ProtocolError("object_array", "object arrays are refused (they would need pickle)")
    if dtype.kind not in NUMERIC_KINDS:
        raise ProtocolError("bad_dtype", f"array dtype {spec!r} is refused: only bool, int, uint and float")
    return dtype


def _decode_numpy(obj: dict):
    if b"__ndarray__" in obj:
        if set(obj) != {b"__ndarray__", b"data", b"dtype", b"shape"}:
            raise ProtocolError("malformed", "an __ndarray__ map needs exactly data, dtype and shape")
        data, shape = obj[b"data"], obj[b"shape"]
        dtype = _numeric_dtype(obj[b"dtype"])
        if not isinstance(data, bytes):
            raise ProtocolError("malformed", "an __ndarray__'s data must be msgpack bin")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(n) is int and n >= 0 for n in shape):
            raise ProtocolError("malformed", f"an __ndarray__'s shape must be a list of sizes, got {shape!r}")
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize != len(data):
            raise ProtocolError("malformed", f"array of shape {tuple(shape)} and dtype {dtype} needs "
                                             f"{count * dtype.itemsize} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        if set(obj) != {b"__npgeneric__", b"data", b"dtype"} or not isinstance(obj[b"data"], (bool, int, float)):
            raise ProtocolError("malformed", "an __npgeneric__ map needs exactly a numeric data and a dtype")
        return _numeric_dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def _refuse_ext(code: int, data: bytes):
    raise ProtocolError("malformed", f"msgpack extension type {code} is refused")


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    if not isinstance(data, bytes):
        raise ProtocolError("malformed", "expected a binary msgpack frame, got a text frame")
    if len(data) > max_bytes:
        raise ProtocolError("oversize", f"message of {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        return msgpack.unpackb(data, object_hook=_decode_numpy, ext_hook=_refuse_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack signals bad bytes with several exception types
        raise ProtocolError("malformed", f"not a msgpack message: {type(e).__name__}: {e}"[:300]) from None


# --- requests ----------------------------------------------------------------------------------------


@dataclass
class Request:
    form: str  # "openpi" (image already rotated and resized by the client) or "rtloop" (the raw frame)
    image: np.ndarray  # HxWx3 uint8
    instruction: str
    unnorm_key: str | None = None


def _check_image(value, key: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ProtocolError("bad_type", f"{key} must be an array (openpi's __ndarray__), got {type(value).__name__}")
    if value.ndim != 3 or value.shape[2] != 3 or not all(1 <= n <= MAX_IMAGE_SIDE for n in value.shape[:2]):
        raise ProtocolError("bad_shape", f"{key} must be HxWx3 RGB (sides 1..{MAX_IMAGE_SIDE}), got shape "
                                         f"{tuple(value.shape)}")
    if value.dtype != np.uint8:
        raise ProtocolError("bad_dtype", f"{key} must be uint8, got {value.dtype}")
    return value


def _check_text(value, key: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad_type", f"{key} must be a string, got {type(value).__name__}")
    if not value.strip() or len(value) > MAX_TEXT_CHARS:
        raise ProtocolError("bad_value", f"{key} must be a non-empty string of at most {MAX_TEXT_CHARS} characters")
    return value


def parse_request(msg) -> Request:
    if not isinstance(msg, dict):
        raise ProtocolError("bad_type", f"a request must be a msgpack map, got {type(msg).__name__}")
    keys = set(msg)
    if not all(isinstance(k, str) for k in keys):
        raise ProtocolError("bad_type", "request keys must be strings")
    openpi = bool(keys & {*OPENPI_REQUIRED, *OPENPI_OPTIONAL})
    required, optional = (OPENPI_REQUIRED, OPENPI_OPTIONAL) if openpi else (RTLOOP_REQUIRED, RTLOOP_OPTIONAL)
    form = "openpi" if openpi else "rtloop"
    unknown = sorted(keys - {*required, *optional})
    if unknown:
        raise ProtocolError("unknown_key", f"unknown key(s) {', '.join(unknown)} in an {form} request (it takes "
                                           f"{', '.join((*required, *optional))})")
    missing = [k for k in required if k not in keys]
    if missing:
        raise ProtocolError("missing_key", f"missing key(s) {', '.join(missing)} in an {form} request")
    if openpi:
        if "observation/wrist_image" in msg:
            _check_image(msg["observation/wrist_image"], "observation/wrist_image")
        state = msg.get("observation/state")
        if state is not None and not (isinstance(state, np.ndarray) and state.ndim == 1 and state.dtype.kind == "f"):
            raise ProtocolError("bad_type", "observation/state must be a 1-D float array")
        return Request("openpi", _check_image(msg["observation/image"], "observation/image"),
                       _check_text(msg["prompt"], "prompt"))
    unnorm_key = msg.get("unnorm_key")
    return Request("rtloop", _check_image(msg["image"], "image"), _check_text(msg["instruction"], "instruction"),
                   None if unnorm_key is None else _check_text(unnorm_key, "unnorm_key"))
