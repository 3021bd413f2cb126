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


@pytest.fixture
def deadline():
    """Fails a test that would block for good (what a FIFO's open did) instead of
    hanging the run."""
    import signal

    def late(*_):
        raise TimeoutError("still blocked after 60 s")
    old = signal.signal(signal.SIGALRM, late)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_pipe_given_as_a_path_is_read_as_a_stream(doc, tmp_path, deadline):
    """A named FIFO (or ``<(curl ...)``, a pipe under /dev/fd) decodes as it arrives,
    its writer coming after the reader (before: 'File or stream is not seekable')."""
    import os
    import threading

    fifo = tmp_path / "doc.kvc"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            for i in range(0, len(doc), 1 << 14):
                f.write(doc[i:i + (1 << 14)])
    writer = threading.Timer(0.5, write)
    writer.start()
    got = kvcodec.decode(str(fifo))
    writer.join()
    want = kvcodec.decode(doc)
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values,
                                                 want.keys + want.values))


def test_a_fifo_nobody_writes_is_a_clear_error_in_bounded_time(tmp_path, monkeypatch,
                                                                deadline):
    """Its open blocked until a writer came: ``kvcodec inspect``, ``decode`` and
    ``encode`` of a FIFO nobody writes hung for good."""
    import errno
    import os

    from click.testing import CliRunner

    from kvcodec.core import paths
    from kvcodec.errors import AccessError
    from kvcodec_cli.main import main

    monkeypatch.setattr(paths, "FIFO_WAIT_S", 0.2)
    fifo = tmp_path / "nobody.kvc"
    os.mkfifo(fifo)
    with pytest.raises(AccessError, match="no writer came to this FIFO in 0.2 s"):
        kvcodec.open(str(fifo))
    with pytest.raises(OSError) as err:
        paths.read_text(fifo)  # a document to encode, a prompt, a text to blend
    assert err.value.errno == errno.ETIMEDOUT
    r = CliRunner().invoke(main, ["inspect", str(fifo)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("error: ") and "no writer came" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_kv_safetensors_given_as_a_fifo_is_refused_not_waited_on(tmp_path):
    """safetensors maps its file: ``kvcodec encode x.safetensors`` of a FIFO waited in
    its open for good (in native code, which no signal interrupts: run in a process
    with a timeout); a pipe cannot be mapped, so it is a FormatError at once."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "kv.safetensors"
    os.mkfifo(fifo)
    code = ("from kvcodec.errors import FormatError\n"
            "from kvcodec.format.io import load_safetensors\n"
            "try:\n"
            f"    load_safetensors({str(fifo)!r})\n"
            "except FormatError as exc:\n"
            "    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith("refused: ") and "is not a regular file" in out.stdout, \
        out.stderr[-2000:]
    cli = "from kvcodec_cli.main import main; main()"
    r = subprocess.run([sys.executable, "-c", cli, "encode", str(fifo), "-o",
                        str(tmp_path / "kv.kvc")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "is not a regular file" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "kv.kvc").exists()
