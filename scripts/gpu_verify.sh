#!/usr/bin/env bash
# GPU verification on a machine that already has torch (CUDA build), triton and transformers:
# build the extension with its CUDA kernels, run the whole test suite including the GPU tests,
# run the benchmarks, and pack results and logs into $OUT (default ./gpu-verify-out).
#
#   bash scripts/gpu_verify.sh build          # build + capkit-info (a minute or two)
#   bash scripts/gpu_verify.sh test           # build, then the default suite and -m gpu
#   bash scripts/gpu_verify.sh ops            # build, then masked_linear (+ dispatch table), info_nce, mask_threshold
#   bash scripts/gpu_verify.sh models         # build, then structured/sparse inference and the training step
#   bash scripts/gpu_verify.sh report         # rebuild report.md and plots from the results present
#
# Each stage fits in ten minutes on an H100; results go to benchmarks/results/<gpu>/ and are
# packed as $OUT/results.tgz (plus logs), ready to unpack into the repository and commit.
set -uo pipefail
stage="${1:-test}"
OUT="${OUT:-$PWD/gpu-verify-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CAPKIT_CUDA=1
py="${PYTHON:-python3}"

build() {
    if ! "$py" -c "import capkit._C" 2>/dev/null || [ "${CAPKIT_REBUILD:-0}" = 1 ]; then
        "$py" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
            || { tail -40 "$OUT/build.log"; echo "build failed" >&2; exit 1; }
    fi
    "$py" -m capkit.info 2>&1 | tee "$OUT/info.txt"
}

pack() {
    local dir
    dir=$("$py" -c "import torch; from benchmarks.harness import RESULTS_DIR, device_slug; print(RESULTS_DIR / device_slug(torch.device('cuda')))")
    if [ -d "$dir" ]; then
        tar czf "$OUT/results.tgz" -C "$(dirname "$dir")" "$(basename "$dir")" capkit/ops/dispatch_table.json 2>/dev/null \
            || tar czf "$OUT/results.tgz" -C "$(dirname "$dir")" "$(basename "$dir")"
        cp capkit/ops/dispatch_table.json "$OUT/" 2>/dev/null || true
        echo "packed $dir into $OUT/results.tgz"
    fi
}

case "$stage" in
    build) build ;;
    test)
        build
        "$py" -m pytest -q -p no:cacheprovider -m "not slow" -x --timeout 300 2>&1 | tee "$OUT/tests.log" | tail -30
        "$py" -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/tests_gpu.log" | tail -30
        ;;
    ops)
        build
        "$py" -m benchmarks.masked_linear --update-dispatch-table 2>&1 | tee "$OUT/bench_masked_linear.log" | tail -40
        "$py" -m benchmarks --full --only info_nce --only mask_threshold 2>&1 | tee "$OUT/bench_ops.log" | tail -30
        pack
        ;;
    models)
        build
        "$py" -m benchmarks --full --only structured_inference --only sparse_inference --only train_step \
            2>&1 | tee "$OUT/bench_models.log" | tail -40
        pack
        ;;
    report)
        "$py" -m benchmarks --full --report-only 2>&1 | tail -20
        pack
        ;;
    *) echo "unknown stage '$stage' (build, test, ops, models, report)" >&2; exit 2 ;;
esac
