"""Operating a store: ``kvcodec store verify`` against the disk's sequential read speed,
``stats`` (headers only) and an eviction pass, on a store of real entries.

The store is filled with the embedded model's 256-token entries of real texts (each
document's chunks coded once), then copied under other keys until it holds
``--mb`` megabytes (so 1 GB does not take an hour of prefill and coding; every entry is
still a real entry, and verify reads and checks every byte of each). Before each timed
pass every file is dropped from the page cache (``posix_fadvise(DONTNEED)``, which needs
no root), so both read the disk: ``seq_read`` reads every entry file whole in listing
order with 1 MiB reads (what the disk gives one reader), ``verify`` is
:meth:`StoreAdmin.verify` (read-ahead hints, one thread per core: fetch, header, every
section's and every payload item's checksum, shared tables, first-chunk keys). The two
alternate for ``--rounds`` rounds, since a VM's disk speed drifts; the median ratio is
the figure. ``--json`` prints one line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import kvcodec
from kvcodec.store import ChunkStore
from kvcodec.store.admin import StoreAdmin



def _texts() -> list:
    """Real documents that ship with Debian and Python (as the other benchmarks use)."""
    import collections
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [Path("/usr/share/common-licenses/GPL-3"), stdlib / "LICENSE.txt",
             Path(collections.__file__)]
    return [p.read_text(errors="replace") for p in paths if p.is_file()]


def _drop_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _seq_read(files) -> tuple[float, int]:
    t, n = time.perf_counter(), 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                n += len(b)
    return time.perf_counter() - t, n


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=1024, help="Store size to build (MB).")
    ap.add_argument("--tokens", type=int, default=2048, help="Tokens per document.")
    ap.add_argument("--dir", default=None, help="Where to build it (default: a temp dir "
                    "under the current directory, on the disk being measured).")
    ap.add_argument("--rounds", type=int, default=5,
                    help="Read-then-verify rounds (the median ratio is reported).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="kvstore-", dir="."))
    try:
        lm = kvcodec.load_model()
        store = ChunkStore(root, lm.fingerprint, "default")
        for text in _texts():
            store.put(kvcodec.capture_kv(lm, text, max_tokens=args.tokens))
        real = sorted(store.entries())
        total, i = sum(p.stat().st_size for p in real), 0
        while total < args.mb * 1e6:  # copies of real entries under new names
            src = real[i % len(real)]
            key = uuid.uuid4().hex + uuid.uuid4().hex
            dst = root / key[:2] / f"{key[2:]}.kvc"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dst)
            total += src.stat().st_size
            i += 1
        os.sync()
        admin = StoreAdmin(root)
        files = [root / i.rel for i in sorted(admin.objects()[0], key=lambda i: i.rel)]
        seqs, verifies, ratios = [], [], []
        for _ in range(args.rounds):  # alternated: the VM's disk speed drifts
            _drop_cache(root)
            seq_s, seq_bytes = _seq_read(files)
            _drop_cache(root)
            report = admin.verify()
            seqs.append(seq_bytes / 1e6 / seq_s)
            verifies.append(report["mb_per_s"])
            ratios.append(verifies[-1] / seqs[-1])
        _drop_cache(root)
        t = time.perf_counter()
        stats = admin.stats()
        stats_s = time.perf_counter() - t
        t = time.perf_counter()
        from kvcodec.store.capacity import Policy, evict
        ev = evict(admin.backend, Policy(max_bytes=int(total * 0.5)), dry_run=True)
        evict_s = time.perf_counter() - t
        out = {"bench": "bench_store_ops", "entries": report["entries"],
               "store_mb": round(report["bytes"] / 1e6, 1),
               "seq_read_mb_s": [round(x, 1) for x in seqs], "verify_mb_s": verifies,
               "verify_vs_seq_read": [round(x, 3) for x in ratios],
               "verify_vs_seq_read_median": round(sorted(ratios)[len(ratios) // 2], 3),
               "verify_damaged": len(report["damaged"]),
               "stats_s": round(stats_s, 2), "stats_entries": stats["kvcodec_store_entries"],
               "evict_plan_s": round(evict_s, 2), "evict_would_remove": len(ev.removed),
               "cpu_count": os.cpu_count()}
        if args.json:
            print(json.dumps(out))
        else:
            for k, v in out.items():
                print(f"{k:22s} {v}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
