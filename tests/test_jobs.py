"""Corpus jobs (kvcodec.jobs, `kvcodec precompute`): real documents, real model, real
stores; resumable after SIGKILL, idempotent, the same store from every runner."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kvcodec
from kvcodec.errors import ConfigError
from kvcodec.jobs import JobSpec, precompute
from kvcodec.jobs import engine as engine_mod
from kvcodec.models.batch import capture_batch
from kvcodec.models.capture import default_anchor
from kvcodec.store import ChunkStore

ROOT = Path(__file__).resolve().parent.parent


def _passages(text: str, sizes) -> list:
    """Consecutive passages of ``text`` of the given character lengths."""
    out, at = [], 0
    for n in sizes:
        out.append(text[at:at + n])
        at += n
    return out


@pytest.fixture(scope="module")
def corpus_docs(texts):
    """Ten real passages (~100-400 tokens each): a small RAG corpus."""
    sizes = [900, 400, 1500, 700, 1200, 500, 1000, 800, 600, 1100]
    return [{"id": f"doc{i}", "text": t} for i, t in
            enumerate(_passages(texts["gpl3"], sizes))]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, corpus_docs):
    """The corpus as JSONL, with bad rows between the good ones."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    bad = ['{"id": "broken", "text": ', '["not", "an object"]', '{"id": "no-text"}',
           '{"id": "null", "text": null}', '{"id": "blank", "text": "  \\n "}']
    lines = []
    for i, d in enumerate(corpus_docs):
        lines.append(json.dumps(d))
        if i < len(bad):
            lines.append(bad[i])
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, lm, jsonl):
    """The store an uninterrupted in-process job writes: what every other run must equal."""
    store = tmp_path_factory.mktemp("reference")
    summary = precompute([str(jsonl)], store, model=lm, id_field="id", progress=False,
                         spec=JobSpec(batch_tokens=1024))
    return store, summary


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _decoded(root: Path, lm) -> dict:
    """Every entry of the store at ``root``, decoded (read through the store, which
    resolves the shared tables it was coded with)."""
    store = ChunkStore(root, lm.fingerprint)
    out = {}
    for loc in store.entries():
        with kvcodec.open(loc.read_bytes(), tables=store.shared_tables) as f:
            out[str(loc.relative_to(root))] = f.decode()
    return out


def test_jsonl_job_stores_good_rows_and_reports_bad_ones(reference, lm, corpus_docs):
    store_dir, s = reference
    assert (s.documents, s.done, s.skipped, s.failed) == (15, 10, 5, 0)
    reasons = " ".join(p["reason"] for p in s.problems)
    assert "JSON" in reasons and "null" in reasons and "empty" in reasons
    store = ChunkStore(store_dir, lm.fingerprint)
    for d in corpus_docs:
        ids = lm.tokenizer(d["text"], add_special_tokens=False)["input_ids"]
        assert len(store.lookup(ids, partial=True)) == len(store.keys(ids))
    assert s.tokens_prefilled == s.tokens > 0
    assert s.chunks_new == sum(len(store.keys(lm.tokenizer(d["text"], add_special_tokens=False)
                                              ["input_ids"])) for d in corpus_docs)
    assert s.ratio_vs_fp16 > 4 and 0 < s.codec_share < 1
    # A stored chunk loads back as the model's own KV, within the codec's error.
    ids = lm.tokenizer(corpus_docs[2]["text"], add_special_tokens=False)["input_ids"]
    got = store.load_prefix(ids)
    ref = kvcodec.capture_kv(lm, token_ids=ids[:got.num_tokens])
    coded = kvcodec.decode(kvcodec.encode(ref))
    assert got.num_tokens == 256
    for layer in (3, 20):
        for a, b, r in ((got.keys, coded.keys, ref.keys), (got.values, coded.values, ref.values)):
            err = (a[layer] - r[layer]).abs().mean()
            assert err < 1.1 * (b[layer] - r[layer]).abs().mean() + 1e-3


def test_rerun_prefills_nothing_and_stores_nothing(reference, lm, jsonl, monkeypatch):
    store_dir, _ = reference
    before = _files(store_dir)

    def no_prefill(*a, **k):
        raise AssertionError("a finished document was prefilled again")

    monkeypatch.setattr(engine_mod, "capture_batch", no_prefill)
    s = precompute([str(jsonl)], store_dir, model=lm, id_field="id", progress=False,
                   spec=JobSpec(batch_tokens=1024))
    assert (s.already_stored, s.tokens_prefilled, s.chunks_new, s.bytes_new) == (10, 0, 0, 0)
    assert _files(store_dir) == before


def test_missing_entries_are_refilled_without_manifest(reference, lm, jsonl, tmp_path):
    """No manifest, some entries gone: only windows with a missing entry are prefilled,
    and the store ends byte-identical to the reference (batching does not change KV)."""
    store_dir, ref = reference
    copy = tmp_path / "store"
    for rel, data in _files(store_dir).items():
        if rel.startswith("manifest/"):
            continue
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    entries = sorted(p for p in copy.rglob("*.kvc"))
    for p in entries[::3]:
        p.unlink()
    s = precompute([str(jsonl)], copy, model=lm, id_field="id", progress=False,
                   spec=JobSpec(batch_tokens=4096))
    assert 0 < s.tokens_prefilled < ref.tokens_prefilled and s.already_stored > 0
    assert s.chunks_new == len(entries[::3])
    assert _files(copy) == _files(store_dir)


def test_killed_job_resumes_to_a_complete_store(reference, jsonl, tmp_path):
    """SIGKILL while entries are being written, then the same command again: every
    entry stored once, each whole, and the store equals an uninterrupted job's."""
    store_dir, _ = reference
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "kvcodec_cli.main", "precompute", str(jsonl), "--store",
           str(out), "--id-field", "id", "--batch-tokens", "1024", "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.rglob("*.kvc"))) >= 3:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    killed = len(list(out.rglob("*.kvc")))
    assert 3 <= killed < len(list(store_dir.rglob("*.kvc")))
    done = subprocess.run(cmd + ["--report", str(tmp_path / "report.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == 0 and report["chunks_new"] > 0
    entries = {k: v for k, v in _files(out).items() if not k.endswith(".tmp")}
    assert entries == _files(store_dir)
    for path in out.rglob("*.kvc"):
        kvcodec.open(path).close()  # whole and checksummed


def test_ray_runner_writes_the_same_store(reference, lm, jsonl, tmp_path):
    ray = pytest.importorskip("ray")
    store_dir, ref = reference
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = precompute([str(jsonl)], tmp_path / "ray", runner="ray", num_workers=2,
                       id_field="id", progress=False, spec=JobSpec(batch_tokens=1024))
    finally:
        ray.shutdown()
    assert (s.documents, s.done, s.skipped) == (ref.documents, ref.done, ref.skipped)
    # The same entries, holding the same values. Their bytes may differ: each worker
    # codes with the store's shared tables, which the first to store a document made,
    # and which that is depends on the race (an entry decodes the same either way).
    got, want = _decoded(tmp_path / "ray", lm), _decoded(store_dir, lm)
    assert got.keys() == want.keys()
    for name, kv in got.items():
        assert all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values,
                                                     want[name].keys + want[name].values))


def test_batch_rows_equal_single_captures(lm, texts):
    ids = lm.tokenizer(texts["python_license"], add_special_tokens=False)["input_ids"]
    rows = [ids[:300], ids[300:420], ids[420:700]]
    batch = capture_batch(lm, rows)
    for row, kv in zip(rows, batch):
        alone = capture_batch(lm, [row])[0]
        assert all(torch.equal(a, b) for a, b in zip(kv.keys, alone.keys))
        assert all(torch.equal(a, b) for a, b in zip(kv.values, alone.values))
        assert torch.equal(kv.extra["head_importance"], alone.extra["head_importance"])
    # The same KV as a plain capture, up to kernel rounding; importance too.
    ref = kvcodec.capture_kv(lm, token_ids=rows[1])
    torch.testing.assert_close(batch[1].keys[5], ref.keys[5], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(batch[1].importance, ref.importance, atol=1e-4, rtol=1e-2)


def test_long_documents_are_cut_into_windows_at_chunk_boundaries(lm, texts, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(texts["python_license"][:6000])
    ids = lm.tokenizer(doc.read_text(), add_special_tokens=False)["input_ids"]
    s = precompute([str(doc)], tmp_path / "s", model=lm, progress=False,
                   spec=JobSpec(max_tokens=600))
    assert s.done == 1 and s.tokens == len(ids)
    store = ChunkStore(tmp_path / "s", lm.fingerprint)
    for w in range(0, len(ids), 512):  # 600 -> windows of 512 (two chunks)
        part = ids[w:w + 512]
        assert len(store.lookup(part, partial=True)) == len(store.keys(part))
    assert store.lookup(ids) == store.lookup(ids[:512])  # a window is its own prefix


def test_independent_and_evicted_jobs(lm, texts, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    parts = _passages(texts["python_license"], [1200, 1500])
    for i, p in enumerate(parts):
        (docs / f"{i}.txt").write_text(p)
    s = precompute([str(docs)], tmp_path / "ind", model=lm, progress=False,
                   spec=JobSpec(independent=True))
    assert s.done == 2
    store = ChunkStore(tmp_path / "ind", lm.fingerprint)
    anchor = default_anchor(lm.tokenizer)
    for p in parts:
        assert store.document(lm.tokenizer(p, add_special_tokens=False)["input_ids"], anchor)
    s = precompute([str(docs / "*.txt")], tmp_path / "ev", model=lm, progress=False,
                   spec=JobSpec(evict="snapkv:0.5"))
    assert s.done == 2 and s.chunks_new == 2
    store = ChunkStore(tmp_path / "ev", lm.fingerprint)
    ids = lm.tokenizer(parts[1], add_special_tokens=False)["input_ids"]
    loc = store.evicted(ids, "snapkv:0.5")
    kv = kvcodec.decode(loc)
    assert kv.evicted and kv.length == len(ids)
    assert store.evicted(ids, "snapkv:0.25") is None


def test_spec_errors_are_clear():
    with pytest.raises(ConfigError, match="--evict or --independent"):
        JobSpec(independent=True, evict="snapkv:0.5")
    with pytest.raises(ConfigError, match="POLICY:RATIO"):
        JobSpec(evict="snapkv")
    with pytest.raises(ConfigError, match="batch_tokens"):
        JobSpec(batch_tokens=0)
    # A str of configs went letter by letter ('d', 'e', ...), None was a TypeError, and
    # chat="no" was true: each now a ConfigError, a str one config.
    assert JobSpec(configs="lossless").configs == ("lossless",)
    for kw, needle in (({"configs": None}, "config names"), ({"configs": [3]}, "config names"),
                       ({"chat": "no"}, "True or False"), ({"independent": 1}, "True or False"),
                       ({"salt": 3}, "salt must be a str"),
                       ({"chat": True, "system": 3}, "system must be a str")):
        with pytest.raises(ConfigError, match=needle):
            JobSpec(**kw)


def test_precompute_refuses_bad_arguments_before_any_work(lm, jsonl, tmp_path):
    """A store or model of the wrong type was Path()'s TypeError; threads="x" failed every
    document (as its own failure) instead of the job."""
    store = str(tmp_path / "s")
    for kw, err, needle in (({"store": None}, ConfigError, "a store is a directory"),
                            ({"store": 3}, ConfigError, "a store is a directory"),
                            ({"model": 3}, kvcodec.errors.BackendError, "a model is a directory"),
                            ({"threads": "x"}, ConfigError, "threads must be an integer"),
                            ({"runner": "ray", "num_workers": 0}, ConfigError, "num_workers")):
        args = {"store": store, "model": lm, "progress": False, **kw}
        with pytest.raises(err, match=needle):
            precompute([str(jsonl)], args.pop("store"), **args)
    assert not list((tmp_path / "s").rglob("*.kvc"))  # nothing was stored


def test_cli_precompute_reports_and_refuses_bad_input(jsonl, tmp_path):
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    runner = CliRunner()
    res = runner.invoke(main, ["precompute", str(tmp_path / "nothing*.jsonl"), "--store",
                               str(tmp_path / "s")])
    assert res.exit_code == 1 and res.stderr.startswith("error:") and "Traceback" not in res.output
    res = runner.invoke(main, ["precompute", str(jsonl), "--store", str(tmp_path / "s"),
                               "--runner", "local", "--num-workers", "3"])
    assert res.exit_code == 1 and "--runner ray" in res.stderr
    # A report with nowhere to go is refused before the job, not after it.
    res = runner.invoke(main, ["precompute", str(jsonl), "--store", str(tmp_path / "s"),
                               "--report", str(tmp_path / "no" / "such" / "r.json")])
    assert res.exit_code == 2 and "--report" in res.output
    assert not (tmp_path / "s").exists()


def test_parquet_corpus_and_s3_store(lm, corpus_docs, s3_endpoint, tmp_path):
    """A Parquet corpus with bad rows, read from S3, into a store on S3 (a real
    moto_server on loopback): the same entries as a local store, and a rerun is free."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import s3fs

    docs = corpus_docs[:3]
    table = pa.table({"doc_id": [d["id"] for d in docs] + ["empty", "null"],
                      "body": [d["text"] for d in docs] + ["", None]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=2)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    fs.put_file(str(tmp_path / "docs.parquet"), "kvtest/corpus/docs.parquet")
    kwargs = dict(model=lm, text_field="body", id_field="doc_id", progress=False,
                  storage_options=options)
    s = precompute(["s3://kvtest/corpus/*.parquet"], "s3://kvtest/jobstore", **kwargs)
    assert (s.documents, s.done, s.skipped) == (5, 3, 2)
    assert {p["id"] for p in s.problems} == {"empty", "null"}
    local = precompute([str(tmp_path / "docs.parquet")], tmp_path / "local", **kwargs)
    assert local.chunks_new == s.chunks_new > 0
    for path in (tmp_path / "local").rglob("*.kvc"):
        rel = path.relative_to(tmp_path / "local").as_posix()
        assert fs.cat_file(f"kvtest/jobstore/{rel}") == path.read_bytes()
    again = precompute(["s3://kvtest/corpus/docs.parquet"], "s3://kvtest/jobstore", **kwargs)
    assert (again.already_stored, again.tokens_prefilled, again.chunks_new) == (3, 0, 0)


def test_a_window_that_fails_to_prefill_fails_only_its_document(lm, corpus_docs, tmp_path,
                                                                monkeypatch):
    """Alone in its batch or not, a window whose capture raises fails its document (no
    manifest record) and the job goes on with the others."""
    bad = lm.tokenizer(corpus_docs[1]["text"], add_special_tokens=False)["input_ids"]
    real = engine_mod.capture_batch

    def flaky(model, seqs, **kw):
        if any(list(s) == bad for s in seqs):
            raise RuntimeError("simulated kernel failure")
        return real(model, seqs, **kw)

    monkeypatch.setattr(engine_mod, "capture_batch", flaky)
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in corpus_docs[:3]) + "\n")
    for batch_tokens in (64, 4096):  # each window alone; all three in one batch
        s = precompute([str(path)], tmp_path / f"s{batch_tokens}", model=lm, id_field="id",
                       progress=False, spec=JobSpec(batch_tokens=batch_tokens))
        assert (s.done, s.failed) == (2, 1)
        assert s.problems[0]["id"] == "doc1" and "simulated" in s.problems[0]["reason"]


def test_a_manifest_write_that_fails_stops_the_job_and_a_rerun_resumes(lm, tmp_path,
                                                                       monkeypatch):
    """A full disk when the encoder thread records a finished document: the job raises
    that error (it used to hang, the calling thread blocked on the full queue of a dead
    encoder), leaves only whole files, and the same job run again finishes the store."""
    import errno
    import threading

    from kvcodec.jobs.manifest import Manifest

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i}: a short "
                                        "one about the weather."}) + "\n" for i in range(4)))
    store = tmp_path / "s"
    spec = JobSpec(batch_tokens=1)  # a batch per window: more batches than the queue holds

    def disk_full(self, text, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Manifest, "put", disk_full)
    outcome = []

    def job():
        try:
            precompute([str(path)], store, model=lm, id_field="id", progress=False, spec=spec)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            outcome.append(exc)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    thread.join(300)  # a guard against the hang, not a timing threshold
    assert not thread.is_alive(), "the job hung after its manifest write failed"
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.ENOSPC
    assert not list(store.rglob("*.tmp")) and not (store / "manifest").exists()
    for entry in store.rglob("*.kvc"):
        kvcodec.open(entry).close()  # whole and checksummed

    monkeypatch.undo()
    s = precompute([str(path)], store, model=lm, id_field="id", progress=False, spec=spec)
    assert (s.done + s.already_stored, s.failed) == (4, 0)
    again = precompute([str(path)], store, model=lm, id_field="id", progress=False, spec=spec)
    assert (again.already_stored, again.tokens_prefilled) == (4, 0)


def test_cli_precompute_skips_damaged_compressed_inputs(lm, tmp_path):
    """A damaged .bz2 or .zst input is reported as skipped and the job goes on (it used
    to stop the job with a traceback)."""
    import bz2

    import zstandard
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    (tmp_path / "a.txt.bz2").write_bytes(b"BZh91AY&SY" + b"\xff" * 64)
    rows = zstandard.ZstdCompressor().compress(b'{"text": "%d"}\n' % 7 * 10)
    (tmp_path / "b.jsonl.zst").write_bytes(rows[:len(rows) // 2])
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(b"some text")[:20])
    res = CliRunner().invoke(main, ["precompute", str(tmp_path / "*.*"), "--store",
                                    str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "3 skipped" in res.output and "Traceback" not in res.output


def _cli_error(args) -> str:
    """The one line `kvcodec ARGS` prints on stderr, checking it exits 1 without a
    traceback."""
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(res.exception, SystemExit), res.exception  # not an uncaught error
    assert res.exit_code == 1 and res.stderr.startswith("error: "), res.output
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


def test_cli_precompute_unknown_url_protocol_is_one_line(tmp_path):
    err = _cli_error(["precompute", "foo://x/docs.jsonl", "--store", tmp_path / "s"])
    assert "corpus input foo://x/docs.jsonl: Protocol not known: foo" in err


def test_cli_precompute_s3_input_without_s3fs_says_what_to_install(tmp_path, monkeypatch):
    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    monkeypatch.delitem(_registry, "s3", raising=False)  # nor imported by an earlier test
    err = _cli_error(["precompute", "s3://bucket/docs.jsonl", "--store", tmp_path / "s"])
    assert "s3://bucket/docs.jsonl" in err and "pip install kvcodec-toolkit[s3]" in err


def test_cli_precompute_summary_escapes_ids_from_the_corpus(lm, tmp_path):
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "x\x1b[2J\rfake", "text": " "}) + "\n")
    res = CliRunner().invoke(main, ["precompute", str(path), "--id-field", "id", "--store",
                                    str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\r" not in res.output
    assert "skipped: x\\x1b[2J\\rfake: line 1: empty text" in res.output


def test_precompute_under_a_capacity(lm, corpus_docs, tmp_path):
    """A job into a store capped below what it writes: the store ends under the cap, the
    job's manifest stays whole, and the report counts evictions; a cap that is not a
    size is refused before any work."""
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    docs = corpus_docs[:4]
    free = precompute_store(tmp_path / "free", lm, docs)
    total = sum(p.stat().st_size for p in (tmp_path / "free").rglob("*") if p.is_file())
    cap = total // 2
    spec = JobSpec(max_bytes=cap)
    s = precompute([str(d) for d in _text_files(tmp_path, docs)], tmp_path / "capped", model=lm,
                   spec=spec, progress=False)
    assert s.done == free.done == len(docs)
    used = sum(p.stat().st_size for p in (tmp_path / "capped").rglob("*") if p.is_file())
    assert used <= cap
    assert len(list((tmp_path / "capped" / "manifest").rglob("*.json"))) == len(docs)
    assert s.metrics["kvcodec_evictions_total"] > 0
    res = CliRunner().invoke(main, ["precompute", str(tmp_path / "x.txt"), "--store",
                                    str(tmp_path / "t"), "--max-bytes", "lots"])
    assert res.exit_code == 2 and "--max-bytes" in res.output
    with pytest.raises(ConfigError, match="max_bytes"):
        JobSpec(max_bytes=0)


def _text_files(tmp_path, docs):
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    out = []
    for d in docs:
        p = folder / f"{d['id']}.txt"
        p.write_text(d["text"])
        out.append(p)
    return out


def precompute_store(root, lm, docs):
    return precompute([str(p) for p in _text_files(root.parent, docs)], root, model=lm,
                      progress=False)


def test_store_rm_doc_removes_a_document_and_a_rerun_restores_it(lm, corpus_docs, tmp_path):
    """`kvcodec store rm --doc ID`: the entries the job's manifest lists for that document
    go with its record, the other documents stay, and the job run again stores it again."""
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    docs = corpus_docs[:3]
    files = [str(p) for p in _text_files(tmp_path, docs)]
    store = tmp_path / "s"
    first = precompute(files, store, model=lm, progress=False)
    before = {p.relative_to(store).as_posix() for p in store.rglob("*.kvc")}
    victim = files[1]  # a text file's id is its path as given
    r = CliRunner().invoke(main, ["store", "rm", str(store), "--doc", victim, "--doc", "nope",
                                  "--json"])
    report = json.loads(r.output)
    assert r.exit_code == 0 and report["documents"] == 1 and report["not_found"] == ["nope"]
    after = {p.relative_to(store).as_posix() for p in store.rglob("*.kvc")}
    assert 0 < report["removed"] == len(before - after) and after < before
    again = precompute(files, store, model=lm, progress=False)
    assert again.already_stored == 2 and again.chunks_new == report["removed"]
    assert {p.relative_to(store).as_posix() for p in store.rglob("*.kvc")} == before
    assert first.done == 3
    res = CliRunner().invoke(main, ["store", "rm", str(store), "--doc", victim, "--all"])
    assert res.exit_code == 2
