"""Size limits on request bodies, enforced as the bytes arrive.

Every body is cut off at its route's limit whether or not it declares a
Content-Length: a declared length over the limit is refused before anything is
read, and a chunked body is counted as it streams and refused with 413 the moment
it passes the limit (the framework's temporary file of the parts read so far is
then closed and removed). Multipart uploads are also measured part by part: the
model file may take ``max_upload_bytes``, a calibration set
:data:`~controller.calibration.MAX_CALIBRATION_BYTES` and sample inputs as much, a data set
:data:`~controller.datasets.MAX_DATASET_BYTES`, and each plain form field
:data:`FIELD_BYTES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fastapi import HTTPException, status
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from controller.calibration import MAX_CALIBRATION_BYTES
from controller.datasets import MAX_DATASET_BYTES

# Room for the multipart envelope (boundaries, part headers) around the parts.
ENVELOPE_BYTES = 1024 * 1024
# A plain form field (version, metadata, metrics, ...).
FIELD_BYTES = 1024 * 1024
# Any other body: JSON documents, including drift reference data sets.
JSON_BODY_BYTES = MAX_DATASET_BYTES + ENVELOPE_BYTES

_VERSION_UPLOAD = re.compile(r"^/v1/models/[^/]+/versions/?$")
_VARIANT_UPLOAD = re.compile(r"^/v1/models/[^/]+/versions/[^/]+/variants/?$")
_DATASET_UPLOAD = re.compile(r"^/v1/datasets/?$")


class BodyTooLarge(HTTPException):
    """The body (or one of its parts) passed its limit. Raised from the request's ``receive``,
    it reaches the client as a 413 however deep in the framework the body was being read."""

    def __init__(self, detail: str) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, detail)


@dataclass(frozen=True)
class BodyLimits:
    """The most a route's body may hold, in total and per multipart part (by field name)."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)

    def describe_total(self, size: int | None = None) -> str:
        what = "request body" if size is None else f"request body of {size} bytes"
        file = self.parts.get("file")
        if file is None:
            return f"{what} exceeds the limit of {self.total} bytes"
        return (
            f"{what} exceeds the limit of {file} bytes for the upload "
            f"(and {self.total - file} bytes for the other parts and the multipart envelope)"
        )


def limits_for(method: str, path: str, max_upload_bytes: int) -> BodyLimits | None:
    """The limits of one route's body, or None for methods without a body."""
    if method not in ("POST", "PUT", "PATCH"):
        return None
    if _VERSION_UPLOAD.match(path):
        # Sample inputs are a set of the same kind as a calibration set, with the same bound.
        parts = {
            "file": max_upload_bytes,
            "calibration": MAX_CALIBRATION_BYTES,
            "samples": MAX_CALIBRATION_BYTES,
        }
        return BodyLimits(max_upload_bytes + 2 * MAX_CALIBRATION_BYTES + ENVELOPE_BYTES, parts)
    if _VARIANT_UPLOAD.match(path):
        return BodyLimits(max_upload_bytes + ENVELOPE_BYTES, {"file": max_upload_bytes})
    if _DATASET_UPLOAD.match(path):
        return BodyLimits(MAX_DATASET_BYTES + ENVELOPE_BYTES, {"file": MAX_DATASET_BYTES})
    return BodyLimits(JSON_BODY_BYTES)


class BodyMeter:
    """Counts a body as it arrives; for multipart bodies, each part against its own limit."""

    def __init__(self, limits: BodyLimits, content_type: str) -> None:
        self.limits = limits
        self.size = 0
        self._parser: MultipartParser | None = None
        self._part_name = ""
        self._part_size = 0
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if limits.parts and kind == b"multipart/form-data" and boundary:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                },
            )

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limits.total:
            raise BodyTooLarge(self.limits.describe_total())
        if self._parser is not None:
            try:
                self._parser.write(data)
            except FormParserError:
                # Malformed multipart: the framework's parser reports it; measuring stops here.
                self._parser = None

    def _part_begin(self) -> None:
        self._part_name, self._part_size, self._disposition = "", 0, b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > FIELD_BYTES:
            raise BodyTooLarge(f"a multipart header exceeds the limit of {FIELD_BYTES} bytes")

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._part_name = options.get(b"name", b"").decode("latin-1")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_size += end - start
        limit = self.limits.parts.get(self._part_name, FIELD_BYTES)
        if self._part_size > limit:
            what = "upload" if self._part_name == "file" else f"form part {self._part_name!r}"
            raise BodyTooLarge(f"{what} exceeds the limit of {limit} bytes")
