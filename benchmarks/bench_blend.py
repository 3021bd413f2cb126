"""Blending quality and time to first token on the embedded model, against full prefill.

Two probes over real texts that ship with Debian and Python:

* ``qa``: a system line, 4 documents of ~512 tokens in shuffled order (drawn from a pool
  of license texts and standard-library documentation), and a question whose answer is
  in one of them (how a quoted sentence of it continues). Scored on the 32-token greedy
  answer of full prefill, teacher-forced through both caches.
* ``continuation``: 4 consecutive ~512-token pieces of one long document, each cached
  separately, scored on the real next 64 tokens of the document.

Every document is captured once behind the model's anchor and encoded with the
``default`` codec into a .kvc file on disk, as ``kvcodec precompute --independent``
would; blending reads those files. Per selector and recompute ratio: mean KL(prefill ||
blend) of the next-token distribution over the scored tokens, top-1 agreement, exact
match of the greedy answer (every teacher-forced top-1 equal to prefill's greedy token,
which is exactly when greedy decoding reproduces it), and TTFT (files on disk to
first-token logits). ``--json`` prints ``{"results": [{"probe", "selector", "ratio",
"kl", "top1", "exact", "ttft_s"}], "prefill_ttft_s": ...}``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import random
import re
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import kvcodec
from kvcodec.blend import Cached, Text, blend
from kvcodec.models import default_anchor, text_ids
from kvcodec.models.compare import compare_logits, greedy
from real_models import resolve

DOC_TOKENS = 512
DOCS_PER_PROMPT = 4
ANSWER_TOKENS = 32
NEXT_TOKENS = 64
RATIOS = (0.05, 0.15, 0.3)
SELECTORS = ("hkvd", "query", "boundary", "random")


def sources() -> dict:
    """Real English texts: Debian's license texts, Python's license and the sources (code
    and documentation) of a few standard-library modules."""
    out = {}
    lic = Path("/usr/share/common-licenses")
    for name in ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic",
                 "GPL-2", "CC0-1.0"):
        if (lic / name).is_file():
            out[name] = (lic / name).read_text(errors="replace")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if (stdlib / "LICENSE.txt").is_file():
        out["python-license"] = (stdlib / "LICENSE.txt").read_text(errors="replace")
    import argparse as m1
    import collections as m2
    import email.message as m3
    import json as m4
    import logging as m5
    import shutil as m6
    import subprocess as m7
    import textwrap as m8
    for m in (m1, m2, m3, m4, m5, m6, m7, m8):
        out[m.__name__] = inspect.getsource(m)
    return out


def document_pool(tok, texts: dict, per_source: int = 6) -> list:
    """~512-token documents (token ids), a few from each source, cut at line starts."""
    pool = []
    for name, text in texts.items():
        ids = text_ids(tok, text, first=False)  # pieces inside a prompt: no BOS of their own
        step = max(DOC_TOKENS, (len(ids) - DOC_TOKENS) // per_source)
        for start in range(0, len(ids) - DOC_TOKENS + 1, step)[:per_source]:
            pool.append((f"{name}@{start}", ids[start:start + DOC_TOKENS]))
    return pool


def question_for(tok, ids: list, rng: random.Random) -> str:
    """Ask how a sentence of the document continues (the answer is in that document)."""
    lines = [l.strip() for l in tok.decode(ids).splitlines()]
    lines = [l for l in lines if len(re.findall(r"[A-Za-z]+", l)) >= 7]
    words = rng.choice(lines[1:-1] or lines or ["the document"]).split()[:6]
    return (f'One of the documents contains the words "{" ".join(words)}". '
            "Quote how that sentence continues.")


def chat_parts(tok, system: str) -> tuple:
    """The chat template's text before and after the user's message (a plain system line
    and "Answer:" for a base model without a template)."""
    if not getattr(tok, "chat_template", None):
        return system + "\n\n", "\nAnswer:"
    mark = "\x00USER\x00"
    s = tok.apply_chat_template([{"role": "system", "content": system},
                                 {"role": "user", "content": mark}],
                                tokenize=False, add_generation_prompt=True)
    head, tail = s.split(mark)
    return head, tail


class Files:
    """Each document captured behind the anchor and encoded once (default codec)."""

    def __init__(self, lm, root: Path):
        self.lm, self.root, self.paths = lm, root, {}
        self.anchor = default_anchor(lm.tokenizer)

    def __call__(self, name: str, ids: list) -> Path:
        key = tuple(ids)
        if key not in self.paths:
            kv = kvcodec.capture_kv(self.lm, token_ids=ids, anchor=self.anchor)
            path = self.root / f"doc{len(self.paths)}.kvc"
            kvcodec.encode(kv, path)
            self.paths[key] = path
        return self.paths[key]


@torch.no_grad()
def scored_logits(lm, cache, first_logits, tokens: list) -> torch.Tensor:
    """``[len(tokens), vocab]`` float32 next-token logits for ``tokens`` teacher-forced
    after the cache (whose own next-token logits are ``first_logits``)."""
    out = lm.model(input_ids=torch.tensor([tokens[:-1]]), past_key_values=cache,
                   use_cache=True).logits[0].float()
    return torch.cat([first_logits.view(1, -1).float(), out])


def compare(ref: torch.Tensor, test: torch.Tensor, greedy: list) -> dict:
    m = compare_logits(ref, test)
    exact = bool((test[:len(greedy)].argmax(-1) == torch.tensor(greedy)).all())
    return {"kl": m["kl"], "top1": m["top1_agreement"], "exact": exact}


def prompts(lm, n: int, seed: int) -> dict:
    tok = lm.tokenizer
    rng = random.Random(seed)
    texts = sources()
    pool = document_pool(tok, texts)
    head, tail = chat_parts(tok, "You are a helpful assistant. Answer the question using "
                                 "the documents in the user's message.")
    qa = []
    for _ in range(n):
        docs = rng.sample(pool, DOCS_PER_PROMPT)
        target = rng.randrange(DOCS_PER_PROMPT)
        question = question_for(tok, docs[target][1], rng)
        qa.append({"head": head, "docs": docs, "question": "\n\n" + question + tail})
    longs = [(name, text_ids(tok, t, first=False)) for name, t in texts.items()]
    need = DOCS_PER_PROMPT * DOC_TOKENS + NEXT_TOKENS
    longs = [(name, ids) for name, ids in longs if len(ids) >= need]
    cont = []
    for i in range(n):
        name, ids = longs[i % len(longs)]
        start = rng.randrange(0, len(ids) - need + 1)
        pieces = [(f"{name}@{start + j * DOC_TOKENS}",
                   ids[start + j * DOC_TOKENS:start + (j + 1) * DOC_TOKENS])
                  for j in range(DOCS_PER_PROMPT)]
        cont.append({"docs": pieces, "next": ids[start + DOCS_PER_PROMPT * DOC_TOKENS:
                                                  start + need]})
    return {"qa": qa, "continuation": cont}


def segments_of(p: dict, files: Files, tok) -> list:
    segs = [Text(p["head"])] if "head" in p else []
    for i, (name, ids) in enumerate(p["docs"]):
        if i and "head" in p:
            segs.append(Text("\n\n"))
        segs.append(Cached(files(name, ids), name=name))
    if "question" in p:
        segs.append(Text(p["question"]))
    return segs


@torch.no_grad()
def run(lm, n_prompts: int, seed: int, quick: bool, model: str = "smollm2-135m") -> dict:
    configs = [("none", 0.0), ("all", 1.0)] + [(s, r) for s in SELECTORS for r in RATIOS]
    if quick:
        configs = [("none", 0.0)] + [(s, 0.15) for s in SELECTORS]
    rows = defaultdict(list)
    prefill_ttft = []
    with tempfile.TemporaryDirectory() as tmp:
        files = Files(lm, Path(tmp))
        for probe, items in prompts(lm, n_prompts, seed).items():
            for i, p in enumerate(items):
                segs = segments_of(p, files, lm.tokenizer)
                ids = blend(lm, segs, selector="none").token_ids  # the prompt's tokens
                t = time.perf_counter()
                out = lm.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                prefill_ttft.append(time.perf_counter() - t)
                ref_cache, ref_first = out.past_key_values, out.logits[0, -1]
                # Caches are copied, not cropped, to run two continuations from one
                # prompt: a sliding-window layer (Gemma) cannot be cropped back.
                if probe == "qa":  # scored on prefill's own greedy answer
                    scored = greedy = _greedy(lm, copy.deepcopy(ref_cache), ref_first,
                                              ANSWER_TOKENS)
                    ref = scored_logits(lm, ref_cache, ref_first, scored)
                else:  # the real next tokens; prefill's greedy 32 for `exact`
                    scored = p["next"]
                    ref = scored_logits(lm, copy.deepcopy(ref_cache), ref_first, scored)
                    greedy = _greedy(lm, ref_cache, ref_first, ANSWER_TOKENS)
                for sel, ratio in configs:
                    t = time.perf_counter()
                    res = blend(lm, segs, selector=sel, recompute=ratio, seed=i)
                    ttft = time.perf_counter() - t
                    test = scored_logits(lm, res.cache if probe == "qa"
                                         else copy.deepcopy(res.cache), res.logits, scored)
                    m = compare(ref, test, greedy if probe == "qa" else [])
                    if probe != "qa":  # teacher-force prefill's greedy answer as well
                        own = scored_logits(lm, res.cache, res.logits, greedy)
                        m["exact"] = compare(own, own, greedy)["exact"]
                    rows[(probe, sel, ratio)].append(dict(m, ttft_s=ttft))
                print(f"[{probe} {i + 1}/{len(items)}] {len(ids)} tokens", file=sys.stderr)
    results = []
    for (probe, sel, ratio), ms in rows.items():
        results.append({"probe": probe, "selector": sel, "ratio": ratio,
                        **{k: sum(float(m[k]) for m in ms) / len(ms)
                           for k in ("kl", "top1", "exact", "ttft_s")},
                        "prompts": len(ms)})
    return {"results": results, "prefill_ttft_s": sum(prefill_ttft) / len(prefill_ttft),
            "model": model,
            "codec": "default", "doc_tokens": DOC_TOKENS, "docs_per_prompt": DOCS_PER_PROMPT}


def _greedy(lm, cache, logits, n: int) -> list:
    """``n`` greedy tokens (no stop at EOS: a fixed-length answer to score)."""
    return greedy(lm.model, cache, logits, n)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help="prompts per probe (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="only ratio 0.15 and none")
    ap.add_argument("--model", default=None,
                    help="smollm2-135m (default), a name in benchmarks/real_models.py, a .gguf "
                         "file or a model directory")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = kvcodec.load_model(resolve(args.model))
    out = run(lm, args.prompts, args.seed, args.quick, args.model or "smollm2-135m")
    if args.json:
        print(json.dumps(out))
        return
    print(f"prefill TTFT {out['prefill_ttft_s']:.3f}s")
    for r in sorted(out["results"], key=lambda r: (r["probe"], r["selector"], r["ratio"])):
        print(f"{r['probe']:12s} {r['selector']:9s} {r['ratio']:.2f}  KL {r['kl']:.4f}  "
              f"top1 {r['top1']:.3f}  exact {r['exact']:.2f}  TTFT {r['ttft_s']:.3f}s "
              f"({out['prefill_ttft_s'] / r['ttft_s']:.1f}x)")


if __name__ == "__main__":
    main()
