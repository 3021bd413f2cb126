"""Where configs and codebooks live: the shipped ones and the user's (what
``kvcodec calibrate`` writes)."""
from __future__ import annotations

import os
from pathlib import Path

# The repository's configs/ (editable installs: the package is the source tree's codec/,
# beside setup.py) and the copy inside the package (wheels). A folder named configs that
# merely sits beside an installed package in site-packages is not ours.
_PACKAGE = Path(__file__).resolve().parent.parent
_TREE = _PACKAGE.parent
CONFIG_DIR = _TREE / "configs" if (_TREE / "setup.py").is_file() else _PACKAGE / "configs"
PACKAGED_DIR = _PACKAGE / "configs"


def config_dirs() -> list[Path]:
    return [d for d in dict.fromkeys((CONFIG_DIR, PACKAGED_DIR)) if d.is_dir()]


def user_config_dir() -> Path:
    """Where ``kvcodec calibrate`` puts configs keyed to a model, which ``encode`` then
    picks up for ``config="default"``: ``$KVCODEC_CONFIG_DIR``, else the ``configs``
    folder of ``$KVCODEC_CACHE`` (default ``~/.cache/kvcodec/configs``)."""
    if os.environ.get("KVCODEC_CONFIG_DIR"):
        return Path(os.environ["KVCODEC_CONFIG_DIR"])
    cache = os.environ.get("KVCODEC_CACHE") or Path.home() / ".cache" / "kvcodec"
    return Path(cache) / "configs"
