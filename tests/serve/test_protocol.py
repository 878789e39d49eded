"""openpi's msgpack-numpy encoding and rtloop serve's request validation, on hand-built messages."""

import msgpack
import numpy as np
import pytest

from rtloop.serve.protocol import ProtocolError, pack, parse_request, unpack


def openpi_array(a: np.ndarray) -> dict:
    """The encoding as openpi_client.msgpack_numpy.pack_array writes it."""
    return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str, b"shape": a.shape}


def refusal(data: bytes, max_bytes: int = 1 << 20) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse_request(unpack(data, max_bytes))
    assert "\n" not in str(e.value)
    return e.value


IMAGE = np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3)


def test_arrays_round_trip_in_openpi_encoding():
    a = np.linspace(0, 1, 14).reshape(2, 7).astype(np.float32)
    assert pack({"actions": a}) == msgpack.packb({"actions": openpi_array(a)})
    out = unpack(msgpack.packb({"actions": openpi_array(a), "x": {b"__npgeneric__": True, b"data": 1.5,
                                                                   b"dtype": "<f8"}}))
    np.testing.assert_array_equal(out["actions"], a)
    assert out["actions"].dtype == np.float32 and out["x"] == np.float64(1.5)


def test_openpi_libero_request_is_accepted():
    msg = {"observation/image": IMAGE, "observation/wrist_image": IMAGE, "observation/state": np.zeros(8),
           "prompt": "pick up the soup"}
    req = parse_request(unpack(pack(msg)))
    assert req.form == "openpi" and req.instruction == "pick up the soup" and req.image.shape == (224, 224, 3)


def test_rtloop_request_is_accepted():
    req = parse_request(unpack(pack({"image": IMAGE[:200], "instruction": "x", "unnorm_key": "libero_10"})))
    assert (req.form, req.unnorm_key, req.image.shape) == ("rtloop", "libero_10", (200, 224, 3))


def test_object_arrays_are_refused_both_ways():
    with pytest.raises(ValueError, match="object"):
        pack({"image": np.array([None, 1], dtype=object)})
    bad = {b"__ndarray__": True, b"data": b"\x80\x04N.", b"dtype": "|O", b"shape": [1]}  # a pickle, as data
    assert refusal(msgpack.packb({"image": bad, "instruction": "x"})).kind == "object_array"


@pytest.mark.parametrize("msg, kind, words", [
    ({"image": IMAGE}, "missing_key", "instruction"),
    ({"image": IMAGE, "instruction": "x", "colour": 1}, "unknown_key", "colour"),
    ({"observation/image": IMAGE, "prompt": "x", "image": IMAGE}, "unknown_key", "image"),
    ({"image": IMAGE[:, :, :2].copy(), "instruction": "x"}, "bad_shape", "(224, 224, 2)"),
    ({"image": IMAGE.astype(np.float32), "instruction": "x"}, "bad_dtype", "float32"),
    ({"image": IMAGE, "instruction": 3}, "bad_type", "instruction must be a string"),
    ({"image": IMAGE, "instruction": " "}, "bad_value", "non-empty"),
    ({"image": "a picture", "instruction": "x"}, "bad_type", "must be an array"),
    ([1, 2, 3], "bad_type", "msgpack map"),
])
def test_bad_requests_name_the_problem(msg, kind, words):
    e = refusal(pack(msg))
    assert e.kind == kind and words in str(e)


def test_bad_bytes_are_malformed():
    good = pack({"image": IMAGE, "instruction": "x"})
    assert refusal(good[:-10]).kind == "malformed"
    assert refusal(b"\xc1").kind == "malformed"  # a byte msgpack never uses
    lying = {b"__ndarray__": True, b"data": b"\0" * 10, b"dtype": "|u1", b"shape": [224, 224, 3]}
    e = refusal(msgpack.packb({"image": lying, "instruction": "x"}))
    assert e.kind == "malformed" and "needs 150528 bytes, got 10" in str(e)
    assert refusal(msgpack.packb({"image": msgpack.ExtType(5, b"x"), "instruction": "x"})).kind == "malformed"
    with pytest.raises(ProtocolError, match="text frame"):
        unpack("a string")


def test_size_limit_is_checked_before_decoding():
    e = refusal(pack({"image": IMAGE, "instruction": "x"}), max_bytes=1000)
    assert e.kind == "oversize" and "over the limit of 1000 bytes" in str(e)
