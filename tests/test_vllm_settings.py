"""The connector's ``kv_connector_extra_config`` values, read from vLLM's own
KVTransferConfig as the engine hands it over (the engine's side: test_vllm.py)."""
import math

import pytest

from kvcodec.errors import ConfigError
from kvcodec.integrations.vllm.settings import flag, number

KVTransferConfig = pytest.importorskip("vllm.config").KVTransferConfig


def _extra(**values):
    return KVTransferConfig(kv_connector="KVCodecConnector", kv_role="kv_both",
                            kv_connector_extra_config=values)


@pytest.mark.parametrize("value,want", [(True, True), (False, False), ("false", False),
                                        ("False", False), ("0", False), ("off", False),
                                        ("no", False), (0, False), ("true", True),
                                        ("1", True), ("yes", True), (1, True)])
def test_flags_read_as_written(value, want):
    """``"false"`` (a command line's JSON, or a quoted value) was true to ``bool()``."""
    assert flag(_extra(save=value), "save", True) is want


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, None, [True], ""])
def test_a_flag_that_is_neither_is_a_config_error(value):
    with pytest.raises(ConfigError, match="save must be true or false"):
        flag(_extra(save=value), "save", True)


def test_unset_settings_take_their_defaults():
    extra = _extra()
    assert flag(extra, "save", True) is True
    assert number(extra, "load_timeout_s", 5.0, minimum=0) == 5.0
    assert number(extra, "ttl_s", None, minimum=0, above=True) is None


@pytest.mark.parametrize("value,want", [("1e9", 10**9), (1024, 1024), ("2048", 2048),
                                        (3.0, 3)])
def test_numbers_written_as_strings_or_floats_are_numbers(value, want):
    got = number(_extra(max_bytes=value), "max_bytes", None, minimum=0, above=True,
                 integer=True)
    assert got == want and isinstance(got, int)


@pytest.mark.parametrize("value", ["abc", "nan", math.nan, math.inf, "-inf", -1, 0, True,
                                   [5], {"a": 1}, 2.5])
def test_a_number_out_of_its_range_is_a_config_error(value):
    """``"abc"`` was a ValueError at engine start; a NaN timeout timed every load out."""
    with pytest.raises(ConfigError, match="max_bytes must be an integer > 0"):
        number(_extra(max_bytes=value), "max_bytes", None, minimum=0, above=True,
               integer=True)


def test_a_port_past_65535_is_refused():
    with pytest.raises(ConfigError, match="<= 65535"):
        number(_extra(metrics_port=70000), "metrics_port", None, minimum=0,
               maximum=65535, integer=True)
