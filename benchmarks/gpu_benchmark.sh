#!/usr/bin/env bash
# Issue 19's benchmark on NVIDIA GPUs: one command, from a fresh clone with ../shared/data beside it
# (pneumoniamnist.npz and chest_xray/, as ../shared/data/README.md describes them), on a machine with
# NVIDIA's driver and Python 3.11 (internet access for the first set-up):
#
#   bash benchmarks/gpu_benchmark.sh
#
# It refuses (exit 3, nothing measured) unless `nvidia-smi -L` lists a GPU, CUDA_VISIBLE_DEVICES does not
# hide them all, and TensorFlow then sees one: its output is never a CPU result by mistake. Then:
#  1. a virtual environment (--venv, default ~/.cache/tlpipe/gpu-venv; made once, reused while
#     constraints.txt is unchanged) with the pinned dependencies, tensorflow[and-cuda] at the pinned
#     version in place of tensorflow-cpu, and this checkout installed editable without its dependencies;
#  2. benchmarks/stage_table.py for each recipe and size with train_frozen/fine_tune mixed_precision auto
#     (mixed_float16 on a GPU) and distribution mirrored (every local GPU):     OUT/LABEL_stage_table.json
#  3. benchmarks/precision_speed.py's float32, mixed_float16, float32_xla and mixed_float16_xla variants
#     (the backbone's raw forward and training throughput) at each size:       OUT/LABEL_precision_speed_SIZE.json
#  4. the GPUs (nvidia-smi -L) and every table, as Markdown:                  OUT/LABEL.md (and stdout)
#
# Options: --recipes "pneumoniamnist kermany"  --sizes "128 224"  --label gpu  --out-dir benchmarks/results
#          --set KEY=VALUE (more params overrides, repeatable, e.g. --set fine_tune.batch_size=128)
#          --venv DIR   --dry-run (check for a GPU, then print the commands instead of running them)
# Environment: PYTHON (default python3.11), NVIDIA_SMI (default nvidia-smi).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
refuse() {
    echo "gpu_benchmark: no GPU: $1." >&2
    echo "gpu_benchmark: nothing was measured (this script measures GPUs only; on a CPU run benchmarks/stage_table.py)." >&2
    exit 3
}

recipes="pneumoniamnist kermany"
sizes="128 224"
label=gpu
out_dir=benchmarks/results
venv="${HOME}/.cache/tlpipe/gpu-venv"
dry_run=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --recipes) recipes="${2:?--recipes needs a value}"; shift 2 ;;
        --sizes) sizes="${2:?--sizes needs a value}"; shift 2 ;;
        --label) label="${2:?--label needs a value}"; shift 2 ;;
        --out-dir) out_dir="${2:?--out-dir needs a value}"; shift 2 ;;
        --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
        --set) extra+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_benchmark: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for size in $sizes; do
    [[ "$size" =~ ^[0-9]+$ ]] || { echo "gpu_benchmark: --sizes takes numbers, got $size" >&2; exit 2; }
done

cd "$(dirname "$0")/.."
run() {
    if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 1. a GPU, before anything slow
smi="${NVIDIA_SMI:-nvidia-smi}"
command -v "$smi" > /dev/null 2>&1 || refuse "$smi is not installed (no NVIDIA driver)"
gpus="$("$smi" -L 2> /dev/null | grep '^GPU ' || true)"
[ -n "$gpus" ] || refuse "$smi -L lists no GPU"
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; }; then
    refuse "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every GPU"
fi
[ "$dry_run" = 1 ] || [ -d ../shared/data ] || { echo "gpu_benchmark: no ../shared/data beside the checkout" >&2; exit 2; }
echo "gpu_benchmark: $(echo "$gpus" | wc -l) GPU(s):" >&2
echo "$gpus" >&2

# 2. the environment: tensorflow[and-cuda] in place of tensorflow-cpu, at the pinned version
py="$venv/bin/python"
stamp="$venv/.installed"
want="$(sha256sum constraints.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2> /dev/null || true)" != "$want" ]; then
    tf_version="$(sed -n 's/^tensorflow[-_]cpu==//p' constraints.txt)"
    [ -n "$tf_version" ] || { echo "gpu_benchmark: constraints.txt pins no tensorflow_cpu" >&2; exit 2; }
    run "${PYTHON:-python3.11}" -m venv "$venv"
    run bash -c "grep -v '^tensorflow[-_]cpu==' constraints.txt > '$venv/requirements-gpu.txt'"
    run "$py" -m pip install --quiet -r "$venv/requirements-gpu.txt" "tensorflow[and-cuda]==$tf_version"
    run "$py" -m pip install --quiet --no-deps -e .
    run bash -c "echo $want > '$stamp'"
fi
check='import sys, tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print(f"gpu_benchmark: TensorFlow {tf.__version__} sees {len(gpus)} GPU(s)", file=sys.stderr)
sys.exit(0 if gpus else 1)'
run "$py" -c "$check" || refuse "TensorFlow in $venv sees none (CUDA libraries or driver: see the lines above)"

# 3. the stage table, then the raw throughput per precision, then every table in one Markdown file
run mkdir -p "$out_dir"
args=()
for recipe in $recipes; do args+=(--recipe "$recipe"); done
for size in $sizes; do args+=(--size "$size"); done
run "$py" benchmarks/stage_table.py "${args[@]}" \
    --set train_frozen.mixed_precision=auto --set fine_tune.mixed_precision=auto \
    --set train_frozen.distribution=mirrored --set fine_tune.distribution=mirrored \
    "${extra[@]}" --label "$label" --out "$out_dir/${label}_stage_table.json" \
    --log-dir "results/bench_logs/stage_table"
results=("$out_dir/${label}_stage_table.json")
for size in $sizes; do
    run "$py" benchmarks/precision_speed.py --size "$size" \
        --variants float32 mixed_float16 float32_xla mixed_float16_xla \
        --out "$out_dir/${label}_precision_speed_${size}.json"
    results+=("$out_dir/${label}_precision_speed_${size}.json")
done
markdown="$out_dir/${label}.md"
if [ "$dry_run" = 1 ]; then
    run "$py" benchmarks/stage_table.py --table "${results[@]}"
else
    { printf '# GPU benchmark (%s)\n\n%s\n\n' "$label" "$gpus"; "$py" benchmarks/stage_table.py --table "${results[@]}"; } > "$markdown"
    cat "$markdown"
    echo "gpu_benchmark: wrote $markdown and ${results[*]}" >&2
fi
