"""Any field of a shipped or calibrated config set to a hostile value (NaN, infinities,
huge or negative numbers, booleans, strings, lists, null) is a ConfigError or encodes a
file that decodes to finite values: never another exception, never a file its own
reader refuses."""
import copy
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcodec
from kvcodec.core.paths import CONFIG_DIR
from kvcodec.errors import ConfigError

HOSTILE = [math.nan, math.inf, -math.inf, -1, 0, 1, 3, 255, 256, 65536, 2**40, 1e300,
           -1e-300, 0.5, True, False, None, "x", [], {}, [1, 2]]
CALIBRATED = str(CONFIG_DIR / "calibrated" / "smollm2-135m-instruct.json")


def _paths(obj, prefix=()):
    items = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, list) else ())
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["default", "cachegen", "lossless", CALIBRATED]), data=st.data())
def test_a_hostile_field_is_a_config_error_or_a_file_that_reads(name, data):
    cfg = copy.deepcopy(kvcodec.load_config(name))
    where = data.draw(st.sampled_from(list(_paths(cfg))))
    holder = cfg
    for k in where[:-1]:
        holder = holder[k]
    holder[where[-1]] = data.draw(st.sampled_from(HOSTILE))
    layers, heads, dim = (30, 3, 64) if name == CALIBRATED else (3, 2, 16)
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(1, heads, 20, dim, generator=g), torch.randn(1, heads, 20, dim,
                                                                   generator=g))
          for _ in range(layers)]
    try:
        data_ = kvcodec.encode(kv, config=kvcodec.load_config(cfg))
    except ConfigError:
        return
    with kvcodec.open(data_) as f:
        out = f.decode()
    assert all(torch.isfinite(t).all() for t in out.keys + out.values)
