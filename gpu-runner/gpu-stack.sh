#!/usr/bin/env bash
# The gpu-runner on the lent GPU machine the way its image runs it, and the whole local stack
# with the runner on CUDA. BENCHMARKS.md ("The runner service on the H200") has the commands
# that prepare .gpu/ here and the two device calls:
#
#   bash gpu-runner/gpu-stack.sh unpack    # carrying .gpu/ort: ONNX Runtime's GPU libraries to /tmp/ort
#   bash gpu-runner/gpu-stack.sh run       # carrying .gpu/stack (the binaries and moto's wheels),
#                                          # while the machine is still warm (/tmp survives)
#
# `run`, with everything it reports in $OUT:
# 1. The image's layout: ONNX Runtime = the onnxruntime-gpu wheel's libraries (what the
#    Dockerfile copies to /opt/onnxruntime/lib), libvpx beside the binaries (/opt/kiln/lib),
#    CUDA 13 and cuDNN from the machine (the CUDA base image's).
# 2. render-bench (the real service on in-memory ports) on CUDA: the demo model and the tiny
#    SD package per format (png, gif, mp4: the lean binary has no libvpx), then an SD-1.5-sized fp16 package (random weights, built here with
#    build_sd.py) at 512x512, 25 steps, guidance 7.5, with KILN_MAX_BATCH 1 and 4 (4 and 8 UNet rows per run).
# 3. `kiln-local demo` (moto, the API, the release kiln-runner, a real render of every format
#    and the inbox) with KILN_DEVICE=cuda; the runner's log shows the device and warm-up.
set -euo pipefail
step=${1:?usage: gpu-stack.sh unpack|run}
ort=/tmp/ort

if [ "$step" = unpack ]; then
    eval "$(bash .gpu/unpack-ort-cuda .gpu/ort)"
    ls -la "$ort"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    exit 0
fi

OUT=${OUT:?set OUT to a folder for the results}
[ -e "$ort/libonnxruntime.so" ] || { echo "no $ort: run 'gpu-stack.sh unpack' first, on the same warm machine" >&2; exit 3; }
stack=.gpu/stack
image=/tmp/kiln-image
rm -rf "$image" && mkdir -p "$image/lib"
for binary in kiln-runner kiln-local render-bench; do
    xz -dc "$stack/$binary.xz" > "$image/$binary" && chmod +x "$image/$binary"
done
cp "$stack"/lib/* "$image/lib/"
cuda=$(ls -d /usr/local/cuda*/targets/x86_64-linux/lib | head -1)
export ORT_DYLIB_PATH=$ort/libonnxruntime.so
export LD_LIBRARY_PATH=$image/lib:$ort:$cuda:/usr/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
ldd "$image/kiln-runner" | grep -E "vpx|not found" | tee "$OUT/ldd.txt" || true

# --- 2. render-bench on CUDA -------------------------------------------------------------------
models=/tmp/kiln-models
rm -rf "$models" && mkdir -p "$models"
for package in kiln-demo kiln-tiny-sd; do
    mkdir -p "$models/$package" && cp -r "gpu-runner/models/$package" "$models/$package/"
done
bench() { # <models dir> <label> <render-bench args...>
    local dir=$1 label=$2
    shift 2
    echo "## $label" | tee -a "$OUT/render-bench.md"
    # The exit status is printed, not fatal: the table is complete by then (a crash while the
    # process tears down CUDA was seen once, after the last row).
    KILN_MODELS_DIR=$dir "$image/render-bench" --device cuda "$@" 2>>"$OUT/render-bench.log" | tee -a "$OUT/render-bench.md" \
        || echo "render-bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/render-bench.md"
}
bench "$models/kiln-demo" "kiln-demo, CUDA" --jobs 8 --formats png,gif,mp4 --width 512 --height 512 --frames 16 --steps 4
bench "$models/kiln-tiny-sd" "kiln-tiny-sd, CUDA" --jobs 8 --formats png,gif,mp4 --width 256 --height 256 --frames 16 --steps 8

sd=/tmp/kiln-sd15
if [ ! -f "$sd/sd15-random/unet/model.onnx" ]; then
    mkdir -p "$sd/py" && tar xJf "$stack/diffusers.tar.xz" -C "$sd/py"
    python3 - gpu-runner/models/kiln-tiny-sd/manifest.json "$sd/manifest.json" <<'EOF'
import json, sys
manifest = json.load(open(sys.argv[1]))
manifest["name"] = "sd15-random"
manifest["limits"]["width"]["max"] = manifest["limits"]["height"]["max"] = 1024
manifest["limits"]["max_total_pixels"] = 16777216
manifest["defaults"].update(width=512, height=512, steps=25, guidance=7.5)
json.dump(manifest, open(sys.argv[2], "w"), indent=2)
EOF
    start=$(date +%s)
    PYTHONPATH="$sd/py" HF_HUB_OFFLINE=1 python3 gpu-runner/sd/build_sd.py --preset sd15 --dtype fp16 \
        --out "$sd/sd15-random" --manifest "$sd/manifest.json" 2>&1 | grep -E "^wrote|Error|error" || true
    echo "sd15 package built in $(( $(date +%s) - start )) s" | tee -a "$OUT/render-bench.log"
fi
for setting in "1 4" "4 4" "4 8"; do
    read -r batch rows <<<"$setting"
    KILN_MAX_BATCH=$batch KILN_MAX_UNET_ROWS=$rows bench "$sd" "sd15-random fp16, CUDA, KILN_MAX_BATCH=$batch KILN_MAX_UNET_ROWS=$rows" \
        --jobs 16 --formats png --width 512 --height 512 --steps 25 --max-in-flight 8
done

# --- 3. the whole stack's main job with the runner on CUDA -------------------------------------
# kiln-local wants its tools in .venv: moto from the carried wheels, and "onnxruntime" = the
# GPU build (the same C API; the runner picks CUDA from KILN_DEVICE).
site=.venv/lib/$(python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages
python3 -m venv --without-pip .venv
python3 -m pip install --quiet --no-index --no-deps --break-system-packages --target "$site" "$stack"/wheels/*.whl
printf '#!%s\nfrom moto.server import main\nmain()\n' "$PWD/.venv/bin/python" > .venv/bin/moto_server
chmod +x .venv/bin/moto_server
# All of them side by side: ONNX Runtime loads its providers from the folder it was loaded from.
mkdir -p "$site/onnxruntime/capi" && ln -sf "$ort"/libonnxruntime* "$site/onnxruntime/capi/"
printf 'moto[server]==5.2.5\nonnxruntime==1.31.1' > .venv/kiln-requirements.txt
set +e
KILN_DEVICE=cuda KILN_RUNNER_BIN=$image/kiln-runner timeout 300 "$image/kiln-local" demo 2>&1 | tee "$OUT/demo.txt"
echo "demo exit: ${PIPESTATUS[0]}" | tee -a "$OUT/demo.txt"
set -e
cp .kiln/runner.log "$OUT/runner.log" 2>/dev/null || true
ls -la .kiln/demo > "$OUT/demo-files.txt" 2>&1 || true
cp .kiln/demo/*.png "$OUT/" 2>/dev/null || true
grep -E "models loaded|warm-up|CUDA|cuda|error" "$OUT/runner.log" | head -20 || true
