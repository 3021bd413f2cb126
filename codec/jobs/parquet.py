"""Parquet corpus files for :mod:`.corpus`: pyarrow on demand, the file a ParquetFile
reads (its I/O failures told apart from pyarrow's own errors about the data, which are
OSErrors too), and column values that have no Python form.

May import ``kvcodec.errors`` only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BackendError


class SourceError(Exception):
    """An OSError of the file pyarrow reads, carried past pyarrow, which raises OSError
    for damaged Parquet data too."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class ParquetSource:
    """The file a ParquetFile reads, its I/O failures wrapped in :class:`SourceError`
    (pyarrow re-raises a Python exception of the file as it is), so that they still raise
    while pyarrow's own OSErrors about the data make the file a Skipped."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def _call(self, method, *args):
        try:
            return method(*args)
        except OSError as exc:
            raise SourceError(exc) from exc

    def read(self, *args):
        return self._call(self._f.read, *args)

    def readinto(self, *args):
        return self._call(self._f.readinto, *args)

    def seek(self, *args):
        return self._call(self._f.seek, *args)

    def tell(self):
        return self._call(self._f.tell)


@dataclass(frozen=True)
class Unreadable:
    """A Parquet value with no Python form (a string that is not UTF-8, a date out of
    Python's range): its row is skipped."""
    reason: str


def pylist(column) -> list:
    """A Parquet column's values; a value that cannot be converted is an Unreadable (one
    would fail the whole column's conversion)."""
    try:
        return column.to_pylist()
    except (ValueError, OverflowError):  # UnicodeDecodeError, ArrowInvalid are ValueErrors
        out = []
        for i in range(len(column)):
            try:
                out.append(column[i].as_py())
            except (ValueError, OverflowError) as exc:
                out.append(Unreadable(_one_line(exc)))
        return out


def pyarrow_modules():
    """``(pyarrow, pyarrow.parquet)``, or a BackendError saying what to install."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise BackendError("reading Parquet corpus files needs pyarrow: "
                           "pip install 'kvcodec-toolkit[parquet]' (pyarrow)") from None
    return pyarrow, pyarrow.parquet


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
