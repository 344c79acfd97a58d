#!/usr/bin/env bash
# The GPU plan of benchmarks/RESULTS.md (issue 6) as named steps, several per device-tool `run` call (each call
# must end inside its 10 minutes, and a fresh machine costs a minute or two to start, so few full calls are
# best). Each step writes its JSON to $OUT (./out when OUT is unset) when it finishes, so a call cut off at its
# limit still returns the steps it completed.
#
#   here, once:  COMFYUI_DIR=/path/ComfyUI bash benchmarks/gpu_plan.sh pack   # .comfy/ + .whl/ (.gitignore: never committed)
#   on the GPU:  run(carry=[".comfy", ".whl"], command="bash benchmarks/gpu_plan.sh sd15 sd15-compile", timeout_s=600)
#
# Steps (rough times on an H100, from the CPU runs and the cost model; measure them):
#   smoke          every CUDA-only path at tiny size first (cases, --profile, reduce-overhead) ~2 min
#   sd15           SD1.5 baseline, all cases, with the breakdown and a profiled iteration  ~4 min
#   sd15-compile   FixConfig.compile = reduce-overhead (CUDA graphs) on the Focus-N-Fix cases ~5 min
#   sdxl           SDXL baseline (draft_b1, fnf_b1)                                      ~6 min
#   sdxl-compile   SDXL with reduce-overhead                                             ~8 min
#   se             S&E with the older x0-MSE preservation (the default keys term is in sd15) ~1 min
#   sd15-fp16      fnf_b1/fnf_b4 in fp16, ComfyUI's own dtype for SD1.5 on most GPUs (loss scaling on) ~3 min
#   sd15-memory    memory levers on fnf_b1/fnf_b4: --no-checkpoint, --checkpoint-decode,
#                  --inference-weights off                                                ~5 min
#   sdxl-memory    SDXL fnf_b1 with fp8 UNet weights, then with the reward tower in bf16 ~7 min
#   sd15-flags     ComfyUI launch flags an artist may use: --fast autotune (cuDNN autotuning),
#                  --force-channels-last, on fnf_b1/fnf_b4                                ~4 min
#   compile-check  one graph per call, and no CPU work inside it, on the CUDA build      ~3 min
#   sd15-sampler   fnf_b1/fnf_b4 with dpmpp_2m on karras at 20 steps: the artist's fewer-steps lever
#                  (a second-order sampler at 20 steps against the issue's DDIM at 50)    ~2 min
# The baseline and compile steps profile one extra iteration per case (train_speed --profile: kernel launches,
# device-busy fraction, top kernels), the profile issue 6 asks for where a goal is missed.
# Suggested calls for a 30-minute budget, most important first: "smoke sd15", "sd15-compile", "sdxl sdxl-compile",
# "se sd15-fp16 compile-check", then what time is left: "sd15-memory sdxl-memory", "sd15-flags sd15-sampler".
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
    # kornia is the one runtime dependency the device image lacks (checked in session 1)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl kornia==0.9.0 kornia_rs==0.2.0
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

failed=()
bench() {  # train_speed through ComfyUI on the GPU, bf16 (a later --dtype wins); a failure is noted, the plan goes on
    local name=$1 rc=0; shift
    python3 benchmarks/train_speed.py --backend comfy --device cuda --dtype bf16 "$@" > "$out/$name.json" || rc=$?
    echo "[gpu_plan] wrote $out/$name.json (rc $rc; $SECONDS s since the start)"
    [ "$rc" = 0 ] || failed+=("$name")
}
ts() { local name=$1; shift; bench "$name" --size full "$@"; }  # at the issue's settings

for step in "$@"; do
    case "$step" in
        smoke)         bench smoke --size tiny --models sd15,sdxl --iters 1 --warmup 0 --profile
                       bench smoke_compile --size tiny --models sd15 --cases fnf_b1 --compile reduce-overhead \
                           --iters 1 --warmup 1 ;;
        sd15)          ts sd15_base --models sd15 --iters 5 --warmup 2 --breakdown --profile ;;
        sd15-compile)  ts sd15_compile --models sd15 --cases draft_b1,fnf_b1,fnf_b4 --compile reduce-overhead \
                           --iters 5 --warmup 2 --breakdown --profile ;;
        sdxl)          ts sdxl_base --models sdxl --iters 3 --warmup 1 --profile ;;
        sdxl-compile)  ts sdxl_compile --models sdxl --cases draft_b1,fnf_b1 --compile reduce-overhead --iters 3 \
                           --warmup 2 --breakdown --profile ;;
        se)            ts sd15_se_outputs --models sd15 --cases se_preserve_b4,se_b4 --preservation outputs \
                           --iters 10 --warmup 3 ;;
        sd15-fp16)     ts sd15_fp16 --models sd15 --cases fnf_b1,fnf_b4 --dtype fp16 --iters 3 --warmup 1 ;;
        sd15-memory)   for lever in no-checkpoint checkpoint-decode; do
                           ts "sd15_$lever" --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 "--$lever"
                       done
                       ts sd15_plain_weights --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 \
                           --inference-weights off ;;
        sdxl-memory)   ts sdxl_fp8 --models sdxl --cases fnf_b1 --weight-dtype fp8_e4m3fn --iters 3 --warmup 1
                       ts sdxl_reward_bf16 --models sdxl --cases fnf_b1 --reward-dtype bf16 --iters 3 --warmup 1 ;;
        sd15-flags)    ts sd15_fast_autotune --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 \
                           --comfy-args="--fast autotune"
                       ts sd15_channels_last --models sd15 --cases fnf_b1,fnf_b4 --iters 3 --warmup 1 \
                           --comfy-args="--force-channels-last" ;;
        sd15-sampler)  ts sd15_dpmpp_2m_20 --models sd15 --cases fnf_b1,fnf_b4 --sampler dpmpp_2m --scheduler karras \
                           --steps 20 --iters 3 --warmup 1 ;;
        compile-check) rc=0
                       python3 benchmarks/compile_check.py --models sd15,sdxl --size full --device cuda \
                           > "$out/compile_check.json" || rc=$?
                       echo "[gpu_plan] wrote $out/compile_check.json (rc $rc; $SECONDS s since the start)"
                       [ "$rc" = 0 ] || failed+=(compile_check) ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "[gpu_plan] failed: ${failed[*]} (each JSON holds what ran and the errors)" >&2
    exit 1
fi
