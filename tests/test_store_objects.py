"""A store's objects beside its entries (codebooks, shared tables and the pointer to the
current ones, job manifests) are read within a bound of what each can be: an object
damaged into a huge file (or crafted so) is damage or a miss, in bounded memory, never
read whole."""
import os
import subprocess
import sys
import textwrap

GIB = 1 << 30


def test_huge_store_objects_are_refused_in_bounded_memory(tmp_path):
    """Each object is a sparse 8 GiB file, in a process capped at 2 GiB of address space
    beyond what it has: before, each was read whole (a MemoryError out of the codebook
    load, the tables' load, ``put`` and the job manifest)."""
    code = textwrap.dedent(f"""
        import os, resource, sys
        from pathlib import Path
        import torch
        import transformers
        from kvcodec import KVCache
        from kvcodec.errors import CodebookError
        from kvcodec.format.table_cache import TABLES
        from kvcodec.jobs.manifest import Manifest
        from kvcodec.models.fingerprint import fingerprint
        from kvcodec.store import ChunkStore
        from kvcodec.store.admin import StoreAdmin

        ROOT = Path(sys.argv[1])
        FP = fingerprint(transformers.LlamaConfig(
            vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=8))

        def huge(rel):
            path = ROOT / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(8 * {GIB})
            return path

        def moved(path):
            return not path.exists() and path.with_name(path.name + ".bad").exists()

        gen = torch.Generator().manual_seed(0)
        kv = KVCache([torch.randn(1, 1, 256, 8, generator=gen) for _ in range(2)],
                     [torch.randn(1, 1, 256, 8, generator=gen) for _ in range(2)],
                     [(i * 37 + 11) % 512 for i in range(256)], FP)
        store = ChunkStore(ROOT, FP, "default")
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 2 * {GIB}, resource.RLIM_INFINITY))

        name = "ab" * 32
        book = huge(f"codebooks/{{name}}.kvcb")
        cfg = {{"key": [{{"quantizer": {{"type": "klt", "basis": {{"codebook": name}}}}}}],
               "value": []}}
        try:
            store.load_codebooks(cfg)
        except CodebookError as exc:
            print("codebook:", exc, moved(book))

        current = huge(f"tables/{{store.seed_hex[:40]}}/current")
        print("put over a huge current:", store.put(kv), current.stat().st_size < 100)
        print("loads:", store.load_prefix(kv.token_ids).num_tokens)

        digest = current.read_text()
        tables = huge(f"tables/{{store.seed_hex[:40]}}/{{digest}}.kvt")
        report = StoreAdmin(ROOT).verify()
        print("verify:", [d["error"] for d in report["damaged"]])
        TABLES.clear()
        fresh = ChunkStore(ROOT, FP, "default")
        print("over huge tables:", fresh.load_prefix(kv.token_ids), moved(tables))

        job = Manifest(store, "k" * 32)
        huge(job._rel("a document"))
        print("manifest:", job.get("a document"))
        """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, KVCODEC_CACHE=str(tmp_path / "cache")))
    lines = out.stdout.splitlines()
    assert len(lines) == 6, out.stderr[-3000:]
    assert lines[0].startswith("codebook: the store's codebook is damaged: ") and \
        "larger than the " in lines[0] and lines[0].endswith(" True"), lines[0]
    assert lines[1:3] == ["put over a huge current: 1 True", "loads: 256"], out.stdout
    assert lines[3].startswith("verify: ['") and \
        lines[3].endswith(".kvt: larger than shared tables can be']"), lines[3]
    assert lines[4:] == ["over huge tables: None True", "manifest: None"], out.stdout
