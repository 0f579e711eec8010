#!/usr/bin/env bash
# Runs on the lent GPU machine (see ../../BENCHMARKS.md, "Latent diffusion on the H100", for the
# call that carries what it needs): builds the tiny packages and an SD-1.5-sized fp16 package
# with random weights, checks a CUDA render against the numpy reference, and measures the UNet
# and the pipeline. Everything it reports lands in $OUT.
#
# Expects in the working tree: .gpu/ort + .gpu/unpack-ort-cuda (../shared/gpu/README.md),
# .gpu/diffusion-bench.xz (the lean release binary) and .gpu/diffusers.tar.xz (the diffusers
# package; the machine has torch, transformers and huggingface_hub, but not diffusers).
set -euo pipefail
OUT=${OUT:?set OUT to a folder for the results}
root=$(pwd)
eval "$(bash .gpu/unpack-ort-cuda .gpu/ort)"
work=/tmp/kiln-sd
mkdir -p "$work/py"
tar xJf .gpu/diffusers.tar.xz -C "$work/py"
xz -dc .gpu/diffusion-bench.xz > "$work/diffusion-bench" && chmod +x "$work/diffusion-bench"
export PYTHONPATH="$work/py" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

build() { python3 gpu-runner/sd/build_sd.py "$@" 2>&1 | grep -E "^wrote|Error|error" || true; }
build --preset tiny --dtype fp32 --out "$work/kiln-tiny-sd" --manifest gpu-runner/models/kiln-tiny-sd/manifest.json
sed 's/"kiln-tiny-sd"/"kiln-tiny-sd-fp16"/' gpu-runner/models/kiln-tiny-sd/manifest.json > "$work/manifest-fp16.json"
build --preset tiny --dtype fp16 --out "$work/kiln-tiny-sd-fp16" --manifest "$work/manifest-fp16.json"
(cd "$work" && tar czf "$OUT/tiny-packages.tar.gz" kiln-tiny-sd kiln-tiny-sd-fp16)

# CUDA against the CPU reference, on the fp16 tiny package (the machine's onnxruntime is CPU-only).
set +e
job='{"model":"kiln-tiny-sd-fp16","prompt":"a red car","width":64,"height":96,"steps":3,"guidance":5.0,"seed":11}'
python3 gpu-runner/sd/reference.py --package "$work/kiln-tiny-sd-fp16" --prompt "a red car" --seed 11 --steps 3 \
    --guidance 5.0 --width 64 --height 96 --out "$work/reference.rgb"
"$work/diffusion-bench" --device cuda render --package "$work/kiln-tiny-sd-fp16" --job "$job" --out "$work/cuda.rgb"
python3 - "$work/reference.rgb" "$work/cuda.rgb" <<'EOF' | tee "$OUT/cuda-check.txt"
import sys, numpy as np
a, b = (np.frombuffer(open(p, "rb").read(), dtype=np.uint8).astype(int) for p in sys.argv[1:3])
d = np.abs(a - b)
print(f"tiny fp16, CUDA vs CPU numpy reference: max |diff| {d.max()} of 255, mean {d.mean():.3f}, "
      f"{(d > 0).mean() * 100:.1f}% of values differ, {(d > 4).mean() * 100:.2f}% by more than 4")
EOF
set -e

sd=/tmp/kiln-sd15
if [ ! -f "$sd/unet/model.onnx" ]; then
    sed 's/"kiln-tiny-sd"/"sd15-random"/' gpu-runner/models/kiln-tiny-sd/manifest.json \
        | sed 's/"max": 512 }/"max": 1024 }/g; s/"max_total_pixels": [0-9]*/"max_total_pixels": 16777216/' > "$work/manifest-sd15.json"
    time build --preset sd15 --dtype fp16 --out "$sd" --manifest "$work/manifest-sd15.json"
fi
"$work/diffusion-bench" --device cuda speed --package "$sd" --size 512 --runs 20 --repeats 3 | tee "$OUT/speed.md"
