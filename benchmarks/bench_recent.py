"""What loading a prompt's last tokens from a lossy store costs in quality: each prompt
(a held-out text's ~600 tokens and a question) is stored whole, then prefilled from the
store (``cache_from_store(..., upto=...)``) with its last R tokens computed, for each R
of ``--recent`` (1: every token but the last loaded, what a lossless store does), and
with loads ending at the last whole 128-token block before the last token (vLLM's block
boundary: what the connector did before ``reuse_end``, and what ``whole_blocks`` does).
Against the uncompressed prefill, over the greedy answer's first 32 tokens, teacher
forced: KL of the first answer token and the mean over 32, top-1 agreement of the first
and over 32. This is what :data:`kvcodec.store.tails.RECENT_EXACT` is chosen from.

    python benchmarks/bench_recent.py --json [--model gemma3-270m] [--config default]

Prints one JSON line per setting: ``{"model", "config", "setting", "recent_mean",
"kl_first", "kl", "top1_first", "top1", "prompts"}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvcodec  # noqa: E402
from kvcodec.integrations.hf import cache_from_store  # noqa: E402
from kvcodec.store import ChunkStore  # noqa: E402

QUESTIONS = ["\n\nQuestion: Who may copy it?\nAnswer:",
             "\n\nQuestion: What is this document about?\nAnswer:",
             "\n\nQuestion: Name one thing it defines.\nAnswer:"]
ANSWER = 32
BLOCK = 128


@torch.no_grad()
def reference(lm, ids: list) -> tuple:
    """The greedy answer of an uncompressed prefill and its logits, teacher-forced."""
    out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
    ans = [int(out.logits[0, -1].argmax())]
    for _ in range(ANSWER - 1):
        out = lm.model(input_ids=torch.tensor([[ans[-1]]]), past_key_values=out.past_key_values)
        ans.append(int(out.logits[0, -1].argmax()))
    ref = lm.model(input_ids=torch.tensor([ids + ans[:-1]])).logits[0, len(ids) - 1:]
    return ans, ref.float()


def main():
    from conftest import real_texts
    from real_models import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default="default")
    ap.add_argument("--recent", type=int, nargs="*", default=[1, 16, 32, 64, 128])
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    lm = kvcodec.load_model(resolve(args.model))
    tok = lm.tokenizer
    rows = {}
    for text in real_texts().values():
        for q in QUESTIONS:
            for at in (0, 8000):  # two places in each text
                ids = (tok(text[at:at + 10 * args.tokens], add_special_tokens=False)
                       ["input_ids"][:args.tokens] + tok(q, add_special_tokens=False)["input_ids"])
                ans, ref = reference(lm, ids)
                store = ChunkStore(tempfile.mkdtemp(prefix="bench-recent-"), lm.fingerprint,
                                   args.config)
                store.put(kvcodec.capture_kv(lm, token_ids=ids, every_token=True))
                n = len(ids)
                settings = [(f"last {r} computed", n - r) for r in args.recent]
                settings.append(("whole blocks", (n - 1) // BLOCK * BLOCK))
                for name, upto in settings:
                    with torch.no_grad():
                        cache, k = cache_from_store(lm.model, store, ids, partial=True,
                                                    upto=upto)
                        got = lm.model(input_ids=torch.tensor([ids[k:] + ans[:-1]]),
                                       past_key_values=cache).logits[0, n - k - 1:].float()
                    kl = F.kl_div(F.log_softmax(got, -1), F.log_softmax(ref, -1),
                                  log_target=True, reduction="none").sum(-1)
                    top = (got.argmax(-1) == ref.argmax(-1)).float()
                    r = rows.setdefault(name, {k: [] for k in ("recent", "kl_first", "kl",
                                                                 "top1_first", "top1")})
                    for key, v in (("recent", n - k), ("kl_first", kl[0]), ("kl", kl.mean()),
                                   ("top1_first", top[0]), ("top1", top.mean())):
                        r[key].append(float(v))
    for name, r in rows.items():
        row = {"model": args.model or "smollm2-135m", "config": args.config, "setting": name,
               "recent_mean": round(statistics.mean(r["recent"]), 1),
               **{k: round(statistics.mean(r[k]), 4) for k in
                  ("kl_first", "kl", "top1_first", "top1")},
               "prompts": len(r["kl"])}
        print(json.dumps(row) if args.json else
              f"{name:18s} (mean {row['recent_mean']:5.1f} computed) first-token KL "
              f"{row['kl_first']:.4f} top-1 {row['top1_first']:.3f}; over {ANSWER}: "
              f"KL {row['kl']:.4f} top-1 {row['top1']:.3f}")


if __name__ == "__main__":
    main()
