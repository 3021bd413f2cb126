"""Stress, bounded in time: concurrent writers, readers and a damager on one store, and a
corpus job killed with SIGKILL at random points. What must hold whatever the
interleaving: a reader gets the right values or a miss (never other values, never an
error), only damaged bytes are moved aside, and a killed job resumes to the store an
uninterrupted one writes."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from kvcodec.format.container import atomic_write
from kvcodec.store import ChunkStore
from kvcodec.store import backends

SECONDS = float(os.environ.get("KVCODEC_STRESS_S", "6"))


def test_writers_readers_and_a_damager_share_a_store(tmp_path, lm, kv_600, monkeypatch):
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    ids = kv_600.token_ids
    store.put(kv_600)
    paths = store.lookup(ids)
    good = {p: p.read_bytes() for p in paths}
    reference = store.load_prefix(ids)
    moved, errors, loads = [], [], []
    real_quarantine = backends.LocalBackend.quarantine

    def recording(self, rel, *identity):
        bad = real_quarantine(self, rel, *identity)
        if bad is not None:
            try:
                moved.append(Path(bad).read_bytes())
            except OSError:
                pass  # another quarantine replaced it meanwhile
        return bad

    monkeypatch.setattr(backends.LocalBackend, "quarantine", recording)
    stop = time.monotonic() + SECONDS

    def guarded(fn):
        def run():
            try:
                while time.monotonic() < stop:
                    fn()
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)
        return run

    def writer():  # re-puts what is missing, and rewrites entries in place
        ChunkStore(tmp_path, lm.fingerprint, "default").put(kv_600)
        p = random.choice(paths)
        atomic_write(p, good[p])

    def damager():  # a disk that flips a byte of a whole entry now and then
        p = random.choice(paths)
        data = bytearray(good[p])
        data[random.randrange(len(data))] ^= 1 << random.randrange(8)
        atomic_write(p, bytes(data))
        time.sleep(0.002)

    def reader():
        kv = ChunkStore(tmp_path, lm.fingerprint, "default").load_prefix(ids)
        if kv is not None:
            n = kv.num_tokens
            for a, b in zip(kv.keys + kv.values, reference.keys + reference.values):
                assert torch.equal(a, b[:, :, :n]), "a reader got other values"
            loads.append(n)

    threads = [threading.Thread(target=guarded(f)) for f in
               (writer, writer, damager, reader, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert loads and max(loads) == 512
    assert all(data not in good.values() for data in moved), "a good entry was moved aside"
    store.put(kv_600)
    for p in paths:
        atomic_write(p, good[p])
    assert store.load_prefix(ids).num_tokens == 512
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temp or held file


def _tables_in(root: Path):
    """A resolver of the shared tables a store directory holds (entries name them)."""
    from kvcodec.format.shared import SharedTables

    def get(digest):
        (path,) = root.glob(f"tables/*/{digest}.kvt")
        return SharedTables.from_bytes(path.read_bytes(), 1 << 20)
    return get


def test_a_job_killed_at_random_points_resumes_to_the_whole_store(tmp_path, texts):
    """``kvcodec precompute`` killed with SIGKILL three times, at random moments of its
    run (loading, prefilling, writing), then run to the end: the store equals an
    uninterrupted run's, every entry whole."""
    docs = tmp_path / "docs.jsonl"
    text = texts["python_license"]
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": text[i * 1500:(i + 1) * 1500]})
                            + "\n" for i in range(6)))
    cmd = [sys.executable, "-m", "kvcodec_cli.main", "precompute", str(docs), "--id-field",
           "id", "--batch-tokens", "512", "--no-progress", "--store"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref = tmp_path / "reference"
    done = subprocess.run(cmd + [str(ref)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    rng = random.Random(1234)
    for _ in range(3):
        proc = subprocess.Popen(cmd + [str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 12.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in out.rglob("*.kvc"):  # whatever is visible is whole
            with open(path, "rb") as f:
                from kvcodec import open as kvc_open
                kvc_open(f.read(), tables=_tables_in(out)).decode()
    done = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr

    def entries(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*.kvc")}

    assert entries(out) == entries(ref)
