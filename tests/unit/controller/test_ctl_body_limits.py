"""Request bodies measured as they arrive: in total and multipart part by part."""

from __future__ import annotations

import pytest

from controller.api.upload_limits import FIELD_BYTES, BodyLimits, BodyMeter, BodyTooLarge, limits_for

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _part(name: str, data: bytes, filename: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def _feed_in_pieces(meter: BodyMeter, body: bytes, piece: int = 1000) -> None:
    for start in range(0, len(body), piece):
        meter.feed(body[start : start + piece])


def test_each_part_is_held_to_its_own_limit_as_it_streams() -> None:
    limits = limits_for("POST", "/v1/models/m/versions/1/variants", max_upload_bytes=10_000)
    assert limits is not None and limits.parts == {"file": 10_000}
    fits = _part("file", b"\0" * 10_000, "m.onnx") + f"--{BOUNDARY}--\r\n".encode()
    _feed_in_pieces(BodyMeter(limits, CONTENT_TYPE), fits)
    too_big = _part("file", b"\0" * 10_001, "m.onnx")
    with pytest.raises(BodyTooLarge, match="upload exceeds the limit of 10000 bytes") as refused:
        _feed_in_pieces(BodyMeter(limits, CONTENT_TYPE), too_big)
    assert refused.value.status_code == 413


def test_a_plain_form_field_may_not_carry_a_file_sized_value() -> None:
    limits = limits_for("POST", "/v1/models/m/versions", max_upload_bytes=100 * FIELD_BYTES)
    assert limits is not None
    with pytest.raises(BodyTooLarge, match="form part 'metadata' exceeds the limit"):
        _feed_in_pieces(BodyMeter(limits, CONTENT_TYPE), _part("metadata", b"{" * (FIELD_BYTES + 1)), 65536)


def test_the_whole_body_is_cut_at_its_total_whatever_its_type() -> None:
    meter = BodyMeter(BodyLimits(total=5000), "application/json")
    meter.feed(b"x" * 5000)
    with pytest.raises(BodyTooLarge, match="request body exceeds the limit of 5000 bytes"):
        meter.feed(b"x")


def test_bodies_are_limited_on_every_write_method_only() -> None:
    assert limits_for("GET", "/v1/models", 1) is None
    json_limits = limits_for("PUT", "/v1/retraining/policies/p", 1)
    assert json_limits is not None and json_limits.parts == {} and json_limits.total > 1
