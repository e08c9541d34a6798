#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md, in one script that runs in under 10 minutes on one H100/H200.
#
#   bench/gpu.sh wheels         # here, with network: the wheels the GPU image lacks, into .whl/
#   bench/gpu.sh run [OUT]      # on the GPU machine: every benchmark; tables and JSON under OUT
#
# `run` installs .whl/*.whl and megaflow into /tmp/site (no network needed), then:
#   1. megaflow bench kernels                      the fused log-prob kernels (Triton rows)
#   2. megaflow bench train, Wan 2.1 T2V 1.3B at 480x832x33, LoRA, every attention backend that
#      runs on the machine (native always; flash / flash_varlen / xformers / sage when installed)
#   3. megaflow bench train, HunyuanVideo as its recipe trains it (full fine-tune, bf16, checkpointing)
#      at 544x960x33: the largest slice that fits one GPU, at full width: half its blocks on an H200
#      (depth 0.5: `megaflow plan` puts it at 103 GiB of 139; 0.6 would leave no margin), a quarter on
#      an 80 GiB H100
#   4. megaflow plan for the same layouts on one GPU, against the peaks measured in 2 and 3
# Models are the real configs with random weights (model.path=random:NAME), so nothing is downloaded.
# Append OUT/benchmarks_gpu.md to BENCHMARKS.md afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    fetch() {
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$@"
    }
    # deepspeed ships only a source archive: build pure-Python wheels here (no CUDA ops compiled).
    python3 -m pip wheel --no-deps -q -w .whl "deepspeed==0.19.8" "diffusers==0.42.1"
    # What they need that the image lacks; pydantic's compiled core for CPython 3.12.
    fetch "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
        "hjson==3.1.0"
    ls -la .whl
    ;;
run)
    OUT="${2:-${OUT:-bench_out}}"
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
    export PYTHONPATH=/tmp/site MEGAFLOW_CACHE=/tmp/megaflow-cache PYTHONUNBUFFERED=1
    md="$OUT/benchmarks_gpu.md"
    mf() { python3 -m megaflow "$@"; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    gpu_gib=$(python3 -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
    hy_depth=$([ "$gpu_gib" -ge 120 ] && echo 0.5 || echo 0.25)

    echo "== 1. kernels"
    mf bench kernels --json "$OUT/kernels.json" --markdown "$md"

    single_gpu=(--set parallel.zero_stage=0 --set parallel.sp_size=1 --set parallel.hpz_partition_size=1)
    wan=(--config wan_t2v_1_3b --frames 33 --height 480 --width 832 --steps 8 --chunk 2 --repeats 3
         "${single_gpu[@]}" --set train.micro_batch_size=2)
    hunyuan=(--config hunyuan_t2v --scale width=1,depth=$hy_depth --frames 33 --height 544 --width 960 --steps 4 --chunk 1
             --repeats 2 "${single_gpu[@]}" --set rollout.gather_weights=false --set train.micro_batch_size=1
             --set train.grad_checkpointing=1.0)

    echo "== 2. Wan 2.1 1.3B, each attention backend this machine runs"
    for backend in native flash flash_varlen xformers sage; do
        if python3 -c "import sys; from megaflow.parallel.attention import check_attention_backend as c; c(sys.argv[1])" \
            "$backend" 2>/dev/null; then
            mf bench train "${wan[@]}" --set model.attention_backend=$backend \
                --json "$OUT/train_wan_$backend.json" --markdown "$md"
        else
            echo "attention backend $backend: not available here, skipped" | tee -a "$OUT/skipped.txt"
        fi
    done

    echo "== 3. HunyuanVideo"
    mf bench train "${hunyuan[@]}" --json "$OUT/train_hunyuan.json" --markdown "$md"

    echo "== 4. megaflow plan against the measured peaks"
    mf plan --gpus 1 --gpu-memory "$gpu_gib" "${wan[@]:0:2}" --set video.frames=33 --set video.height=480 \
        --set video.width=832 --set sampling.num_steps=8 --set rollout.chunk_size=2 "${single_gpu[@]}" \
        --set train.micro_batch_size=2 --set model.path=random:wan2.1_t2v_1.3b --json "$OUT/plan_wan.json"
    mf plan --gpus 1 --gpu-memory "$gpu_gib" "${hunyuan[@]:0:2}" --set video.frames=33 --set video.height=544 \
        --set video.width=960 --set sampling.num_steps=4 --set rollout.chunk_size=1 "${single_gpu[@]}" \
        --set rollout.gather_weights=false --set train.micro_batch_size=1 --set train.grad_checkpointing=1.0 \
        --set model.path=random:hunyuan_video_t2v@width=1,depth=$hy_depth --json "$OUT/plan_hunyuan.json"
    python3 -m megaflow.bench.plan_check "$OUT/plan_wan.json" "$OUT/train_wan_native.json" \
        "$OUT/plan_hunyuan.json" "$OUT/train_hunyuan.json" --markdown "$md"
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
