"""Opening .kvc data from forward-only streams: decode starts before the bytes end."""
import io

import pytest
import torch

import kvcodec
from kvcodec.format.stream import RateLimitedReader
from kvcodec.format.streaming import ChunkStreamer


class Pipe:
    """Forward-only, like a socket file: no seek, reads come in small pieces."""

    def __init__(self, data, piece=4096):
        self._b, self.piece, self.delivered = io.BytesIO(data), piece, 0

    def read(self, n=-1):
        out = self._b.read(min(n if n and n > 0 else self.piece, self.piece))
        self.delivered += len(out)
        return out


@pytest.fixture(scope="module")
def doc(kv_600):
    return kvcodec.encode(kv_600, config="default")


def test_stream_decodes_like_a_file(doc):
    full = kvcodec.decode(doc)
    with kvcodec.open(Pipe(doc)) as f:
        got = f.decode()
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, full.keys + full.values))


def test_iter_chunks_fills_preallocated_buffers_while_bytes_arrive(doc):
    full = kvcodec.decode(doc)
    pipe = Pipe(doc)
    # ~0.3 s on the wire: chunk 0 decodes (milliseconds) long before the last byte.
    f = kvcodec.open(RateLimitedReader(pipe, bits_per_s=len(doc) * 8 / 0.3))
    out = kvcodec.KVCache([torch.zeros_like(k) for k in full.keys],
                          [torch.zeros_like(v) for v in full.values])
    seen = []
    for chunk, t0, t1 in f.iter_chunks(out=out):
        seen.append((chunk, t0, t1, pipe.delivered))
    assert [s[:3] for s in seen] == [(0, 0, 256), (1, 256, 512), (2, 512, 600)]
    # Chunk 0 was decoded and handed out before the stream was read to its end.
    assert seen[0][3] < len(doc)
    assert all(torch.equal(a, b) for a, b in zip(out.keys + out.values, full.keys + full.values))


def test_iter_chunks_over_bytes_already_there(doc):
    """An instant source: the chunks that have arrived decode together, every chunk is
    still yielded in order, and the cache is the file's."""
    full = kvcodec.decode(doc)
    f = kvcodec.open(Pipe(doc))
    got = f.empty_cache()
    spans = [s for s in f.iter_chunks(out=got)]
    assert spans == [(0, 0, 256), (1, 256, 512), (2, 512, 600)]
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, full.keys + full.values))


def test_a_slow_stream_decodes_the_last_chunk_in_parts_as_its_layers_arrive(doc):
    """Where the decoder keeps up with the link, a decode takes the layers of a chunk
    that have arrived, so what is left after the last byte is the last layers' decode,
    not the whole last chunk's; the cache is the file's."""
    full = kvcodec.decode(doc)
    f = kvcodec.open(RateLimitedReader(Pipe(doc), bits_per_s=len(doc) * 8 / 0.6))
    out = f.empty_cache()
    streamer = ChunkStreamer(f, range(f.num_chunks), out, threads=0)
    assert [c for c, _, _ in streamer] == [0, 1, 2]
    n, last = len(f.meta.streams), f.num_chunks - 1
    parts = [(s0, s1) for d in streamer.decodes for c, s0, s1 in d if c == last]
    assert len(parts) > 1 and parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # in order, no gaps
    assert all(torch.equal(a, b) for a, b in zip(out.keys + out.values, full.keys + full.values))


def test_truncated_stream_fails_at_the_missing_chunk(doc):
    f = kvcodec.open(Pipe(doc[: int(len(doc) * 0.7)]))
    done = []
    with pytest.raises(kvcodec.TruncatedError, match="stream ended"):
        for chunk, _, _ in f.iter_chunks():
            done.append(chunk)
    assert done and done[0] == 0


def test_rate_limited_reader_counts_bytes(doc):
    r = RateLimitedReader(io.BytesIO(doc), bits_per_s=8e9)
    with kvcodec.open(r) as f:
        f.decode()
    assert r.bytes_read == len(doc)
