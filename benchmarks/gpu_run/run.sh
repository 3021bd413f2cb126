#!/bin/bash
# One run on a lent GPU machine (the device tool), from the repository root there:
# build with its nvcc and python3, run tests/test_cuda.py (memcheck included) and
# bench_cuda.py on the KV that prepare.py wrote here. Carry devrun and .whl:
#   run(command="bash benchmarks/gpu_run/run.sh", carry=["devrun", ".whl"])
# TEST_S (test time limit), PYTEST_K (a -k filter), BENCH_MB (sizes) and NCU=0 (no
# Nsight Compute section) tune it.
export PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 9
mkdir -p /tmp/pp && ln -sfn $R/codec /tmp/pp/kvcodec && ln -sfn $R/cli /tmp/pp/kvcodec_cli
export PYTHONPATH=/tmp/site:/tmp/pp
nvidia-smi -L; nvcc --version | tail -2; which compute-sanitizer; nproc
date +%s > $OUT/t0
( cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR=$(python3 -c 'import pybind11;print(pybind11.get_cmake_dir())') \
  -DPython_EXECUTABLE=$(which python3) -DKVCODEC_OUTPUT_DIR=$R/codec -DKVCODEC_CUDA=ON \
  && cmake --build /tmp/b -j 16 ) > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "built in $(( $(date +%s) - $(cat $OUT/t0) )) s"
python3 -c "import kvcodec, torch; from kvcodec.integrations import cuda; print('cuda available', cuda.available(), torch.__version__, torch.cuda.get_device_name(0))"
cp tests/test_cuda.py benchmarks/gpu_run/conftest.py devrun/
timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider -o addopts= --rootdir devrun devrun/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"} -rs 2>&1 | tee $OUT/pytest.log | tail -60
echo "tests done at $(( $(date +%s) - $(cat $OUT/t0) )) s"
for mb in ${BENCH_MB:-64 256}; do nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw --format=csv,noheader;
  timeout 150 python3 benchmarks/bench_cuda.py --kv devrun/kv2048h.kvc --min-mb $mb --config default --config uncentered --json 2>&1 | tee -a $OUT/bench.jsonl | tail -3
done
# Hardware counters of one shared-tables decode launch (Firecracker machines only; gVisor
# refuses the profiler): achieved occupancy, issue-slot and memory throughput.
if [ "${NCU:-1}" != 0 ] && which ncu >/dev/null; then
  timeout 120 ncu --clock-control none -k regex:decode_shared_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 -c "import kvcodec; from kvcodec.integrations import cuda
kv = kvcodec.decode(open('devrun/kv2048h.kvc', 'rb').read())
run = cuda.DeviceFile(kvcodec.open(kvcodec.encode(kv))).prepare()
for _ in range(5): run.launch()
run.finish()" > $OUT/ncu.txt 2>&1; echo "ncu rc=$?"; grep -E "Duration|Throughput|Occupancy|Registers|Stall|Warp Cycles|Issued" $OUT/ncu.txt | head -40
fi
echo "all done at $(( $(date +%s) - $(cat $OUT/t0) )) s"
