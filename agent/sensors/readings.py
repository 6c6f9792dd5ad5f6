"""Generic sensors: a CSV replay, or a line-based stream (a serial port, a pipe, a file)."""

from __future__ import annotations

import termios
from typing import IO

import numpy as np

from agent.errors import SourceError
from agent.sensors.base import Sample, now_ms
from agent.tenants import SourceSpec


class CsvSource:
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        delimiter = spec.option("delimiter", ",")
        try:
            self._rows = np.loadtxt(
                spec.uri, delimiter=delimiter, skiprows=int(spec.number("skip_header", 0)), ndmin=2
            )
        except (OSError, ValueError) as exc:
            raise SourceError(f"csv {spec.uri!r} cannot be read: {exc}") from None
        self._next = 0
        self._seq = 0

    def read(self) -> Sample | None:
        if self._next >= len(self._rows):
            if not (self.spec.flag("loop") and len(self._rows)):
                return None
            self._next = 0
        row = self._rows[self._next]
        self._next += 1
        sample = Sample("rows", row, self._seq, now_ms())
        self._seq += 1
        return sample

    def close(self) -> None:
        self._rows = np.empty((0, 0))


class LineSource:
    """One reading per line, numbers separated by ``delimiter`` (default: commas or blanks)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        try:
            self._file: IO[str] = open(spec.uri, encoding="ascii", errors="replace")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise SourceError(f"line source {spec.uri!r} cannot be opened: {exc}") from None
        try:
            if "baud" in spec.options:
                self._set_speed(int(spec.number("baud", 9600)))
        except (OSError, termios.error, SourceError) as exc:
            self._file.close()
            raise SourceError(f"line source {spec.uri!r}: {exc}") from None
        self._seq = 0

    def _set_speed(self, baud: int) -> None:
        speed = getattr(termios, f"B{baud}", None)
        if speed is None:
            raise SourceError(f"line source {self.spec.uri!r}: unsupported baud rate {baud}")
        fd = self._file.fileno()
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = speed
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def read(self) -> Sample | None:
        while True:
            try:
                line = self._file.readline()
            except OSError as exc:
                raise SourceError(f"line source {self.spec.uri!r} failed: {exc}") from None
            if not line:
                return None
            text = line.strip()
            if not text:
                continue
            delimiter = self.spec.options.get("delimiter")
            parts = text.split(delimiter) if delimiter else text.replace(",", " ").split()
            try:
                row = np.array([float(p) for p in parts], np.float64)
            except ValueError:
                continue  # a garbled line from a serial link: skip it, keep reading
            sample = Sample("rows", row, self._seq, now_ms())
            self._seq += 1
            return sample

    def close(self) -> None:
        self._file.close()
