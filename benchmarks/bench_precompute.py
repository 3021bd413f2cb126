"""Corpus job throughput: `kvcodec precompute` in-process and on Ray against plain
prefill of the same documents (the ceiling), on the embedded SmolLM2-135M-Instruct.

The corpus is real text: the license texts Debian ships (/usr/share/common-licenses),
cut into passages of a few hundred to ~1,500 tokens (a RAG corpus) plus a few whole
files, as JSONL; at least --min-tokens tokens. Each runner writes a fresh local store.

The ceiling is the model's own forward pass over the same windows in the same batches
(`model(input_ids, use_cache=True)` per batch, padded, sdpa), without capturing,
encoding or storing anything; the job's `tokens_per_s` over it is the ratio the
target speaks of (>= 0.85). `codec_share` is the in-process job's encoder-thread time
(evict/encode/write, overlapped with the next prefill) over its wall time.

Prints one JSON object with --json:
{"cases": [{"name", "tokens", "seconds", "tokens_per_s"}], "codec_share": ..., ...}
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvcodec
from kvcodec.jobs import JobSpec, precompute
from kvcodec.jobs.plan import batches, windows

LICENSES = Path("/usr/share/common-licenses")


def corpus(lm, min_tokens: int, path: Path) -> list:
    """Passages of the license texts (paragraph groups of up to ~6,000 characters) and
    whole files, until ``min_tokens`` tokens; written to ``path`` as JSONL."""
    docs = []
    total = 0
    for i, f in enumerate(sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())):
        text = f.read_text(encoding="utf-8", errors="replace")
        if i % 4 == 0:
            parts = [text]
        else:
            parts, cur = [], ""
            limit = 1500 + 1500 * (i % 3)
            for para in re.split(r"\n\s*\n", text):
                if cur and len(cur) + len(para) > limit:
                    parts.append(cur)
                    cur = ""
                cur += para + "\n\n"
            if cur.strip():
                parts.append(cur)
        for j, part in enumerate(parts):
            n = len(lm.tokenizer(part, add_special_tokens=False)["input_ids"])
            docs.append({"id": f"{f.name}/{j}", "text": part})
            total += n
            if total >= min_tokens:
                break
        if total >= min_tokens:
            break
    with path.open("w") as out:
        for d in docs:
            out.write(json.dumps(d) + "\n")
    return docs


@torch.no_grad()
def plain_prefill(lm, docs, batch_tokens: int, window: int) -> tuple:
    """The ceiling: the model's forward over the job's windows, in the job's batches."""
    parts = []
    for d in docs:
        ids = lm.tokenizer(d["text"], add_special_tokens=False)["input_ids"]
        parts += windows(ids, window)
    tokens = sum(map(len, parts))
    pad = lm.tokenizer.pad_token_id or 0
    t = time.perf_counter()
    for group in batches(parts, len, batch_tokens):
        width = max(map(len, group))
        ids = torch.tensor([g + [pad] * (width - len(g)) for g in group])
        mask = torch.tensor([[1] * len(g) + [0] * (width - len(g)) for g in group])
        lm.model(input_ids=ids, attention_mask=mask if len(group) > 1 else None,
                 use_cache=True, logits_to_keep=1)
    return tokens, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-tokens", type=int, default=20000)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    lm = kvcodec.load_model()
    tmp = Path(tempfile.mkdtemp(prefix="kvcodec-bench-precompute-"))
    docs = corpus(lm, args.min_tokens, tmp / "corpus.jsonl")
    spec = JobSpec(batch_tokens=args.batch_tokens)
    window = spec.window(lm.config.max_position_embeddings, 256)

    # Warm the model's kernels once, so no case pays first-call costs.
    plain_prefill(lm, docs[:1], args.batch_tokens, window)
    cases = []
    tokens, seconds = plain_prefill(lm, docs, args.batch_tokens, window)
    cases.append({"name": "plain_prefill", "tokens": tokens, "seconds": round(seconds, 2),
                  "tokens_per_s": round(tokens / seconds, 1)})
    local = precompute([str(tmp / "corpus.jsonl")], tmp / "store-local", spec=spec,
                       progress=False, id_field="id")
    cases.append({"name": "precompute_local", "tokens": local.tokens_prefilled,
                  "seconds": round(local.seconds, 2), "tokens_per_s": round(local.tokens_per_s, 1)})
    report = {"cases": cases, "codec_share": round(local.codec_share, 3),
              "documents": local.documents, "chunks": local.chunks_new,
              "ratio_vs_fp16": round(local.ratio_vs_fp16, 2),
              "prefill_s": round(local.prefill_s, 2), "codec_s": round(local.codec_s, 2)}
    if not args.skip_ray:
        ray = precompute([str(tmp / "corpus.jsonl")], tmp / "store-ray", spec=spec,
                         progress=False, id_field="id", runner="ray",
                         num_workers=args.workers)
        cases.append({"name": f"precompute_ray_{args.workers}w", "tokens": ray.tokens_prefilled,
                      "seconds": round(ray.seconds, 2),
                      "tokens_per_s": round(ray.tokens_per_s, 1)})
        same = _same_store(tmp / "store-local", tmp / "store-ray")
        report["ray_store_identical"] = same
    report["local_vs_plain"] = round(cases[1]["tokens_per_s"] / cases[0]["tokens_per_s"], 3)
    rerun = precompute([str(tmp / "corpus.jsonl")], tmp / "store-local", spec=spec,
                       progress=False, id_field="id")
    report["rerun_seconds"] = round(rerun.seconds, 2)
    report["rerun_prefilled"] = rerun.tokens_prefilled
    if args.json:
        print(json.dumps(report))
    else:
        for c in cases:
            print(f"{c['name']:>22}: {c['tokens']} tokens in {c['seconds']:.1f} s, "
                  f"{c['tokens_per_s']:.0f} tokens/s")
        print(json.dumps({k: v for k, v in report.items() if k != "cases"}))
    return 0


def _same_store(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files == other and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


if __name__ == "__main__":
    sys.exit(main())
