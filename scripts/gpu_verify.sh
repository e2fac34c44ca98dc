#!/usr/bin/env bash
# GPU verification on a machine that already has torch (CUDA build), triton and transformers:
# build the extension with its CUDA kernels, run the whole test suite including the GPU tests,
# run the benchmarks, and pack results and logs into $OUT (default ./gpu-verify-out).
#
#   bash scripts/gpu_verify.sh all            # one device call, cut to CAPKIT_GPU_SECONDS (default 480):
#                                             # build for this GPU, GPU tests, target benchmarks, suite
#   bash scripts/gpu_verify.sh build          # build + capkit-info (a minute or two)
#   bash scripts/gpu_verify.sh test           # build, then the default suite and -m gpu
#   bash scripts/gpu_verify.sh ops            # build, then masked_linear (+ dispatch table), info_nce, mask_threshold
#   bash scripts/gpu_verify.sh models         # build, then structured/sparse inference and the training step
#   bash scripts/gpu_verify.sh report         # rebuild report.md and plots from the results present
#   bash scripts/gpu_verify.sh carry          # HERE, not on the GPU machine: MiniLM (fp16 copy) and SST-2
#                                             # into .gpu-carry/ (~50 MiB), for the device's `carry`
#   bash scripts/gpu_verify.sh accuracy       # SST-2 seeded accuracy runs from .gpu-carry/ (resumable:
#                                             # call again to go on; finished runs are read back)
#
# Each stage fits in ten minutes on an H100; results go to benchmarks/results/<gpu>/ and are
# packed as $OUT/results.tgz (plus logs), ready to unpack into the repository and commit.
set -uo pipefail
stage="${1:-test}"
OUT="${OUT:-$PWD/gpu-verify-out}"
[ "$stage" = carry ] || mkdir -p "$OUT"
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
        [ "$stage" = all ] || cp capkit/ops/dispatch_table.json "$OUT/" 2>/dev/null || true  # all: 8 files at most
        echo "packed $dir into $OUT/results.tgz"
    fi
}

# all: within NAME MIN_SECONDS COMMAND...: runs COMMAND when MIN_SECONDS are left before the
# deadline, stops it (SIGINT: pytest and the benchmarks report what they finished) at the deadline;
# output to $OUT/NAME.log, one line per step to $OUT/steps.txt
within() {
    local name=$1 need=$2 t0 rc
    shift 2
    if [ "$(left)" -lt "$need" ]; then
        echo "[all] $name: not run, $(left) s left" | tee -a "$OUT/steps.txt"
        return 0
    fi
    t0=$(date +%s)
    timeout -s INT -k 20 "$(left)" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "[all] $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
    tail -n 4 "$OUT/$name.log"
}
left() { echo $(( t_end - $(date +%s) )); }

case "$stage" in
    all)
        # Everything that needs a GPU in one device call, most telling first. Machine code for this
        # GPU only (half the compile time of the release's sm_80 + sm_90a); results and logs land in
        # $OUT step by step (at most 8 files come back), so a cut-off run still returns what finished.
        t_end=$(( $(date +%s) + ${CAPKIT_GPU_SECONDS:-480} ))
        : > "$OUT/steps.txt"
        export CAPKIT_CUDA_ARCHS="${CAPKIT_CUDA_ARCHS:-$("$py" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))')}"
        t0=$(date +%s)
        build >>"$OUT/steps.txt" 2>&1
        echo "[all] build for sm_$CAPKIT_CUDA_ARCHS: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
        xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 6 --dist loadfile" || true)
        # the kernels against their references on the GPU
        within tests_gpu 60 "$py" -m pytest -q -p no:cacheprovider -m gpu -rfE --maxfail 40 \
            tests/test_cuda_info_nce.py tests/test_cuda_masked_linear.py tests/test_triton_info_nce.py \
            tests/test_triton_masked_linear.py tests/test_topk.py tests/test_masked_linear.py tests/test_info_nce.py
        # the benchmarks behind the performance targets (bf16 on the GPU), then the report
        within bench_ops 60 sh -c "'$py' -m benchmarks.masked_linear --shapes bert-ffn-in bert-ffn-out \
            --kinds unstructured block --sparsities 0 0.9 --min-time 0.1 && \
            '$py' -m benchmarks.info_nce --min-time 0.1 --shapes 32x4200x768 256x65536x768 4096x65536x768 \
            4096x1048576x768 && '$py' -m benchmarks.mask_threshold --min-time 0.1"
        pack >>"$OUT/steps.txt" 2>&1
        # the whole default suite with CUDA present
        within tests 60 "$py" -m pytest -q -p no:cacheprovider -m "not slow" -rfE --maxfail 40 $xdist
        within bench_models 90 "$py" -m benchmarks --full --only train_step --only structured_inference \
            --only sparse_inference --min-time 0.2
        "$py" -m benchmarks --full --report-only >>"$OUT/steps.txt" 2>&1
        pack >>"$OUT/steps.txt" 2>&1
        cat "$OUT/steps.txt"
        ;;
    build) build ;;
    test)
        build
        "$py" -m pytest -q -p no:cacheprovider -m "not slow" --maxfail 30 --timeout 300 2>&1 | tee "$OUT/tests.log" | tail -30
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
    carry)
        # fp16 weights keep MiniLM under the transfer limit; the config says float32, so it loads
        # (and trains) in fp32 as the embedded model does
        glue="${CAPKIT_GLUE:-../shared/data/glue}"
        [ -f "$glue/SST-2/train.tsv" ] || { echo "no $glue/SST-2/train.tsv (set CAPKIT_GLUE)" >&2; exit 2; }
        mkdir -p .gpu-carry/glue && cp -r "$glue/SST-2" .gpu-carry/glue/
        "$py" - <<'PY'
import json, transformers
from capkit.cap.trainer import model_path
src, out = model_path("minilm"), ".gpu-carry/minilm-fp16"
transformers.AutoModel.from_pretrained(src).half().save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
cfg = json.load(open(out + "/config.json"))
cfg.update({k: "float32" for k in cfg if "dtype" in k})
json.dump(cfg, open(out + "/config.json", "w"), indent=2)
PY
        du -sh .gpu-carry
        ;;
    accuracy)
        build
        [ -d .gpu-carry/minilm-fp16 ] || { echo "no .gpu-carry/ (run the carry stage here, pass carry=[.gpu-carry])" >&2; exit 2; }
        # the CPU runs' settings (benchmarks/results/amd-epyc-2c/accuracy.md) on more data; at the
        # stage's time limit a Ctrl-C (SIGINT) makes the running capkit-prune write its checkpoint
        timeout -s INT -k 30 "${CAPKIT_STAGE_SECONDS:-540}" "$py" -m benchmarks.accuracy --tasks sst2 --seeds 1 2 3 \
            --methods movement@0.9 cap-m@0.9 cap-f@0.5 cap-f@0.9 -- \
            --model .gpu-carry/minilm-fp16 --data-dir .gpu-carry/glue/SST-2 \
            --max-train-examples "${CAPKIT_SST2_EXAMPLES:-20000}" --epochs "${CAPKIT_SST2_EPOCHS:-5}" \
            --max-length 64 --teacher-epochs 2 --batch-size 32 --learning-rate 3e-4 --score-learning-rate 0.1 \
            --extra-negatives 1024 --block-size 32 --initial-warmup 3 --final-warmup 1 --save-every 200 \
            2>&1 | tee -a "$OUT/bench_accuracy.log" | grep -v "Loading\|MISSING" | tail -30
        pack
        ;;
    *) echo "unknown stage '$stage' (all, build, test, ops, models, report, carry, accuracy)" >&2; exit 2 ;;
esac
