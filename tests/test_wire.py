"""Codecs and byte accounting against hand arithmetic."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies import wire


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("float16", 2), ("uint8", 1)])
def test_fake_bytes_equal_hand_arithmetic(dtype, itemsize):
    x = torch.rand(4, 64, 3, 32, 32) * 2 - 1
    rec = wire.tensor_record(fakes=wire.encode_fakes(x, dtype))
    # .npy header (128 B) + raw data + the key's name
    expected = 128 + 4 * 64 * 3 * 32 * 32 * itemsize + len("fakes")
    assert rec.count_bytes() == expected == wire.array_bytes("fakes", (4, 64, 3, 32, 32), dtype)


def test_flower_documented_sizes():
    # notes/flower-1.42.md: a (64,3,32,32) batch is 786,564 / 393,348 / 196,740 B with key "fake"
    for dtype, n in (("float32", 786_564), ("float16", 393_348), ("uint8", 196_740)):
        assert wire.array_bytes("fake", (64, 3, 32, 32), dtype) == n


def test_uint8_round_trip_error_is_half_a_level():
    x = torch.linspace(-1, 1, 1001)
    y = wire.decode_fakes(wire.encode_fakes(x, "uint8"), "uint8")
    assert (y - x).abs().max() <= 0.5 / 127.5 + 1e-7
    assert y.min() == -1 and y.max() == 1


def test_float16_feedback_is_scaled_to_avoid_underflow():
    f = torch.full((64, 1, 8, 8), 3e-8)  # below float16's smallest subnormal (6e-8) without scaling
    back = wire.decode_feedback(wire.encode_feedback(f, "float16", 64), "float16", 64)
    assert torch.allclose(back, f, rtol=1e-3)
    assert f.half().float().abs().max() < 1e-7  # naive cast would have lost it


def test_record_bytes_sums_all_records():
    content = RecordDict({
        "a": ArrayRecord({"x": torch.zeros(2, 3)}),
        "c": ConfigRecord({"round": 1, "loss": "bce"}),
        "m": MetricRecord({"d_loss": 0.5}),
    })
    assert wire.record_bytes(content) == (128 + 24 + 1) + (5 + 8 + 4 + 3) + (6 + 8)


def test_require_array_rejects_shape_dtype_nan_and_missing():
    content = RecordDict({"r": ArrayRecord({"k": torch.tensor([1.0, math.nan])})})
    with pytest.raises(wire.BadReply, match="NaN"):
        wire.require_array(content, "r", "k", (2,), "float32")
    with pytest.raises(wire.BadReply, match="shape"):
        wire.require_array(content, "r", "k", (3,), "float32")
    with pytest.raises(wire.BadReply, match="dtype"):
        wire.require_array(content, "r", "k", (2,), "float16")
    with pytest.raises(wire.BadReply, match="missing array 'r.q'"):
        wire.require_array(content, "r", "q", (2,), "float32")
    with pytest.raises(wire.BadReply, match="missing array record 'z'"):
        wire.require_array(content, "z", "k", (2,), "float32")
