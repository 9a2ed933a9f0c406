"""The sandbox's reply format: every value a decoder returns round-trips; anything outside the format is BadReply."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.media.replies import BadReply, decode_reply, encode_reply, remote_exception


def round_trip(reply):
    return decode_reply([bytearray(p) for p in encode_reply(reply)])


def test_values_round_trip():
    pixels = np.arange(2 * 448 * 448 * 3, dtype=np.uint8).reshape(2, 448, 448, 3)
    value = {"pixels": pixels, "tiles_per_image": [1, 1], "media_type": "video", "fps": np.float32(25.0),
             "frames": (np.array([1.5, 2.5]), np.zeros((0, 3), np.int64)), "raw": b"\x00\x01", "none": None,
             "flags": np.array([True, False]), "nested": {"a": [1, "b", 2.5]}}
    got = round_trip({"reply": "ok", "value": value})["value"]
    assert got.keys() == value.keys()
    np.testing.assert_array_equal(got["pixels"], pixels)
    assert got["pixels"].flags.writeable and got["fps"] == 25.0 and isinstance(got["frames"], tuple)
    assert got["frames"][1].shape == (0, 3) and got["raw"] == b"\x00\x01" and got["flags"].dtype == bool
    assert got["nested"] == {"a": [1, "b", 2.5]} and got["tiles_per_image"] == [1, 1]
    view = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]  # not contiguous
    np.testing.assert_array_equal(round_trip({"reply": "ok", "value": view})["value"], view)


def test_registered_dataclasses_round_trip():
    from pipeline.media.video import SampledFrames

    sampled = SampledFrames(frames=np.zeros((2, 4, 4, 3), np.uint8), indices=[1, 5], fps=25.0, num_frames=10)
    got = round_trip({"reply": "ok", "value": sampled})["value"]
    assert isinstance(got, SampledFrames) and got.indices == [1, 5] and got.frames.shape == (2, 4, 4, 3)


def test_values_the_format_cannot_carry_are_refused_when_sent():
    for value in (object(), {1: "a"}, np.array([object()]), np.zeros(2, dtype=[("a", "i4")])):
        with pytest.raises(TypeError):
            encode_reply({"reply": "ok", "value": value})


@pytest.mark.parametrize("header", [
    b"\x80\x05K\x01.",  # a pickle
    b"[1, 2]",
    json.dumps({"reply": "shell", "cmd": "id"}).encode(),
    json.dumps({"reply": "ok", "value": 1, "extra": 2}).encode(),
    json.dumps({"reply": "ready", "pid": True}).encode(),
    json.dumps({"reply": "ok", "value": {"$array": [1, "|O", [1]]}}).encode(),
    json.dumps({"reply": "ok", "value": {"$array": [1, "|V8", [1]]}}).encode(),
    json.dumps({"reply": "ok", "value": {"$array": [1, "<f8", [3]]}}).encode(),  # 8 bytes for 24
    json.dumps({"reply": "ok", "value": {"$array": [5, "|u1", [8]]}}).encode(),  # no such buffer
    json.dumps({"reply": "ok", "value": {"$array": [0, "|u1", [8]]}}).encode(),  # the header is no buffer
    json.dumps({"reply": "ok", "value": {"$bytes": 1, "$tuple": []}}).encode(),
    json.dumps({"reply": "ok", "value": {"__reduce__": 1}}).encode(),
    json.dumps({"reply": "error", "type": "ValueError", "args": "x", "traceback": ""}).encode(),
    json.dumps({"reply": "ok", "value": {"$record": ["os.system", {"command": "id"}]}}).encode(),  # not registered
    json.dumps({"reply": "ok", "value": {"$record": ["pipeline.media.video.SampledFrames", {"fps": 1}]}}).encode(),
    b'{"reply": "ok", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_replies_outside_the_format_are_bad(header):
    with pytest.raises(BadReply):
        decode_reply([bytearray(header), bytearray(8)])


def test_only_builtin_exceptions_are_made_again():
    assert isinstance(remote_exception("ValueError", ["bad"]), ValueError)
    assert isinstance(remote_exception("OSError", [2, "gone"]), FileNotFoundError)
    for name in ("exec", "eval", "open", "SystemExit", "KeyboardInterrupt", "object", "Path", "__import__"):
        assert remote_exception(name, ["print(1)"]) is None
    assert remote_exception("UnicodeDecodeError", ["x"]) is None  # args that do not fit
