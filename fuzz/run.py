"""Run the fuzz harnesses: ``make fuzz FUZZ_S=<seconds per harness>``.

    python fuzz/run.py --seconds 60 [--jobs 2] [--out out/fuzz] [HARNESS ...]

It makes the seeds (``fuzz/seeds.py``, a few seconds) in ``<out>/seeds`` (or takes them
from ``--seeds DIR``), then runs each harness (default: all of reader, stream, store,
corpus, gguf), ``fuzz/fuzz_<harness>.py``, under libFuzzer for ``--seconds`` with a
working corpus in ``<out>/corpus/<harness>`` (kept between runs, so coverage
accumulates), the seeds and the regression files of ``tests/data/fuzz/<harness>`` as
further corpus directories, and crash files written to ``<out>/artifacts/<harness>/``;
``--jobs`` harnesses run at a time. It prints one JSON line per harness (executions;
executions per second of wall time, start-up included, and as libFuzzer counts them; new
corpus units; peak RSS; crash files) and exits 1 if any harness failed or left a crash
file.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HARNESSES = ("reader", "stream", "store", "corpus", "gguf")
RSS_LIMIT_MB = 3072
TIMEOUT_S = 60       # one input; the harness's own budget is far lower
MAX_LEN = 1 << 16    # seeds are at most 64 KiB

STATS = re.compile(rb"^stat::(\w+):\s+(\d+)", re.M)
DONE = re.compile(rb"^Done (\d+) runs in (\d+) second", re.M)
PROGRESS = re.compile(rb"^#(\d+)\s", re.M)


def make_seeds(seeds: Path, env: dict) -> None:
    subprocess.run([sys.executable, str(HERE / "seeds.py"), "--out", str(seeds)], env=env,
                   check=True, stdout=subprocess.DEVNULL)


def run_one(harness: str, seconds: int, out: Path, seeds: Path, env: dict,
            extra: list) -> dict:
    corpus = out / "corpus" / harness
    artifacts = out / "artifacts" / harness
    logs = out / "logs"
    for d in (corpus, artifacts, logs):
        d.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    dirs = [corpus, seeds / harness]
    regressions = ROOT / "tests" / "data" / "fuzz" / harness
    if regressions.is_dir():
        dirs.append(regressions)
    cmd = [sys.executable, str(HERE / f"fuzz_{harness}.py"),
           f"-max_total_time={seconds}", f"-rss_limit_mb={RSS_LIMIT_MB}",
           f"-timeout={TIMEOUT_S}", f"-max_len={MAX_LEN}", "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/", *extra, *map(str, dirs)]
    t = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t
    log = proc.stdout
    (logs / f"{harness}.log").write_bytes(log)
    stats = {k.decode(): int(v) for k, v in STATS.findall(log)}
    execs = stats.get("number_of_executed_units")
    if execs is None:  # stopped before the final stats (a crash): the last progress line
        done = DONE.findall(log) or [(p, b"0") for p in PROGRESS.findall(log)[-1:]]
        execs = int(done[-1][0]) if done else 0
    crashes = sorted(str(p) for p in set(artifacts.iterdir()) - before)
    return {"harness": harness, "rc": proc.returncode, "execs": execs,
            "seconds": round(wall, 1), "execs_per_s": round(execs / max(wall, 1e-9), 1),
            "fuzzing_execs_per_s": stats.get("average_exec_per_sec"),
            "new_units": stats.get("new_units_added"), "peak_rss_mb": stats.get("peak_rss_mb"),
            "corpus_units": sum(1 for _ in corpus.iterdir()), "crashes": crashes,
            "log": str(logs / f"{harness}.log")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("harnesses", nargs="*", default=list(HARNESSES),
                   help=f"any of {', '.join(HARNESSES)}")
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness")
    p.add_argument("--jobs", type=int, default=2, help="harnesses run at a time")
    p.add_argument("--out", default=str(ROOT / "out" / "fuzz"))
    p.add_argument("--seeds", help="seeds already made (fuzz/seeds.py --out DIR) to use "
                                   "instead of making them in <out>/seeds")
    p.add_argument("--libfuzzer", action="append", default=[],
                   help="an extra libFuzzer flag (repeatable), e.g. -seed=1")
    args = p.parse_args(argv)
    unknown = set(args.harnesses) - set(HARNESSES)
    if unknown:
        p.error(f"unknown harness {sorted(unknown)}; known: {', '.join(HARNESSES)}")
    out = Path(args.out).resolve()
    env = dict(os.environ)
    if args.seeds:
        seeds = Path(args.seeds).resolve()
    else:
        seeds = out / "seeds"
        make_seeds(seeds, env)
    failed = False
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, h, args.seconds, out, seeds, env, args.libfuzzer)
                   for h in args.harnesses]
        for fut in futures:
            r = fut.result()
            failed |= r["rc"] != 0 or bool(r["crashes"])
            print(json.dumps(r), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
