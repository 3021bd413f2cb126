"""What an argument or a field must be, said once for every layer: an integer is an
``int`` that is not a ``bool`` (JSON's ``true`` and Python's ``True`` are no count, no
layer and no seed)."""
from __future__ import annotations


def is_int(x, lo: int | None = None, hi: int | None = None) -> bool:
    """Whether ``x`` is an integer (not a bool) in ``[lo, hi]`` (either bound optional)."""
    return (isinstance(x, int) and not isinstance(x, bool)
            and (lo is None or x >= lo) and (hi is None or x <= hi))
