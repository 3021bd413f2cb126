"""What an argument or a field must be, said once for every layer: an integer is an
``int`` that is not a ``bool`` (JSON's ``true`` and Python's ``True`` are no count, no
layer and no seed)."""
from __future__ import annotations

import operator

from ..errors import ShapeError

#: A token's position is below this (what a file's header admits).
MAX_POSITION = 1 << 40


def is_int(x, lo: int | None = None, hi: int | None = None) -> bool:
    """Whether ``x`` is an integer (not a bool) in ``[lo, hi]`` (either bound optional)."""
    return (isinstance(x, int) and not isinstance(x, bool)
            and (lo is None or x >= lo) and (hi is None or x <= hi))


def check_position_offset(offset, num_tokens: int) -> int:
    """``offset``, the position of a cache's first token, as an ``int``: an integer
    (numpy's and 0-d tensors' too) from 0, its last token's below :data:`MAX_POSITION`;
    else a ShapeError (a negative one rotated keys to positions no model gives, 1.5 and
    True were taken as 1)."""
    try:
        value = None if isinstance(offset, bool) else operator.index(offset)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_POSITION - num_tokens:
        raise ShapeError(f"position_offset must be an integer in [0, 2**40 - {num_tokens}] "
                         f"(the position of the first of {num_tokens} tokens), got "
                         f"{offset!r:.40}")
    return value
