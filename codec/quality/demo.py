"""``make demo``: the main job on the embedded default model, end to end."""
from __future__ import annotations

import sysconfig
import time
from pathlib import Path

from .. import format as kvc
from ..core.paths import read_text
from ..models import capture_kv, load_model, prompt_ids
from . import evaluate

QUESTION = "\n\nQuestion: In one sentence, what is this document about?\nAnswer:"


def default_text() -> Path:
    """A real document that ships with Debian or Python."""
    for p in (Path("/usr/share/common-licenses/GPL-3"),
              Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"):
        if p.is_file():
            return p
    raise FileNotFoundError("no bundled document found; pass --text FILE")


def run_demo(text=None, max_tokens: int = 1024, out_dir="out", echo=print) -> dict:
    path = Path(text) if text else default_text()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"document: {path}")
    t = time.perf_counter()
    lm = load_model()
    echo(f"model: SmolLM2-135M-Instruct (embedded), loaded in {time.perf_counter() - t:.1f}s")
    kv = capture_kv(lm, read_text(path), max_tokens=max_tokens)
    fp16_bytes = kv.numel() * 2
    echo(f"captured KV: {kv.num_layers} layers x {kv.num_kv_heads} heads x "
         f"{kv.num_tokens} tokens x {kv.head_dim} dims = {fp16_bytes:,} bytes in fp16")

    sizes = {}
    for name in ("default", "cachegen"):
        t = time.perf_counter()
        data = kvc.encode(kv, out / f"demo-{name}.kvc", config=name)
        sizes[name] = len(data)
        echo(f"  {name:9s}: {len(data):>10,} bytes  {len(data) * 8 / kv.numel():.3f} bits/element  "
             f"{fp16_bytes / len(data):5.1f}x smaller than fp16  "
             f"(encoded in {time.perf_counter() - t:.2f}s)")
    echo(f"  default is {sizes['cachegen'] / sizes['default']:.2f}x smaller than cachegen")

    t = time.perf_counter()
    decoded = kvc.decode(out / "demo-default.kvc")
    echo(f"decoded {out / 'demo-default.kvc'} in {time.perf_counter() - t:.2f}s")

    prompt = prompt_ids(lm.tokenizer, QUESTION)
    ref_answer = evaluate.greedy_generate(lm, kv, prompt, 24)
    answer = evaluate.greedy_generate(lm, decoded, prompt, 24)
    agree = evaluate.answer_agreement(lm, kv, decoded, prompt, ref_answer)
    echo(f"question: {QUESTION.strip()}")
    echo(f"  answer from the original cache: {lm.tokenizer.decode(ref_answer)!r}")
    echo(f"  answer from the decoded cache:  {lm.tokenizer.decode(answer)!r}")
    echo(f"  greedy agreement {agree['top1_agreement'] * 100:.1f}% over {len(ref_answer)} tokens, "
         f"mean KL {agree['kl']:.4f} nats/token")
    return {"sizes": sizes, "agreement": agree}
