"""The fuzz harnesses (fuzz/): each runs under libFuzzer for a bounded time and finds
nothing, and every regression file under tests/data/fuzz/<harness>/ (inputs that once
crashed a harness) goes through its harness within its budget.

KVCODEC_FUZZ_S sets the seconds per harness (default 20: three rounds of two at a time,
~1 minute of the default run; ``make fuzz`` runs longer; 0 skips the fuzzing runs)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
REGRESSIONS = Path(__file__).resolve().parent / "data" / "fuzz"
HARNESSES = ("reader", "stream", "store", "corpus", "gguf")
SECONDS = int(os.environ.get("KVCODEC_FUZZ_S", "20"))


def _harness(name: str):
    """The harness module fuzz/fuzz_<name>.py (not instrumented: imported, not run)."""
    sys.path.insert(0, str(FUZZ))
    try:
        spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"fuzz_{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FUZZ))
    return module


def _regressions():
    return [pytest.param(h, p, id=f"{h}/{p.name}") for h in HARNESSES
            if (REGRESSIONS / h).is_dir() for p in sorted((REGRESSIONS / h).iterdir())]


@pytest.mark.parametrize("harness,path", _regressions())
def test_regression_files_pass_their_harness(harness, path, monkeypatch):
    """Each input is decoded or refused with a KVCodecError, within its budget (the
    harness raises anything else, and AssertionError past the budget), and strictly: by
    explicit validation, not by untrusted() catching a stray Python error."""
    module = _harness(harness)
    monkeypatch.setattr(module.common, "STRICT", True)
    module.TestOneInput(path.read_bytes())


def test_regression_folders_are_harnesses():
    for d in REGRESSIONS.iterdir() if REGRESSIONS.is_dir() else []:
        assert d.name in HARNESSES, f"tests/data/fuzz/{d.name} is not a harness"


# Run in a fresh process per harness: the first input's peak RSS growth, with the
# harness imported as libFuzzer imports it. What the harness's code imports lazily on a
# first call is charged to the first input's budget, and once made a CI run fail on a
# seed (gguf: importing the gguf package, ~46-64 MiB of a 64 MiB budget).
_FIRST_INPUT = """
import sys
sys.path.insert(0, sys.argv[1])
import importlib
module = importlib.import_module("fuzz_" + sys.argv[2])
budget = module.TestOneInput.budget
data = open(sys.argv[3], "rb").read()
budget.start(len(data))
try:
    module.target(data, budget)
except Exception:
    pass
print((budget._peak_and_now()[0] - budget.base) >> 20, budget.limits()[0] >> 20)
"""


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return out


@pytest.mark.parametrize("harness", HARNESSES)
def test_first_input_is_charged_for_itself_not_for_imports(seeds, harness):
    """The first seed's peak memory growth is at most half its budget: what a harness's
    code imports lazily must be imported by the harness before inputs run."""
    first = sorted((seeds / harness).iterdir())[0]
    proc = subprocess.run([sys.executable, "-c", _FIRST_INPUT, str(FUZZ), harness, str(first)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    growth_mib, budget_mib = map(int, proc.stdout.split())
    assert growth_mib <= budget_mib // 2, (harness, first.name, growth_mib, budget_mib)


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory, seeds):
    """One bounded libFuzzer run of every harness (fuzz/run.py, two at a time)."""
    if SECONDS <= 0:
        pytest.skip("KVCODEC_FUZZ_S=0")
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    out = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.run([sys.executable, str(FUZZ / "run.py"), "--seconds", str(SECONDS),
                           "--jobs", "2", "--out", str(out), "--seeds", str(seeds)],
                          capture_output=True, text=True,
                          timeout=4 * SECONDS + 600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["harness"]] = r
    return proc, results


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_fuzzes_without_findings(fuzz_runs, harness):
    proc, results = fuzz_runs
    assert harness in results, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = results[harness]
    log = Path(r["log"]).read_text(errors="replace")[-6000:] if Path(r["log"]).is_file() else ""
    assert r["rc"] == 0 and not r["crashes"], f"{r}\n{log}"
    assert r["execs"] > 0, f"{r}\n{log}"
