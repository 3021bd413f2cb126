"""Seed corpora for the fuzz harnesses: real files of every kind kvcodec writes, tiny.

    python fuzz/seeds.py [--out out/fuzz/seeds]

writes ``<out>/<harness>/<name>`` for each harness (``reader``, ``stream``, ``store``,
``corpus``, ``gguf``). Nothing here is committed: the files are made by the library itself, from
seeded random tensors of tiny shapes (1-2 layers, 1-2 KV heads, head_dim 8, 12-40
tokens, chunks of 4-16), so one execution of a harness takes about a millisecond.

.kvc seeds (reader, stream): dense lossy (the default config: keys coded pre-RoPE,
native dequantization and rotation; per-channel uniform; CacheGen's absmax), lossless,
float32 / float16 / bfloat16, sliding-window layers (spans that start inside a chunk),
anchored (position-independent) chunks, evicted caches (format v4, lossy and lossless),
klt streams with their codebook embedded (format v7, dense and evicted),
partial-rotary keys (the non-fused path), no model and no token ids, and the format v2
file in tests/data (the oldest version the reader accepts). Model fingerprints come from
transformers configs built in code (``fingerprint(config)``), as the tests' tiny models
do, so the headers hold the key transforms real models give.

Store seeds: entries a :class:`ChunkStore` wrote for the fingerprint and token ids the
store harness checks them against (:data:`common.STORE_FP`, :data:`common.STORE_IDS`):
prefix chunks, document chunks behind an anchor, an evicted entry.

GGUF seeds: tiny whole Llama models (float32, float16) and one cut in its tensor data.

Corpus seeds: one mode byte (:func:`common.corpus_mode`) then a JSONL, Parquet or text
file, plain or gzip/bz2/xz/zstd compressed.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

MAX_SEED = 64 << 10


def _fingerprints() -> dict:
    """Real fingerprints of tiny models (configs only, no weights): default RoPE, sliding
    windows, partial rotary, YaRN scaling."""
    import transformers

    from kvcodec.models.fingerprint import fingerprint

    small = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=2048,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    out = {
        "llama": fingerprint(transformers.LlamaConfig(num_key_value_heads=1, head_dim=8,
                                                      **small)),
        "llama2h": fingerprint(transformers.LlamaConfig(num_key_value_heads=2, head_dim=8,
                                                        **small)),
        "gemma2": fingerprint(transformers.Gemma2Config(num_key_value_heads=1, head_dim=8,
                                                        sliding_window=8, **small)),
        "phi3": fingerprint(transformers.Phi3Config(num_key_value_heads=1,
                                                    partial_rotary_factor=0.5,
                                                    **dict(small, hidden_size=32))),
        "qwen2-yarn": fingerprint(transformers.Qwen2Config(
            num_key_value_heads=1, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 512},
            **dict(small, hidden_size=32))),
    }
    if out["llama"] != common.STORE_FP:
        raise SystemExit("fuzz/common.py STORE_FP is not fingerprint(LlamaConfig(...)) of "
                         f"this transformers any more; update it to:\n{json.dumps(out['llama'])}")
    return out


def _cache(layers: int, heads: int, dim: int, n: int, seed: int, dtype=None, spans=None,
           model=None, ids=True, importance=False, anchor=None):
    import torch

    from kvcodec import KVCache

    gen = torch.Generator().manual_seed(seed)
    spans = spans or [n] * layers
    keys = [torch.randn(1, heads, t, dim, generator=gen) * 2 for t in spans]
    values = [torch.randn(1, heads, t, dim, generator=gen) for t in spans]
    if dtype is not None:
        keys, values = [k.to(dtype) for k in keys], [v.to(dtype) for v in values]
    imp = torch.rand(layers, n, generator=gen) + 0.01 if importance else None
    token_ids = common.STORE_IDS[:n] if ids else None
    return KVCache(keys, values, token_ids, model, imp, length=n, anchor=anchor)


def _evict(kv, counts, seed: int = 0):
    """``kv`` keeping ``counts[l][h]`` random positions of each head (as the tests'
    evicted builder: position 0 first where a head keeps any)."""
    import torch

    from kvcodec import KVCache

    gen = torch.Generator().manual_seed(seed)
    n = kv.num_tokens
    kept, keys, values = [], [], []
    for k, v, per_head in zip(kv.keys, kv.values, counts):
        pos = torch.full((len(per_head), max(max(per_head), 1)), -1, dtype=torch.int64)
        for h, c in enumerate(per_head):
            chosen = torch.cat([torch.zeros(1, dtype=torch.int64),
                                1 + torch.randperm(n - 1, generator=gen)[:c - 1]])[:c]
            pos[h, :c] = torch.sort(chosen).values
        idx = pos.clamp(min=0)[None, :, :, None].expand(1, -1, -1, k.shape[3])
        valid = (pos >= 0)[None, :, :, None]
        keys.append(torch.where(valid, k.gather(2, idx), 0))
        values.append(torch.where(valid, v.gather(2, idx), 0))
        kept.append(pos)
    return KVCache(keys, values, kv.token_ids, kv.model, kv.importance, length=n, kept=kept,
                   anchor=kv.anchor)


UNIFORM_CHANNEL = {
    "name": "uniform-channel", "chunk_tokens": 8, "sink_tokens": 2,
    "key": [{"layers": [0, None], "quantizer": {"type": "uniform", "scale": "channel",
                                                "step": 0.5, "bins": 63}}],
    "value": [{"layers": [0, 1], "quantizer": {"type": "uniform", "scale": "token",
                                               "step": 0.7, "bins": 255}},
              {"layers": [1, None], "quantizer": {"type": "absmax_token", "bins": 16}}],
}


def kvc_seeds() -> dict:
    """``{name: .kvc bytes}``: every kind and version the reader accepts."""
    import torch

    import kvcodec

    fp = _fingerprints()
    out = {}

    def enc(name, kv, config="default", chunk=8, **kw):
        out[name] = kvcodec.encode(kv, config=config, chunk_tokens=chunk, threads=1, **kw)

    llama, gemma = fp["llama"], fp["gemma2"]
    enc("dense-default-f32", _cache(2, 1, 8, 20, 1, model=llama, importance=True))
    enc("dense-default-f16", _cache(2, 1, 8, 20, 2, torch.float16, model=llama), chunk=4)
    enc("dense-default-bf16-2heads", _cache(2, 2, 8, 12, 3, torch.bfloat16, model=fp["llama2h"]))
    enc("dense-cachegen", _cache(2, 1, 8, 20, 4, model=llama), config="cachegen")
    enc("dense-uniform-channel", _cache(2, 1, 8, 20, 5, model=llama), config=UNIFORM_CHANNEL)
    enc("dense-no-model-no-ids", _cache(1, 1, 8, 12, 6, ids=False), chunk=4)
    enc("dense-partial-rotary", _cache(2, 1, fp["phi3"]["head_dim"], 12, 7, model=fp["phi3"]))
    enc("dense-yarn", _cache(2, 1, 8, 12, 8, model=fp["qwen2-yarn"]))
    enc("lossless-f16", _cache(2, 1, 8, 12, 9, torch.float16, model=llama), config="lossless")
    enc("lossless-bf16", _cache(1, 2, 8, 12, 10, torch.bfloat16), config="lossless", chunk=4)
    enc("lossless-f32", _cache(2, 1, 8, 8, 11, model=llama), config="lossless")
    # Sliding windows: layer 0 holds its last 13 of 20 tokens (a span that starts
    # inside a chunk), layer 1 all of them.
    enc("sliding-default", _cache(2, 1, 8, 20, 12, spans=[13, 20], model=gemma))
    enc("sliding-lossless", _cache(2, 1, 8, 20, 13, torch.float16, spans=[5, 20], model=gemma),
        config="lossless", chunk=4)
    enc("sliding-cachegen", _cache(2, 1, 8, 20, 14, spans=[9, 20], model=gemma),
        config="cachegen")
    anchor = [7, 8, 9]
    enc("anchored-default", _cache(2, 1, 8, 16, 15, model=llama, anchor=anchor))
    enc("anchored-lossless", _cache(2, 1, 8, 16, 16, model=llama, anchor=anchor),
        config="lossless")
    dense = _cache(2, 2, 8, 20, 17, model=fp["llama2h"], importance=True)
    enc("evicted-default", _evict(dense, [[1, 20], [9, 4]]))
    enc("evicted-lossless", _evict(dense, [[3, 7], [0, 12]], seed=1), config="lossless",
        chunk=4)
    enc("evicted-cachegen", _evict(dense, [[20, 2], [5, 5]], seed=2), config="cachegen")
    enc("evicted-anchored", _evict(_cache(2, 2, 8, 12, 18, model=fp["llama2h"], anchor=anchor),
                                   [[4, 12], [7, 2]]))
    # klt streams (format v7), each file carrying its codebook: mutations reach the
    # codebook's parser and the native inverse basis.
    from kvcodec.quality.transform import klt_config

    klt, _ = klt_config(kvcodec.load_config("default"), [dense])
    enc("dense-klt", _cache(2, 2, 8, 20, 19, model=fp["llama2h"], importance=True), config=klt,
        embed_codebook=True)
    enc("evicted-klt", _evict(dense, [[6, 3], [2, 14]], seed=3), config=klt,
        embed_codebook=True)
    v2 = ROOT / "tests" / "data" / "format-v2.kvc"
    if v2.is_file():
        out["format-v2"] = v2.read_bytes()
    return out


def store_seeds() -> dict:
    """``{name: entry bytes}`` written by ChunkStore for common.STORE_FP and STORE_IDS."""
    import kvcodec
    from kvcodec.store.chunks import ChunkStore

    fp, ids = common.STORE_FP, common.STORE_IDS
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config) in enumerate([("default", {"name": "fuzz", "chunk_tokens": 8,
                                                          **_default_body()}),
                                            ("lossless", "lossless")]):
            root = Path(tmp) / name
            store = ChunkStore(root, fp, config)
            store.threads = 1
            kv = _cache(2, 1, 8, 12, 20 + i, model=fp)
            if isinstance(config, str):  # the store's own chunk size (256): one chunk
                store.put(kv)
            else:
                store.put(kv)  # chunks of 8: the first whole, the second partial
            doc = _cache(2, 1, 8, 10, 30 + i, model=fp, anchor=[5, 6])
            store.put_document(doc)
            ev = _evict(_cache(2, 1, 8, 12, 40 + i, model=fp), [[5], [12]])
            store.put_evicted(ev, "fuzz:0.5")
            for j, loc in enumerate(sorted(store.entries(), key=str)):
                out[f"{name}-{j}"] = Path(loc).read_bytes()
    return out


def _default_body() -> dict:
    cfg = json.loads((ROOT / "configs" / "default.json").read_text())
    return {k: v for k, v in cfg.items() if k not in ("name", "description", "chunk_tokens")}


def corpus_seeds() -> dict:
    """``{name: mode byte + file bytes}`` for every corpus kind and compression."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "text": "The quick brown fox.\n"}, {"id": 7, "text": "caf\u00e9 \u00e0 7"},
            {"id": "c", "text": "  "}, {"id": "d", "text": None}, {"id": True, "text": "x"},
            {"text": ["not", "a", "string"]}, {"id": "e", "text": "\ud800 surrogate"}]
    jsonl = ("\n".join(json.dumps(r) for r in rows) + "\n\n[1, 2]\n{bad json\n"
             '{"id": "f", "text": "last"}\r\n').encode()
    table = pa.table({"id": ["a", "b", "c", ""], "text": ["one", "two", None, "four"],
                      "n": [1, 2, 3, 4]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    parquet = buf.getvalue()
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [1.5, 2.5], "id": [[1], [2]]}), buf)
    parquet_types = buf.getvalue()
    texts = {"text": "A plain document.\nSecond line.\n".encode(),
             "text-bom": b"\xef\xbb\xbfcaf\xc3\xa9\n", "text-latin1": b"caf\xe9\n",
             "text-binary": b"\x89PNG\r\n\x1a\n\0\0"}
    plain = {"jsonl": ("jsonl", jsonl), "parquet": ("parquet", parquet),
             "parquet-types": ("parquet", parquet_types),
             **{k: ("text", v) for k, v in texts.items()}}
    out = {}
    for name, (kind, data) in plain.items():
        for comp in common.CORPUS_COMPRESSIONS:
            if kind == "parquet" and comp is not None and comp != "gzip":
                continue  # Parquet compresses inside; one outer compression is enough
            for id_field in (False, True):
                mode = common.corpus_mode(kind, comp, id_field)
                out[f"{name}-{comp or 'plain'}-{'id' if id_field else 'noid'}"] = (
                    bytes([mode]) + common.compress(comp, data))
    return out


def gguf_seeds() -> dict:
    """Tiny whole GGUF models (a 2-block Llama, float32 and float16 tensors, a vocabulary
    and merges as arrays of strings) and one cut in its tensor data."""
    import gguf
    import numpy as np

    def model(dtype) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.gguf"
            w = gguf.GGUFWriter(str(path), arch="llama")
            w.add_block_count(2)
            w.add_embedding_length(16)
            w.add_head_count(2)
            w.add_token_list([f"t{i}" for i in range(64)])
            w.add_token_merges(["t 1", "t 2"])
            w.add_token_types([1] * 64)
            rng = np.random.default_rng(0)
            shapes = {"token_embd.weight": (64, 16), "output_norm.weight": (16,)}
            for i in range(2):
                shapes.update({f"blk.{i}.attn_q.weight": (16, 16),
                               f"blk.{i}.ffn_up.weight": (32, 16)})
            for name, shape in shapes.items():
                w.add_tensor(name, rng.standard_normal(shape).astype(dtype))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            return path.read_bytes()

    f32, f16 = model(np.float32), model(np.float16)
    return {"llama-f32": f32, "llama-f16": f16, "llama-cut": f16[:len(f16) * 2 // 3]}


def write(out_dir: Path) -> dict:
    """Write every harness's seeds under ``out_dir``; returns ``{harness: count}``."""
    kvc = kvc_seeds()
    sets = {"reader": kvc, "stream": kvc, "store": store_seeds(), "corpus": corpus_seeds(),
            "gguf": gguf_seeds()}
    counts = {}
    for harness, seeds in sets.items():
        d = out_dir / harness
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for name, data in seeds.items():
            if len(data) > MAX_SEED:
                raise SystemExit(f"seed {harness}/{name} is {len(data)} bytes, over {MAX_SEED}")
            (d / name).write_bytes(data)
        counts[harness] = len(seeds)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "fuzz" / "seeds"))
    args = p.parse_args(argv)
    counts = write(Path(args.out))
    print(json.dumps({"seeds": counts, "out": args.out}))


if __name__ == "__main__":
    main()
