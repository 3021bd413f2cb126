"""Every geometry a cache can have round-trips: one head or channel, one token, layers of
different spans, each dtype, values from zero to float16's edge, any chunk size, evicted
or not, decoded whole or by chunks into any dtype. Lossless is bit-exact; the rest are
finite tensors of the promised shapes; a request nothing can answer is a ShapeError."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcodec
from kvcodec.errors import ShapeError
from kvcodec.evict import evict

SCALES = {"normal": 1.0, "zeros": 0.0, "large": 1.5e4, "tiny": 1e-6, "subnormal": 1e-7}


@st.composite
def caches(draw):
    n_layers, heads = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    dim = draw(st.sampled_from([1, 2, 3, 8, 24, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    full = draw(st.integers(1, 80))
    spans = [draw(st.sampled_from([full, full, max(1, full - 7), 1])) for _ in range(n_layers)]
    scale = SCALES[draw(st.sampled_from(sorted(SCALES)))]
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))

    def make(t):
        x = torch.randn(1, heads, t, dim, generator=g) * scale
        if draw(st.booleans()):
            x[..., 0] *= 1e3  # an outlier channel
        return x.clamp(-6e4, 6e4).to(dtype)

    kv = [(make(t), make(t)) for t in spans]
    ids = list(range(max(spans))) if draw(st.booleans()) else None
    return kvcodec.KVCache([k for k, _ in kv], [v for _, v in kv], token_ids=ids)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(kv=caches(), config=st.sampled_from(["default", "cachegen", "lossless"]),
       chunk=st.sampled_from([None, 1, 3, 16]), policy=st.sampled_from([None, "knorm"]),
       ratio=st.sampled_from([0.1, 0.5]), dtype=st.sampled_from([None, torch.float16,
                                                                  torch.bfloat16]),
       data=st.data())
def test_any_geometry_round_trips(kv, config, chunk, policy, ratio, dtype, data):
    if policy is not None:
        kv = evict(kv, policy, ratio)
    with kvcodec.open(kvcodec.encode(kv, config=config, chunk_tokens=chunk)) as f:
        whole = f.decode()
        a = data.draw(st.integers(0, f.meta.num_chunks - 1))
        b = data.draw(st.integers(a + 1, f.meta.num_chunks))
        try:
            part = f.decode(slice(a, b), dtype=dtype)
        except ShapeError as exc:  # an evicted range where every head kept nothing
            assert policy is not None and "evicted all" in str(exc)
            part = None
    assert [t.shape for t in whole.keys] == [t.shape for t in kv.keys]
    for t in whole.keys + whole.values + ([] if part is None else part.keys + part.values):
        assert torch.isfinite(t.float()).all()
    if part is not None:
        assert all(t.dtype == (dtype or kv.dtype) for t in part.keys + part.values)
    if config == "lossless":
        assert all(torch.equal(a, b) for a, b in zip(whole.keys + whole.values,
                                                      kv.keys + kv.values))


def test_one_channel_of_lossless_float32_decodes():
    """The case the property above found: one head of one channel in float32, where a
    token's four byte planes sat 1 apart and torch refused to view them as a float."""
    k, v = torch.tensor([[[[1.5410]]]]), torch.tensor([[[[-0.2934]]]])
    with kvcodec.open(kvcodec.encode([(k, v)], config="lossless")) as f:
        out = f.decode()
    assert torch.equal(out.keys[0], k) and torch.equal(out.values[0], v)


def test_a_chunk_range_where_every_head_evicted_everything_is_a_clear_error():
    k = torch.tensor([[[[1.5410], [-0.2934]]]])
    kv = evict(kvcodec.KVCache([k], [-k]), "knorm", 0.1)  # keeps token 1 of 2
    with kvcodec.open(kvcodec.encode(kv, config="default", chunk_tokens=1)) as f:
        with pytest.raises(ShapeError, match="chunks 0..0 hold no tokens"):
            f.decode(0)
        assert f.decode(1).kept[0].tolist() == [[0]]


def test_a_lossy_value_near_float16s_edge_decodes_finite_into_float16():
    """Another case the property found: keys of +-60,000 coded with per-token steps
    decoded past 65,504 and became infinity in a float16 destination (attention NaN).
    Values bound for float16 are clamped to its range."""
    k = torch.tensor([60000.0, -60000.0, -60000.0, 60000.0, -60000.0]).reshape(1, 1, 5, 1)
    g = torch.Generator().manual_seed(0)
    kv = [(k, torch.randn(1, 1, 5, 1, generator=g) * 1.5e4)] + [
        (torch.randn(1, 1, 5, 1, generator=g) * 1.5e4,
         torch.randn(1, 1, 5, 1, generator=g) * 1.5e4) for _ in range(2)]
    with kvcodec.open(kvcodec.encode(kv, config="default")) as f:
        wide, half = f.decode(), f.decode(dtype=torch.float16)
    assert wide.keys[0].abs().max() > 65504  # what the codec gives back in float32
    assert all(torch.isfinite(t).all() for t in half.keys + half.values)
    assert half.keys[0].abs().max() == 65504
