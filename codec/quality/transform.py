"""Fitting ``klt`` configs on calibration caches: :mod:`kvcodec.core.fit` does the
fitting (the encoder's first-encode fit uses it too); this module names what a
:class:`~kvcodec.quality.calibrate.Calibrator` hands it."""
from __future__ import annotations

from ..core.fit import basis_index, fit_bases, klt_config  # noqa: F401 (API)
from ..core.kvcache import KVCache


def calibration_caches(cal) -> list[KVCache]:
    """The prefilled caches of a :class:`~kvcodec.quality.calibrate.Calibrator`."""
    return [kv for kv, _, _ in cal.cases]
