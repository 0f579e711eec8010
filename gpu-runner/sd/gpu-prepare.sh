#!/usr/bin/env bash
# Prepared (optimized fp16) graphs on the lent GPU machine, against the plain ones and against
# diffusers on the same weights. BENCHMARKS.md ("Prepared graphs on the H200") has the commands
# that fill .gpu/ here and the three device calls, which must follow each other while the
# machine is warm (/tmp survives; `measure` rebuilds the packages if it does not find them).
# ONNX Runtime's CUDA libraries and the rest do not fit in one call's 64 MiB, hence `unpack`:
#
#   bash gpu-runner/sd/gpu-prepare.sh unpack    # carrying .gpu/ort, .gpu/unpack-ort-cuda: to /tmp/ort
#   bash gpu-runner/sd/gpu-prepare.sh tiny      # carrying the same as build: the tiny checks alone
#   bash gpu-runner/sd/gpu-prepare.sh build     # carrying .gpu/{diffusion,render}-bench.xz, .gpu/diffusers.tar.xz:
#                                               # the tiny check, the SD-1.5-sized package + its prepared copy
#   bash gpu-runner/sd/gpu-prepare.sh measure [service|speed]
#                                               # carrying the same: the diffusers peer and the runner's
#                                               # service (render-bench), then diffusion-bench on both
#                                               # packages; one part per call keeps each under 10 minutes
#
# .gpu/ort + .gpu/unpack-ort-cuda: ../shared/gpu/README.md; .gpu/diffusion-bench.xz and
# .gpu/render-bench.xz: the lean release binaries; .gpu/diffusers.tar.xz: the diffusers package (the machine has torch and
# transformers, not diffusers). Everything it reports lands in $OUT.
set -euo pipefail
step=${1:?usage: gpu-prepare.sh unpack|tiny|build|measure [service|speed]}
part=${2:-all}
if [ "$step" = unpack ]; then
    eval "$(bash .gpu/unpack-ort-cuda .gpu/ort)"
    ls -la /tmp/ort
    exit 0
fi
ort=/tmp/ort
[ -e "$ort/libonnxruntime.so" ] || { echo "no $ort: run 'gpu-prepare.sh unpack' first, on the same warm machine" >&2; exit 3; }
cuda=$(ls -d /usr/local/cuda*/targets/x86_64-linux/lib | head -1)
export ORT_DYLIB_PATH=$ort/libonnxruntime.so LD_LIBRARY_PATH=$ort:$cuda:/usr/lib/x86_64-linux-gnu
OUT=${OUT:?set OUT to a folder for the results}
work=/tmp/kiln-prep
sd=$work/sd15
mkdir -p "$work/py"
[ -d "$work/py/diffusers" ] || tar xJf .gpu/diffusers.tar.xz -C "$work/py"
for binary in diffusion-bench render-bench; do
    xz -dc ".gpu/$binary.xz" > "$work/$binary" && chmod +x "$work/$binary"
done
export PYTHONPATH="$work/py" HF_HUB_OFFLINE=1
bench=$work/diffusion-bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

# Frames of the same jobs from two packages on CUDA, compared value by value.
compare() { # <label> <plain package> <prepared package> <model name> <jobs...>
    local label=$1 plain=$2 prepared=$3 model=$4
    shift 4
    for job in "$@"; do
        body=$(echo "$job" | sed "s/MODEL/$model/")
        "$bench" --device cuda render --package "$plain" --job "$body" --out "$work/plain.rgb" 2>>"$OUT/render.log" || { echo "render failed: $body"; continue; }
        "$bench" --device cuda render --package "$prepared" --job "$body" --out "$work/prepared.rgb" 2>>"$OUT/render.log" || { echo "render failed: $body"; continue; }
        python3 - "$work/plain.rgb" "$work/prepared.rgb" "$label $body" <<'EOF'
import sys, numpy as np
a, b = (np.frombuffer(open(p, "rb").read(), dtype=np.uint8).astype(int) for p in sys.argv[1:3])
d = np.abs(a - b)
print(f"{sys.argv[3]}: prepared vs plain on CUDA: max |diff| {d.max()} of 255, mean {d.mean():.3f}, "
      f"{(d > 0).mean() * 100:.1f}% of values differ, {(d > 4).mean() * 100:.2f}% by more than 4; "
      f"plain mean {a.mean():.1f} spread {np.abs(a - a.mean()).mean():.1f}")
EOF
    done
}

# The same jobs on one package with CUDA graphs (each rendered 3 times in one pipeline: the
# later renders replay the graphs the first captured) and without, compared value by value.
compare_graphs() { # <label> <package> <model name> <jobs...>
    local label=$1 package=$2 model=$3
    shift 3
    for job in "$@"; do
        body=$(echo "$job" | sed "s/MODEL/$model/")
        "$bench" --device cuda render --package "$package" --job "$body" --cuda-graphs 0 --out "$work/uncaptured.rgb" 2>>"$OUT/render.log" || { echo "render failed: $body"; continue; }
        "$bench" --device cuda render --package "$package" --job "$body" --cuda-graphs 8 --times 3 --out "$work/captured.rgb" 2>"$work/captured.log" || { cat "$work/captured.log" >> "$OUT/render.log"; echo "render failed: $body"; continue; }
        cat "$work/captured.log" >> "$OUT/render.log"
        grep -E "max \|diff\||CUDA graph runs" "$work/captured.log" | sed "s/^/  /"
        python3 - "$work/uncaptured.rgb" "$work/captured.rgb" "$label $body" <<'EOF'
import sys, numpy as np
a, b = (np.frombuffer(open(p, "rb").read(), dtype=np.uint8).astype(int) for p in sys.argv[1:3])
d = np.abs(a - b)
print(f"{sys.argv[3]}: CUDA graphs (third render) vs none: max |diff| {d.max()} of 255, mean {d.mean():.3f}, "
      f"{(d > 0).mean() * 100:.1f}% of values differ")
EOF
    done
}

build_sd15() {
    sed 's/"kiln-tiny-sd"/"sd15-random"/' gpu-runner/models/kiln-tiny-sd/manifest.json \
        | sed 's/"max": 512 }/"max": 1024 }/g; s/"max_total_pixels": [0-9]*/"max_total_pixels": 16777216/' \
        | sed 's/"width": 128,/"width": 512,/; s/"height": 128,/"height": 512,/; s/"steps": 8,/"steps": 25,/' > "$work/manifest-sd15.json"
    rm -rf "$sd" "$work/sd15-diffusers"
    start=$(date +%s)
    python3 gpu-runner/sd/build_sd.py --preset sd15 --dtype fp16 --out "$sd" --manifest "$work/manifest-sd15.json" \
        --diffusers "$work/sd15-diffusers" 2>&1 | grep -E "^wrote|Error|error" || true
    echo "build_sd.py sd15 fp16: $(( $(date +%s) - start )) s" | tee -a "$OUT/timings.txt"
    start=$(date +%s)
    python3 gpu-runner/sd/prepare_sd.py --package "$sd" --out "$sd-prepared" > "$OUT/sd15-prepare.json"
    echo "prepare_sd.py sd15: $(( $(date +%s) - start )) s" | tee -a "$OUT/timings.txt"
}

# The tiny package, plain and prepared, on CUDA; then a job that a companion leaves midway
# (its chunk of two lanes goes on as one: latents brought back from a captured graph's buffer)
# against the job alone.
tiny_checks() {
    python3 gpu-runner/sd/prepare_sd.py --package gpu-runner/models/kiln-tiny-sd --out "$work/tiny-prepared" > "$OUT/tiny-prepare.json"
    compare tiny gpu-runner/models/kiln-tiny-sd "$work/tiny-prepared" kiln-tiny-sd \
        '{"model":"MODEL","prompt":"a red car","width":128,"height":128,"steps":8,"guidance":7.5,"seed":11}' \
        '{"model":"MODEL","prompt":"a lighthouse","width":256,"height":192,"steps":4,"guidance":0,"seed":3}' \
        '{"model":"MODEL","prompt":"waves","width":128,"height":128,"steps":6,"guidance":5,"num_frames":8,"seed":5}' \
        | tee "$OUT/tiny-check.txt"
    local job='{"model":"kiln-tiny-sd","prompt":"a red car","width":128,"height":128,"steps":40,"guidance":7.5,"seed":11}'
    "$bench" --device cuda render --package "$work/tiny-prepared" --job "$job" --out "$work/alone.rgb" 2>>"$OUT/render.log"
    "$bench" --device cuda render --package "$work/tiny-prepared" --job "$job" --companion-leaves-at 0.5 --times 2 \
        --out "$work/left.rgb" 2>&1 | grep -E "companion|CUDA graph runs|max" | tee -a "$OUT/tiny-check.txt"
    python3 - "$work/alone.rgb" "$work/left.rgb" <<'EOF' | tee -a "$OUT/tiny-check.txt"
import sys, numpy as np
a, b = (np.frombuffer(open(p, "rb").read(), dtype=np.uint8).astype(int) for p in sys.argv[1:3])
print(f"a job whose companion left midway vs the job alone: max |diff| {np.abs(a - b).max()} of 255")
EOF
}

if [ "$step" = tiny ]; then
    tiny_checks
    exit 0
fi

if [ "$step" = build ]; then
    python3 -c "import numpy, onnx, onnxruntime, torch; print('numpy', numpy.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'torch', torch.__version__)" | tee "$OUT/python.txt"
    tiny_checks
    build_sd15
    compare sd15 "$sd" "$sd-prepared" sd15-random \
        '{"model":"MODEL","prompt":"a red car","width":512,"height":512,"steps":25,"guidance":7.5,"seed":11}' \
        | tee "$OUT/sd15-check.txt"
    compare_graphs sd15 "$sd-prepared" sd15-random \
        '{"model":"MODEL","prompt":"a red car","width":512,"height":512,"steps":25,"guidance":7.5,"seed":11}' \
        '{"model":"MODEL","prompt":"a lighthouse","width":512,"height":512,"steps":4,"guidance":0,"seed":3}' \
        '{"model":"MODEL","prompt":"waves","width":512,"height":512,"steps":8,"guidance":5,"num_frames":6,"seed":5}' \
        | tee "$OUT/sd15-graphs.txt"
    exit 0
fi

[ -f "$sd-prepared/unet/model.cuda.onnx" ] || build_sd15
# The prepared package without its step graphs: the fused graphs with the host loop.
fused=$work/sd15-fused
rm -rf "$fused" && mkdir -p "$fused"
for entry in "$sd-prepared"/*; do [ "$(basename "$entry")" = manifest.json ] || ln -s "$entry" "$fused/"; done
python3 -c '
import json, sys
manifest = json.load(open(sys.argv[1]))
for name in ("unet_step", "vae_decoder_rgb"):
    manifest["graphs"]["cuda"].pop(name, None)
json.dump(manifest, open(sys.argv[2], "w"))
' "$sd-prepared/manifest.json" "$fused/manifest.json"
# The runner's service (render-bench: queue loop, session, encoders, in-memory ports): startup to
# ready, then 16 PNG jobs queued at once, in batches of 1 and of 8 (16 UNet rows with guidance).
service() { # <package> <label> <render-bench args...>
    local package=$1 label=$2
    shift 2
    mkdir -p "$work/models-$label" && ln -sfn "$package" "$work/models-$label/sd15-random"
    echo "## $label $*" | tee -a "$OUT/service.md"
    "$work/render-bench" --device cuda --models-dir "$work/models-$label" --max-unet-rows 16 --max-in-flight 16 \
        --max-queue-delay-ms 100 --formats png --width 512 --height 512 "$@" 2>>"$OUT/service.log" | tee -a "$OUT/service.md" \
        || echo "render-bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/service.md"
}
if [ "$part" != speed ]; then
python3 gpu-runner/sd/peer_diffusers.py --pipeline "$work/sd15-diffusers" --size 512 \
    --cases 50:7.5:1,50:7.5:8,1:0:1,1:0:8 2>>"$OUT/peer.log" | tee "$OUT/peer.md"
service "$sd-prepared" stepped --jobs 16 --steps 50 --max-batch 1
service "$sd-prepared" stepped --jobs 16 --steps 50 --max-batch 8
service "$sd-prepared" stepped-no-cuda-graphs --jobs 16 --steps 50 --max-batch 1 --cuda-graphs 0
service "$sd-prepared" stepped-no-cuda-graphs --jobs 16 --steps 50 --max-batch 8 --cuda-graphs 0
service "$sd-prepared" stepped --jobs 16 --steps 1 --guidance 0 --max-batch 1
service "$sd-prepared" stepped --jobs 16 --steps 1 --guidance 0 --max-batch 8
service "$fused" fused --jobs 16 --steps 50 --max-batch 8
service "$sd" plain --jobs 16 --steps 50 --max-batch 1
service "$sd" plain --jobs 16 --steps 50 --max-batch 8
fi
[ "$part" = service ] && exit 0
speed() { # <package> <label> <more diffusion-bench speed args...>
    local package=$1 label=$2
    shift 2
    "$bench" --device cuda speed --package "$package" --size 512 --runs 20 --repeats 3 --rows 1,2,8,16 \
        --steps 1,4,25,50 --max-rows 16 --io-binding on "$@" 2>>"$OUT/bench.log" | tee "$OUT/speed-$label.md"
}
speed "$sd-prepared" stepped --cuda-graphs 8,0
speed "$sd" plain
