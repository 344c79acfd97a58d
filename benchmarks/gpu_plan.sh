#!/usr/bin/env bash
# The GPU plan of benchmarks/RESULTS.md (issue 6) as named steps, several per device-tool `run` call (each call
# must end inside its 10 minutes, and a fresh machine costs a minute or two to start, so few full calls are
# best). Each train_speed run rewrites its JSON in $OUT (./out when OUT is unset) after every case, and runs
# under `timeout`: its own limit, or what is left of the call's PLAN_SECONDS (default 570 of the tool's 600), so
# a run cut off keeps the cases it finished and the call still ends in time to return its files. Each run's output
# (its progress and any traceback) is also kept in $OUT/NAME.log (cut to its first 1 and last 6 MiB past 8 MiB):
# two files a run, and the tool returns at most 8 files a call, so a call holds at most 4 runs.
#
#   here, once:  COMFYUI_DIR=/path/ComfyUI bash benchmarks/gpu_plan.sh pack   # .comfy/ + .whl/ (.gitignore: never committed)
#   on the GPU:  run(carry=[".comfy", ".whl"], command="bash benchmarks/gpu_plan.sh smoke sd15", timeout_s=600)
#
# Steps (rough times on an H100, from the CPU runs and the cost model; measure them), [each run's limit in s]:
#   smoke          every CUDA-only path at tiny size first (cases, --breakdown with ComfyUI's KSampler, --profile,
#                  reduce-overhead with --profile), then reduce-overhead under ComfyUI's own allocator
#                  (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, which its main.py sets on most GPUs; the
#                  core's check that skips CUDA graphs there turned off, so it shows whether they fail and
#                  whether the fallback holds); stops the call at once if comfy.samplers or kornia cannot be
#                  imported (wheels not carried)                               ~2-3 min [210 + 180 + 90]
#   sd15           SD1.5 baseline, all cases, with the breakdown and a profiled iteration  ~4 min [420]
#   sd15-compile   FixConfig.compile = reduce-overhead (CUDA graphs) on the Focus-N-Fix cases; compiles
#                  twice (batch 1, then batch 4)                                      ~5-7 min [540]
#   sdxl           SDXL baseline (draft_b1, fnf_b1)                                      ~6 min [480]
#   sdxl-compile   SDXL with reduce-overhead (breakdown best of 2)                       ~8 min [570]
#   se             S&E with the older x0-MSE preservation (the default keys term is in sd15) ~1 min [180]
#   sd15-fp16      fnf_b1/fnf_b4 in fp16 (VAE in bf16), ComfyUI's own dtypes for SD1.5 on most GPUs (loss
#                  scaling on)                                                            ~3 min [300]
#   sd15-memory    memory levers on fnf_b1/fnf_b4: --no-checkpoint (no block-wise checkpointing at all),
#                  --inference-weights off                                                ~4 min [240 + 240]
#   sdxl-memory    SDXL fnf_b1 with fp8 UNet weights, then with the reward tower in bf16 ~7 min [300 + 300]
#   sd15-flags     ComfyUI launch flags an artist may use: --fast autotune (cuDNN autotuning),
#                  --force-channels-last, on fnf_b1/fnf_b4                                ~4 min [240 + 240]
#   compile-check  one graph per call, and no CPU work inside it, on the CUDA build      ~3 min [300]
#   sd15-sampler   fnf_b1/fnf_b4 with dpmpp_2m on karras at 20 steps: the artist's fewer-steps lever
#                  (a second-order sampler at 20 steps against the issue's DDIM at 50)    ~2 min [240]
# The baseline and compile steps profile one extra iteration per case (train_speed --profile: kernel launches,
# device-busy fraction, top kernels), the profile issue 6 asks for where a goal is missed.
# Suggested calls, each under 10 minutes by the estimates above, most important first (a 30-minute budget
# holds about the first four, with one machine start): "smoke sd15", "sd15-compile", "sdxl se", "sdxl-compile";
# then, in a later session: "sd15-fp16 compile-check", "sd15-memory sd15-sampler", "sdxl-memory", "sd15-flags".
# A failed case is recorded in its JSON ("error", "failed_cases") and the plan goes on; it exits 1 at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
STEPS=" smoke sd15 sd15-compile sdxl sdxl-compile se sd15-fp16 sd15-memory sdxl-memory sd15-flags compile-check sd15-sampler "

if [ "${1:-}" = pack ]; then
    : "${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout}"
    py=${PYTHON:-python3}
    rm -rf .comfy && mkdir -p .comfy && cp -r "$COMFYUI_DIR" .comfy/ComfyUI && rm -rf .comfy/ComfyUI/.git
    find .comfy -name __pycache__ -prune -exec rm -rf {} +
    # what the device image lacks: kornia (session 1), and torchsde + trampoline, which comfy.samplers imports
    # (every Focus-N-Fix/DRaFT case reaches it; review of session 12). All but kornia_rs are py3-none-any wheels
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl kornia==0.9.0 kornia_rs==0.2.0 torchsde==0.2.6 trampoline==0.1.2
    du -sh .comfy .whl
    exit 0
fi

[ $# -gt 0 ] || { echo "usage: gpu_plan.sh pack | STEP [STEP ...]; steps:$STEPS" >&2; exit 2; }
for step in "$@"; do  # every name checked before any device time is spent
    case "$STEPS" in
        *" $step "*) ;;
        *) echo "unknown step '$step'; usage: gpu_plan.sh pack | STEP [STEP ...]; steps:$STEPS" >&2; exit 2 ;;
    esac
done
export COMFYUI_DIR=${COMFYUI_DIR:-$PWD/.comfy/ComfyUI} PYTHONUNBUFFERED=1
[ -d "$COMFYUI_DIR" ] || { echo "no $COMFYUI_DIR: run 'gpu_plan.sh pack' here and carry .comfy and .whl" >&2; exit 2; }
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$out"
nvidia-smi -L || true

budget=${PLAN_SECONDS:-570}  # the call's runs share it; the rest of the tool's 600 s returns $OUT
failed=()
log_bytes=$((8 << 20))  # a run's log past this keeps its first 1 and last 6 MiB (the tool returns 16 MiB a file)
limited() {  # NAME SECONDS STDOUT CMD...: CMD under `timeout`, its own SECONDS or what is left of the budget; its
    local name=$1 limit=$2 to=$3 rc=0 log="$out/$1.log"; shift 3  # stderr (and stdout, unless STDOUT names a
    local left=$((budget - SECONDS))                                # file) shown and kept in $out/NAME.log
    if [ "$left" -lt 5 ]; then
        echo "[gpu_plan] $name not started: ${left}s left of PLAN_SECONDS=$budget" >&2; failed+=("$name"); return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    if [ -n "$to" ]; then
        timeout -k 10 "$limit" "$@" 2>&1 > "$to" | tee "$log" >&2 || rc=$?  # pipefail: timeout's status
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$log" >&2 || rc=$?
    fi
    if [ "$(wc -c < "$log")" -gt "$log_bytes" ]; then
        { head -c $((1 << 20)) "$log"; printf '\n[gpu_plan] ... log cut here ...\n'; tail -c $((6 << 20)) "$log"; } \
            > "$log.cut" && mv "$log.cut" "$log"
    fi
    rm -f "$out/$name.json.tmp"  # a JSON rewrite cut off mid-way: not a file to spend the tool's 8 on
    [ "$rc" != 124 ] && [ "$rc" != 137 ] || echo "[gpu_plan] $name stopped at its ${limit}s limit" >&2
    echo "[gpu_plan] wrote $out/$name.json and $name.log (rc $rc; $SECONDS s since the start)"
    [ "$rc" = 0 ] || failed+=("$name")
}
run_env=()  # NAME=VALUE variables for the next bench runs (smoke's cudaMallocAsync run)
bench() {  # NAME SECONDS ARGS...: train_speed through ComfyUI on the GPU, bf16 (a later --dtype wins), its JSON
    local name=$1 limit=$2; shift 2  # rewritten after every case; a failure is noted, the plan goes on
    limited "$name" "$limit" "" env ${run_env[@]+"${run_env[@]}"} python3 benchmarks/train_speed.py --backend comfy \
        --device cuda --dtype bf16 --out "$out/$name.json" "$@"
}
ts() { local name=$1 limit=$2; shift 2; bench "$name" "$limit" --size full "$@"; }  # at the issue's settings
imports() {  # what every Focus-N-Fix/DRaFT case imports, before any run: a missing wheel stops the call here
    python3 -c 'import os, sys; sys.path.insert(0, os.environ["COMFYUI_DIR"]); import comfy.samplers, kornia' || {
        echo "[gpu_plan] cannot import comfy.samplers and kornia (torchsde, trampoline, kornia, kornia_rs): run" \
             "'gpu_plan.sh pack' here and carry .comfy and .whl; stopping before any run" >&2
        exit 1
    }
}

for step in "$@"; do
    case "$step" in
        smoke)         imports
                       bench smoke 210 --size tiny --models sd15,sdxl --iters 1 --warmup 0 --breakdown --profile
                       bench smoke_compile 180 --size tiny --models sd15 --cases fnf_b1 --compile reduce-overhead \
                           --iters 1 --warmup 1 --profile
                       # as ComfyUI runs it: main.py's cuda_malloc sets this allocator for +cu torch on most GPUs
                       run_env=(PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync)
                       bench smoke_async 90 --size tiny --models sd15 --cases fnf_b1 --compile reduce-overhead \
                           --allocator-check off --iters 1 --warmup 1
                       run_env=() ;;
        sd15)          ts sd15_base 420 --models sd15 --iters 5 --warmup 2 --breakdown --profile ;;
        sd15-compile)  ts sd15_compile 540 --models sd15 --cases draft_b1,fnf_b1,fnf_b4 --compile reduce-overhead \
                           --iters 5 --warmup 2 --breakdown --profile ;;
        sdxl)          ts sdxl_base 480 --models sdxl --iters 3 --warmup 1 --profile ;;
        sdxl-compile)  ts sdxl_compile 570 --models sdxl --cases draft_b1,fnf_b1 --compile reduce-overhead --iters 3 \
                           --warmup 2 --breakdown --breakdown-reps 2 --profile ;;
        se)            ts sd15_se_outputs 180 --models sd15 --cases se_preserve_b4,se_b4 --preservation outputs \
                           --iters 10 --warmup 3 ;;
        sd15-fp16)     ts sd15_fp16 300 --models sd15 --cases fnf_b1,fnf_b4 --dtype fp16 --iters 3 --warmup 1 ;;
        sd15-memory)   ts sd15_no-checkpoint 240 --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 --no-checkpoint
                       ts sd15_plain_weights 240 --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 \
                           --inference-weights off ;;
        sdxl-memory)   ts sdxl_fp8 300 --models sdxl --cases fnf_b1 --weight-dtype fp8_e4m3fn --iters 3 --warmup 1
                       ts sdxl_reward_bf16 300 --models sdxl --cases fnf_b1 --reward-dtype bf16 --iters 3 --warmup 1 ;;
        sd15-flags)    ts sd15_fast_autotune 240 --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 \
                           --comfy-args="--fast autotune"
                       ts sd15_channels_last 240 --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 \
                           --comfy-args="--force-channels-last" ;;
        sd15-sampler)  ts sd15_dpmpp_2m_20 240 --models sd15 --cases fnf_b1,fnf_b4 --sampler-name dpmpp_2m --scheduler karras \
                           --steps 20 --iters 3 --warmup 1 ;;
        compile-check) limited compile_check 300 "$out/compile_check.json" \
                           python3 benchmarks/compile_check.py --models sd15,sdxl --size full --device cuda ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "[gpu_plan] failed: ${failed[*]} (each JSON holds what ran and the errors)" >&2
    exit 1
fi
