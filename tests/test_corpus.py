"""The precompute job's corpus reader: input forms, formats, ids, skip reasons, count()."""
import gzip
import json
import re
import sys
import sysconfig
from pathlib import Path

import fsspec
import pytest

from kvcodec.errors import BackendError, ConfigError, KVCodecError
from kvcodec.jobs.corpus import Corpus, Document, Skipped

STDLIB = Path(sysconfig.get_paths()["stdlib"])
GPL = Path("/usr/share/common-licenses/GPL-3")


def real_docs(n):
    """n real English/Python documents: the GPL and stdlib modules."""
    docs = [GPL.read_text()] if GPL.is_file() else []
    docs += [p.read_text() for p in sorted(STDLIB.glob("[a-s]*.py"))[:n]]
    return docs[:n]


def items(corpus):
    got = list(corpus)
    assert corpus.count() == len(got)
    return got


def by_id(got):
    return {item.id: item for item in got}


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "docs"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".cache").mkdir()
    a, b, c = real_docs(3)
    (d / "a.txt").write_text(a)
    (d / "sub" / "b.md").write_text(b)
    (d / "sub" / "deeper" / "c.py").write_text(c)
    (d / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "caf\u00e9 au lait\n".encode())
    (d / "latin1.txt").write_bytes("Le caf\u00e9 est chaud.\n".encode("latin-1"))
    (d / "empty.txt").write_text(" \n\t\n")
    (d / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / ".hidden.txt").write_text("hidden")
    (d / ".cache" / "x.txt").write_text("hidden too")
    return d


def test_text_files_directory(text_dir):
    corpus = Corpus(text_dir)
    names = [Path(f).relative_to(text_dir).as_posix() for f in corpus.files]
    assert names == ["a.txt", "bom.txt", "empty.txt", "image.bin", "latin1.txt",
                     "sub/b.md", "sub/deeper/c.py"]
    got = by_id(items(corpus))
    a = got[str(text_dir / "a.txt")]
    assert isinstance(a, Document) and a.text == (text_dir / "a.txt").read_text()
    assert a.source == a.id
    assert got[str(text_dir / "bom.txt")].text == "caf\u00e9 au lait\n"
    latin = got[str(text_dir / "latin1.txt")]
    assert isinstance(latin, Skipped) and latin.reason == "not UTF-8 text (byte 0xe9 at offset 6)"
    assert got[str(text_dir / "empty.txt")].reason == "empty text"
    assert got[str(text_dir / "image.bin")].reason == "binary file (NUL byte at offset 8)"
    assert isinstance(got[str(text_dir / "sub" / "deeper" / "c.py")], Document)
    # Globs matching directories read the files below them, hidden ones left out.
    assert Corpus(f"{text_dir}/*").files == corpus.files
    assert Corpus(f"{text_dir}/**").files == corpus.files
    assert Corpus(f"{text_dir}/s?b").files == corpus.files[-2:]


def test_globs_order_duplicates_and_explicit_hidden_file(text_dir, monkeypatch):
    monkeypatch.chdir(text_dir.parent)
    corpus = Corpus(["docs/**/*.py", "docs/*.txt", str(text_dir / "sub"),
                     "file://" + str(text_dir / "a.txt"), "docs/.hidden.txt"])
    assert [Path(f).name for f in corpus.files] == [
        "c.py", "a.txt", "bom.txt", "empty.txt", "latin1.txt", "b.md", ".hidden.txt"]
    assert items(corpus) == items(Corpus(["docs/**/*.py", "docs/*.txt", "docs/sub",
                                          "docs/.hidden.txt"]))


@pytest.mark.parametrize("spec", ["nope/*.txt", "nope.jsonl", "empty_dir", "only_hidden"])
def test_input_matching_nothing_is_a_config_error(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / ".x.txt").write_text("x")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(ConfigError, match=spec.replace("*", r"\*")):
        Corpus(["ok.txt", spec])
    with pytest.raises(ConfigError):
        Corpus([])


JSONL_ROWS = [
    json.dumps({"text": "First document.", "id": "doc-a"}),           # 1
    "",                                                                # 2 blank
    '{"text": "broken',                                                # 3
    json.dumps(["a", "list"]),                                         # 4
    json.dumps({"body": "no text field", "id": "doc-b"}),              # 5
    "   ",                                                             # 6 blank
    json.dumps({"text": None, "id": "doc-c"}),                         # 7
    json.dumps({"text": "  \n ", "id": "doc-d"}),                      # 8
    json.dumps({"text": 42, "id": "doc-e"}),                           # 9
    json.dumps({"text": "  Integer id,\n\tkept verbatim.  ", "id": 17}),   # 10
    json.dumps({"text": "float id", "id": 1.5}),                       # 11
    json.dumps({"text": "no id"}),                                     # 12
    '{"text": "lone \\ud800 surrogate", "id": "doc-f"}',               # 13
]


def write_jsonl(path, rows, bad_line=True):
    data = "\n".join(rows).encode() + b"\n"
    if bad_line:
        data += '{"text": "caf\u00e9", "id": "doc-g"}\n'.encode("latin-1")  # line 14
    data += b"\n"
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_jsonl_rows_and_reasons(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, JSONL_ROWS)
    src = str(path)
    got = items(Corpus(path))
    assert [item.id for item in got] == [f"{src}:{n}" for n in (1, 3, 4, 5, 7, 8, 9, 10, 11, 12,
                                                                 13, 14)]
    assert got[0] == Document(f"{src}:1", "First document.", src)
    assert [type(i).__name__ for i in got].count("Document") == 4  # lines 1, 10, 11, 12
    reasons = {int(i.id.rsplit(":", 1)[1]): i.reason for i in got if isinstance(i, Skipped)}
    assert "lone surrogate (U+D800" in reasons.pop(13)
    assert reasons == {3: "line 3: invalid JSON (Unterminated string starting at column 10)",
                       4: "line 4: not a JSON object (an array)", 5: "line 5: no field 'text'",
                       7: "line 7: 'text' is null", 8: "line 8: empty text",
                       9: "line 9: 'text' is a number, not a string",
                       14: "line 14: not UTF-8 text (byte 0xe9 at offset 13)"}
    assert got[7].text == "  Integer id,\n\tkept verbatim.  "  # stored text, unstripped


def test_jsonl_id_field(tmp_path):
    path = tmp_path / "rows.ndjson"
    write_jsonl(path, JSONL_ROWS)
    got = items(Corpus(path, id_field="id"))
    ids = [item.id for item in got]
    assert ids == ["doc-a", f"{path}:3", f"{path}:4", "doc-b", "doc-c", "doc-d", "doc-e", "17",
                   f"{path}:11", f"{path}:12", "doc-f", f"{path}:14"]
    assert got[3].reason == "line 5: no field 'text'"
    assert got[7] == Document("17", "  Integer id,\n\tkept verbatim.  ", str(path))
    assert got[8].reason == "line 11: 'id' is a non-integer number, not a string or integer"
    assert got[9].reason == "line 12: no field 'id'"
    custom = items(Corpus(path, text_field="body", id_field="id"))
    assert [(i.id, type(i).__name__) for i in custom if i.id.startswith("doc-")] == [
        ("doc-a", "Skipped"), ("doc-b", "Document"), ("doc-c", "Skipped"), ("doc-d", "Skipped"),
        ("doc-e", "Skipped"), ("doc-f", "Skipped")]


def test_compressed_jsonl_and_text(tmp_path):
    docs = real_docs(40)
    rows = [json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)]
    write_jsonl(tmp_path / "big.JSONL.gz", rows, bad_line=False)
    (tmp_path / "gpl.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    corpus = Corpus([tmp_path / "big.JSONL.gz", tmp_path / "gpl.txt.gz"], id_field="id")
    got = items(corpus)
    assert [d.text for d in got] == docs + [docs[0]]
    assert [d.id for d in got[:3]] == ["0", "1", "2"]
    # A damaged gzip stream is a skip, not a crash, and count() still agrees.
    packed = gzip.compress(b"\n".join(r.encode() for r in rows))
    (tmp_path / "bad.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (tmp_path / "bad.txt.gz").write_bytes(b"\x1f\x8b not really gzip")
    got = items(Corpus([tmp_path / "bad.jsonl.gz", tmp_path / "bad.txt.gz"], id_field="id"))
    assert len(got) > 10 and all(isinstance(d, Document) for d in got[:-2])
    assert got[-2].reason.startswith("cannot decompress after line")
    assert got[-1].id == str(tmp_path / "bad.txt.gz") and "cannot decompress" in got[-1].reason


def test_every_compression_reads_jsonl_by_line_and_text(tmp_path):
    """.gz, .bz2, .xz, .lzma and .zst (several frames too): JSONL line by line (a zstd
    stream used to fail, having no readline), text whole."""
    import bz2
    import lzma

    import zstandard

    docs = real_docs(6)
    data = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)).encode()
    half = data.index(b"\n", len(data) // 2) + 1
    zstd = zstandard.ZstdCompressor()
    packers = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
               "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
               "zst": zstd.compress}
    for ext, pack in packers.items():
        (tmp_path / f"rows.jsonl.{ext}").write_bytes(pack(data))
        (tmp_path / f"doc.txt.{ext}").write_bytes(pack(docs[0].encode()))
    (tmp_path / "frames.jsonl.zst").write_bytes(zstd.compress(data[:half])
                                                + zstd.compress(data[half:]))
    for ext in [*packers, "frames"]:
        rows = f"frames.jsonl.zst" if ext == "frames" else f"rows.jsonl.{ext}"
        inputs = [tmp_path / rows] + ([] if ext == "frames" else [tmp_path / f"doc.txt.{ext}"])
        got = items(Corpus(inputs, id_field="id"))
        assert [d.text for d in got] == docs + ([] if ext == "frames" else [docs[0]]), ext
        assert [d.id for d in got[:6]] == [str(i) for i in range(6)]


def test_damaged_compressed_files_are_skipped(tmp_path):
    """A damaged or truncated .bz2 / .zst / .xz file is a skip, like a damaged .gz,
    and the job goes on (a bz2 or zstd error used to end it; a zstd file cut short was
    read as a shorter document)."""
    import bz2
    import lzma

    import zstandard

    docs = real_docs(20)
    data = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    text = docs[0].encode()
    packers = {"bz2": bz2.compress, "xz": lzma.compress,
               "zst": zstandard.ZstdCompressor().compress}
    for ext, pack in packers.items():
        rows, doc = pack(data), pack(text)
        (tmp_path / f"cut.jsonl.{ext}").write_bytes(rows[:len(rows) * 3 // 4])
        (tmp_path / f"cut.txt.{ext}").write_bytes(doc[:len(doc) // 2])
        (tmp_path / f"garbage.txt.{ext}").write_bytes(doc[:6] + b"\xff" * 64)
    (tmp_path / "tail.txt.zst").write_bytes(packers["zst"](text) + b"junk")
    for ext in packers:
        got = items(Corpus([tmp_path / f"cut.jsonl.{ext}", tmp_path / f"cut.txt.{ext}",
                            tmp_path / f"garbage.txt.{ext}"]))
        rows = [i for i in got if i.source.endswith(f"cut.jsonl.{ext}")]
        assert all(isinstance(i, Document) for i in rows[:-1]), ext
        assert rows[-1].reason.startswith("cannot decompress after line"), (ext, rows[-1])
        assert rows[-1].id == str(tmp_path / f"cut.jsonl.{ext}")
        assert [i.text for i in rows[:-1]] == docs[:len(rows) - 1]
        for name in ("cut.txt", "garbage.txt"):
            skip = by_id(got)[str(tmp_path / f"{name}.{ext}")]
            assert isinstance(skip, Skipped) and skip.reason.startswith("cannot decompress ("), (
                ext, name, skip)
    tail = items(Corpus(tmp_path / "tail.txt.zst"))
    assert len(tail) == 1 and tail[0].reason.startswith("cannot decompress (")


def test_a_compressed_file_that_cannot_be_read_stops_the_job(tmp_path, monkeypatch):
    """Damaged data is skipped, but a failure to read the file itself (a disk or
    network error) is not taken for damage: it is raised, as for an uncompressed file."""
    import bz2
    import errno

    from fsspec.implementations.local import LocalFileOpener

    path = tmp_path / "doc.txt.bz2"
    path.write_bytes(bz2.compress(real_docs(1)[0].encode()))
    corpus = Corpus(path)

    error = OSError(errno.EIO, "Input/output error")

    def failing_read(self, *args):
        raise error

    monkeypatch.setattr(LocalFileOpener, "read", failing_read)
    with pytest.raises(OSError, match="Input/output error"):
        list(corpus)
    # Another error of a filesystem (a remote one's missing credentials): one clear line.
    error = RuntimeError("Unable to locate credentials")
    with pytest.raises(BackendError, match=r"cannot read .*doc.txt.bz2: RuntimeError: Unable"):
        list(corpus)


@pytest.fixture
def parquet_dir(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "pq"
    d.mkdir()
    docs = real_docs(6)
    texts = [docs[0], None, "   ", docs[1], docs[2], docs[3], docs[4], docs[5]]
    ids = [10, 11, 12, 13, None, 15, 16, 17]
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string()),
                      "n": pa.array(range(8), pa.int32())})
    pq.write_table(table, d / "a.parquet", row_group_size=3)  # several row groups
    pq.write_table(pa.table({"body": ["x"], "lang": ["en"]}), d / "b.PARQUET")
    (d / "c.parquet").write_bytes(b"not parquet at all, just some words")
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), d / "d.parquet")
    return d, texts


def test_parquet(parquet_dir):
    d, texts = parquet_dir
    src = str(d / "a.parquet")
    got = items(Corpus(d))
    assert [i.id for i in got[:8]] == [f"{src}#{r}" for r in range(8)]
    assert [i.text for i in got[:8] if isinstance(i, Document)] == [
        t for t in texts if t and t.strip()]
    assert got[1].reason == "row 1: 'text' is null"
    assert got[2].reason == "row 2: empty text"
    assert got[8] == Skipped(str(d / "b.PARQUET"), str(d / "b.PARQUET"),
                             "no column 'text' (columns: body, lang)")
    assert got[9].id == str(d / "c.parquet")
    assert got[9].reason.startswith("not a valid Parquet file (")
    assert [i.reason for i in got[10:]] == ["row 0: 'text' is a number, not a string",
                                            "row 1: 'text' is a number, not a string"]
    assert len(got) == 12


def test_parquet_id_field(parquet_dir):
    d, texts = parquet_dir
    got = items(Corpus(d / "a.parquet", id_field="id"))
    assert [i.id for i in got] == ["10", "11", "12", "13", f"{d / 'a.parquet'}#4", "15", "16",
                                   "17"]
    assert got[4].reason == "row 4: 'id' is null"
    missing = items(Corpus(d / "a.parquet", id_field="doc_id"))
    assert len(missing) == 1 and missing[0].reason.startswith("no column 'doc_id' (columns: id,")


def test_missing_pyarrow_is_reported_up_front(parquet_dir, monkeypatch):
    import sys
    d, _ = parquet_dir
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(BackendError, match="pyarrow"):
        Corpus(d)
    assert issubclass(BackendError, KVCodecError)


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    docs = real_docs(3)
    try:
        fs.pipe("/kvc-corpus/a.txt", docs[0].encode())
        fs.pipe("/kvc-corpus/part/b.jsonl", "\n".join(
            json.dumps({"text": t}) for t in docs[1:]).encode())
        fs.pipe("/kvc-corpus/.meta/skip.txt", b"hidden")
        corpus = Corpus("memory://kvc-corpus")
        assert corpus.files == ["memory:///kvc-corpus/a.txt", "memory:///kvc-corpus/part/b.jsonl"]
        got = items(corpus)
        assert [(i.id, i.text) for i in got] == [
            ("memory:///kvc-corpus/a.txt", docs[0]),
            ("memory:///kvc-corpus/part/b.jsonl:1", docs[1]),
            ("memory:///kvc-corpus/part/b.jsonl:2", docs[2])]
        assert Corpus("memory://kvc-corpus/*/*.jsonl").files == corpus.files[1:]
        with pytest.raises(ConfigError, match="memory://kvc-corpus/none"):
            Corpus("memory://kvc-corpus/none")
    finally:
        fs.rm("/kvc-corpus", recursive=True)


def test_bad_urls_and_remote_errors_are_clear(monkeypatch):
    """An unknown protocol, a protocol whose package is missing, and a remote
    filesystem's own error while listing (no credentials) are one-line KVCodecErrors
    (they were a ValueError, an ImportError and botocore's error)."""
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    with pytest.raises(ConfigError, match="corpus input foo://x: Protocol not known: foo"):
        Corpus("foo://x")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
        m.delitem(_registry, "s3", raising=False)
        with pytest.raises(BackendError, match=r"s3://b/x.jsonl: .*s3fs.*"
                                               r"pip install kvcodec-toolkit\[s3\]"):
            Corpus("s3://b/x.jsonl")

    def no_credentials(self, *args, **kwargs):
        raise RuntimeError("Unable to locate credentials")

    monkeypatch.setattr(MemoryFileSystem, "exists", no_credentials)
    monkeypatch.setattr(MemoryFileSystem, "glob", no_credentials)
    for spec in ("memory://corpus/x.jsonl", "memory://corpus/*.jsonl"):
        with pytest.raises(BackendError, match=f"corpus input {re.escape(spec)}: cannot list "
                                               r"it \(RuntimeError: Unable to locate"):
            Corpus(spec)


def test_s3_via_moto(s3_endpoint):
    """On the moto_server of conftest (a subprocess: moto in this process would import
    flask, whose proxies break vLLM's module scan in later tests)."""
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem.clear_instance_cache()
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("corpus-bucket")
    try:
        docs = real_docs(2)
        fs.pipe("corpus-bucket/c/a.jsonl", (json.dumps({"text": docs[0], "id": "a"}) + "\n\n"
                                            + json.dumps({"text": ""}) + "\n").encode())
        fs.pipe("corpus-bucket/c/sub/b.txt", docs[1].encode())
        fs.pipe("corpus-bucket/c/.tmp/x.txt", b"hidden")
        corpus = Corpus("s3://corpus-bucket/c", storage_options=options)
        assert corpus.files == ["s3://corpus-bucket/c/a.jsonl", "s3://corpus-bucket/c/sub/b.txt"]
        got = items(corpus)
        assert [i.id for i in got] == ["s3://corpus-bucket/c/a.jsonl:1",
                                       "s3://corpus-bucket/c/a.jsonl:3",
                                       "s3://corpus-bucket/c/sub/b.txt"]
        assert got[0].text == docs[0] and got[2].text == docs[1]
        assert Corpus("s3://corpus-bucket/c/*.jsonl", storage_options=options).files == [
            "s3://corpus-bucket/c/a.jsonl"]
        with pytest.raises(ConfigError):
            Corpus("s3://corpus-bucket/d/*.jsonl", storage_options=options)
    finally:
        fs.rm("corpus-bucket", recursive=True)


@pytest.mark.parametrize("suffix", [".zst", ".bz2", ".xz"])
def test_other_compressions_read_by_lines_and_skip_damage(tmp_path, suffix):
    """Each compression reads JSONL line by line (zstd could not), several frames or
    streams back to back, and damaged or truncated data is a skip (zstd and bz2 raised)."""
    import bz2
    import lzma

    import zstandard

    pack = {".zst": zstandard.ZstdCompressor(write_checksum=True).compress,
            ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    docs = real_docs(6)
    rows = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    good = pack(rows[:len(rows) // 2]) + pack(rows[len(rows) // 2:])
    (tmp_path / f"good.jsonl{suffix}").write_bytes(good)
    assert [d.text for d in items(Corpus(tmp_path / f"good.jsonl{suffix}"))] == docs
    whole = pack(rows)
    for name, data in [("cut", whole[:len(whole) * 3 // 4]),
                       ("flip", whole[:40] + bytes([whole[40] ^ 0x55]) + whole[41:]),
                       ("junk", b"not compressed at all, " * 8)]:
        for kind in ("jsonl", "txt"):
            path = tmp_path / f"{name}.{kind}{suffix}"
            path.write_bytes(data)
            got = items(Corpus(path))
            assert got and isinstance(got[-1], Skipped), (name, kind, got[-1:])
            assert "cannot decompress" in got[-1].reason


def test_damaged_parquet_is_skipped_and_io_failures_still_raise(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    import zstandard

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", "two"]}), buf)
    data = buf.getvalue()
    (tmp_path / "ok.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    assert [d.text for d in items(Corpus(tmp_path / "ok.parquet.zst"))] == ["one", "two"]
    # A footer that does not parse: pyarrow raises OSError for it, which is a skip here.
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    (tmp_path / "bad.parquet").write_bytes(data[:footer] + b"\xff" * 8 + data[footer + 8:])
    got = items(Corpus(tmp_path / "bad.parquet"))
    assert len(got) == 1 and got[0].reason.startswith("not a valid Parquet file"), got
    # An I/O failure reading the file is not: it raises.
    from fsspec.implementations.local import LocalFileOpener

    def fail(self, *args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(LocalFileOpener, "read", fail)
    with pytest.raises(OSError, match="Input/output"):
        list(Corpus(tmp_path / "ok.parquet.zst"))
    monkeypatch.setattr(LocalFileOpener, "readinto", fail, raising=False)
    with pytest.raises(OSError, match="Input/output"):
        list(Corpus(tmp_path / "bad.parquet"))


def test_documents_over_the_text_cap_are_skipped_in_bounded_memory(tmp_path, parquet_dir,
                                                                   monkeypatch):
    """A text file, a JSONL line or a compressed Parquet file with no end in sight (a gzip
    bomb, /dev/zero, a line with no newline) was read whole, until memory ran out."""
    import kvcodec.jobs.corpus as corpus_mod
    from kvcodec.core.paths import MAX_TEXT_BYTES

    big = MAX_TEXT_BYTES + 1
    (tmp_path / "bomb.txt.gz").write_bytes(gzip.compress(b"a" * big, compresslevel=1))
    lines = [b'{"text": "first"}', b'{"text": "' + b"b" * big + b'"}', b'{"text": "after"}',
             b'{"text": "' + b"c" * (MAX_TEXT_BYTES - 12) + b'"}', b'{"text": "last"}']
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines), compresslevel=1))
    got = items(Corpus([tmp_path / "bomb.txt.gz", tmp_path / "rows.jsonl.gz"]))
    assert got[0].reason == "text over 64 MiB (a cache holds at most 2**24 tokens)"
    src = str(tmp_path / "rows.jsonl.gz")
    assert got[1].text == "first" and got[3].text == "after" and got[5].text == "last"
    assert got[2] == Skipped(f"{src}:2", src, "line 2: line over 64 MiB (a cache holds at most "
                                              "2**24 tokens)")
    assert len(got[4].text) == MAX_TEXT_BYTES - 12  # 64 MiB with its newline: kept
    assert [d.id for d in got[3:]] == [f"{src}:3", f"{src}:4", f"{src}:5"]
    if sys.platform.startswith("linux"):
        assert items(Corpus(["/dev/zero"]))[0].reason.startswith("text over 64 MiB")
    d, _ = parquet_dir
    (tmp_path / "a.parquet.gz").write_bytes(gzip.compress((d / "a.parquet").read_bytes()))
    monkeypatch.setattr(corpus_mod, "_PARQUET_INFLATE", 1000)
    got = items(Corpus([tmp_path / "a.parquet.gz"]))
    assert len(got) == 1 and got[0].reason.startswith("decompresses to over 0 GiB")


def test_a_fifo_among_the_corpus_files_is_skipped_not_waited_on(tmp_path):
    """A FIFO in a corpus directory (or named directly) blocked the job in its open for
    good (a JSONL one already in ``count()``); it is left out with a reason, like any
    unusable file, and the job goes on."""
    import os
    import signal

    (tmp_path / "a.txt").write_text("a real document")
    os.mkfifo(tmp_path / "b.jsonl")
    os.mkfifo(tmp_path / "c.txt")

    def late(*_):
        raise TimeoutError("the corpus waited on a FIFO")
    old = signal.signal(signal.SIGALRM, late)
    signal.alarm(60)
    try:
        corpus = Corpus([str(tmp_path), str(tmp_path / "c.txt")])
        assert corpus.count() == 3
        items = list(corpus)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert items[0] == Document(str(tmp_path / "a.txt"), "a real document",
                                str(tmp_path / "a.txt"))
    assert [(type(i), i.id) for i in items[1:]] == [
        (Skipped, str(tmp_path / "b.jsonl")), (Skipped, str(tmp_path / "c.txt"))]
    assert all(i.reason.startswith("a FIFO or socket, not a file") for i in items[1:])
