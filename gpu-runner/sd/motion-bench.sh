#!/usr/bin/env bash
# The motion model on the lent GPU machine: the runner's motion-diffusion pipeline against
# diffusers' AnimateDiffPipeline on the same SD-1.5-sized weights, and a 1920×1080 VAE decode
# whole and in tiles. BENCHMARKS.md ("Text-to-video with a motion model") has the commands that
# fill .gpu/ here; the device calls must follow each other while the machine is warm (/tmp
# survives):
#
#   bash gpu-runner/sd/motion-bench.sh unpack   # carrying .gpu/ort, .gpu/unpack-ort-cuda: to /tmp/ort
#   bash gpu-runner/sd/motion-bench.sh tiny     # carrying .gpu/diffusion-bench.xz: the tiny package on CUDA
#                                               # against the frames diffusers rendered (the tests' fixtures)
#   bash gpu-runner/sd/motion-bench.sh build    # carrying .gpu/diffusion-bench.xz, .gpu/diffusers.tar.xz:
#                                               # the SD-1.5-sized package (fp16) and its diffusers twin
#   bash gpu-runner/sd/motion-bench.sh measure  # carrying the same: both pipelines timed, the decodes
#
#   bash gpu-runner/sd/motion-bench.sh images   # carrying .gpu/diffusion-bench.xz and .gpu/tiny.tar.xz
#                                               # (the tiny packages, the img2img fixture and the CPU
#                                               # render of an image-to-video job: `images-pack` here
#                                               # makes it): image-to-image and image-to-video on CUDA
#
# The machine goes back half a minute after a call ends, so `all` does unpack, build and measure
# in one call, carrying all four .gpu paths; that is over a call's 64 MiB unless the tree's model
# packages and test fixtures stay behind (move gpu-runner/models and gpu-runner/tests/fixtures
# aside for the call: build and measure do not read them).
#
# Everything it reports lands in $OUT.
set -euo pipefail
I2V_JOB='{"model":"kiln-tiny-motion","prompt":"a red boat drifting on a lake","width":64,"height":64,"num_frames":8,"steps":4,"guidance":7.5,"seed":3,"strength":0.7,"init_image":"img_01KBWJ5N0000000000000000AA.png"}'
step=${1:?usage: motion-bench.sh unpack|tiny|build|measure|all}
if [ "$step" = all ]; then
    bash "$0" unpack && bash "$0" build && exec bash "$0" measure
fi
if [ "$step" = images-pack ]; then
    # On the development machine (ORT_DYLIB_PATH: the CPU library; the release bench built):
    # the image-to-video job rendered on the CPU, packed with the tiny packages and the img2img
    # fixture for the `images` step. Small enough to carry with .gpu/ort (the tree itself must
    # leave gpu-runner/models, gpu-runner/tests/fixtures, functions, tests and terraform behind).
    pack=$(mktemp -d)
    cp -r gpu-runner/models/kiln-tiny-sd gpu-runner/models/kiln-tiny-motion gpu-runner/tests/fixtures/img2img "$pack/"
    target/release/diffusion-bench --device cpu video --package gpu-runner/models/kiln-tiny-motion \
        --job "$I2V_JOB" --repeats 1 --out "$pack/i2v-cpu.rgb" --init-image gpu-runner/tests/fixtures/img2img/input.png
    tar cf - -C "$pack" . | xz -9e -T2 > .gpu/tiny.tar.xz
    rm -rf "$pack"
    ls -la .gpu/tiny.tar.xz
    exit 0
fi
if [ "$step" = unpack ]; then
    eval "$(bash .gpu/unpack-ort-cuda .gpu/ort)"
    ls /tmp/ort | head -3
    exit 0
fi
ort=/tmp/ort
[ -e "$ort/libonnxruntime.so" ] || { echo "no $ort: run 'motion-bench.sh unpack' first, on the same warm machine" >&2; exit 3; }
cuda=$(ls -d /usr/local/cuda*/targets/x86_64-linux/lib | head -1)
export ORT_DYLIB_PATH=$ort/libonnxruntime.so LD_LIBRARY_PATH=$ort:$cuda:/usr/lib/x86_64-linux-gnu
OUT=${OUT:?set OUT to a folder for the results}
work=/tmp/kiln-motion
mkdir -p "$work/py"
[ -d "$work/py/diffusers" ] || [ ! -e .gpu/diffusers.tar.xz ] || tar xJf .gpu/diffusers.tar.xz -C "$work/py"
xz -dc .gpu/diffusion-bench.xz > "$work/diffusion-bench" && chmod +x "$work/diffusion-bench"
export PYTHONPATH="$work/py" HF_HUB_OFFLINE=1
bench=$work/diffusion-bench
sd=$work/sd15-motion
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

if [ "$step" = tiny ]; then
    # The tiny package on CUDA against the frames diffusers rendered on the CPU (the test suite's
    # fixtures): the same job, the same start noise.
    python3 - "$bench" <<'PY' 2>&1 | tee "$OUT/tiny-cuda.txt"
import json, subprocess, sys, numpy as np
try:
    from PIL import Image
except ImportError:
    sys.exit("no Pillow here: the tiny check needs it")
bench = sys.argv[1]
for case in json.load(open("gpu-runner/tests/fixtures/motion/cases.json")):
    job = {"model": "kiln-tiny-motion", "prompt": case["prompt"], "width": case["width"], "height": case["height"],
           "num_frames": case["frames"], "steps": case["steps"], "guidance": case["guidance"], "seed": case["seed"]}
    subprocess.run([bench, "--device", "cuda", "video", "--package", "gpu-runner/models/kiln-tiny-motion",
                    "--job", json.dumps(job), "--repeats", "1", "--out", "/tmp/tiny.rgb"], check=True,
                   stdout=subprocess.DEVNULL)
    ours = np.frombuffer(open("/tmp/tiny.rgb", "rb").read(), dtype=np.uint8).astype(int)
    theirs = np.asarray(Image.open(f"gpu-runner/tests/fixtures/motion/{case['name']}.png").convert("RGB")).astype(int).reshape(-1)
    d = np.abs(ours - theirs)
    print(f"tiny `{case['name']}` ({case['frames']} frames) on CUDA against diffusers on the CPU: max |diff| {d.max()}, "
          f"mean {d.mean():.3f}, {(d > 0).mean() * 100:.2f}% of values differ")
PY
    exit 0
fi
if [ "$step" = images ]; then
    # Image-to-image (kiln-tiny-sd) against diffusers' StableDiffusionImg2ImgPipeline's frame (the
    # test suite's fixture, rendered on the CPU), and image-to-video (kiln-tiny-motion) against the
    # same job rendered by kiln on the CPU: the same start noise and image, on CUDA.
    tiny=/tmp/kiln-tiny
    rm -rf "$tiny" && mkdir -p "$tiny" && tar xJf .gpu/tiny.tar.xz -C "$tiny"
    i2i='{"model":"kiln-tiny-sd","prompt":"a red boat on a lake","width":64,"height":64,"steps":8,"strength":0.6,"guidance":7.5,"seed":5,"init_image":"img_01KBWJ5N0000000000000000AA.png"}'
    "$bench" --device cuda video --package "$tiny/kiln-tiny-sd" --job "$i2i" --repeats 1 --out /tmp/i2i.rgb \
        --init-image "$tiny/img2img/input.png" 2>> "$OUT/bench.log"
    "$bench" --device cuda video --package "$tiny/kiln-tiny-motion" --job "$I2V_JOB" --repeats 1 --out /tmp/i2v.rgb \
        --init-image "$tiny/img2img/input.png" 2>> "$OUT/bench.log"
    python3 - "$tiny" <<'PY' 2>&1 | tee "$OUT/images-cuda.txt"
import sys, numpy as np
from PIL import Image
tiny = sys.argv[1]
def rgb(path):
    return np.frombuffer(open(path, "rb").read(), dtype=np.uint8).astype(int)
def report(what, ours, theirs):
    d = np.abs(ours - theirs)
    print(f"{what}: max |diff| {d.max()}, mean {d.mean():.3f}, {(d > 0).mean() * 100:.2f}% of {d.size} values differ")
diffusers = np.asarray(Image.open(f"{tiny}/img2img/output.png").convert("RGB")).astype(int).reshape(-1)
report("image-to-image (kiln-tiny-sd) on CUDA against diffusers' StableDiffusionImg2ImgPipeline on the CPU", rgb("/tmp/i2i.rgb"), diffusers)
report("image-to-video (kiln-tiny-motion, 8 frames) on CUDA against kiln on the CPU", rgb("/tmp/i2v.rgb"), rgb(f"{tiny}/i2v-cpu.rgb"))
frames = rgb("/tmp/i2v.rgb").reshape(8, -1)
image = np.asarray(Image.open(f"{tiny}/img2img/input.png").convert("RGB").resize((64, 64))).astype(int).reshape(-1)
print("image-to-video on CUDA, mean |diff| from the input image by frame: "
      + ", ".join(f"{np.abs(f - image).mean():.1f}" for f in frames))
PY
    exit 0
fi
if [ "$step" = build ]; then
    if [ ! -e "$sd/unet/model.onnx" ]; then
        rm -rf "$sd" "$sd-diffusers"
        python3 gpu-runner/sd/build_motion.py --preset sd15 --dtype fp16 --device cuda --out "$sd" \
            --diffusers "$sd-diffusers" --manifest gpu-runner/sd/sd15-motion-manifest.json 2>&1 | grep -v Warning | tail -8
    fi
    du -sh "$sd"/* | tee "$OUT/package.txt"
    exit 0
fi

# measure: the trailing-spacing copy (Lightning-style few-step) shares the model files.
rm -f "$OUT/memory.txt"
lightning=$work/sd15-motion-trailing
rm -rf "$lightning" && mkdir -p "$lightning/scheduler"
for entry in "$sd"/*; do [ "$(basename "$entry")" = scheduler ] || ln -s "$entry" "$lightning/"; done
python3 -c "import json,sys; c=json.load(open('$sd/scheduler/scheduler_config.json')); c['timestep_spacing']='trailing'; json.dump(c, open('$lightning/scheduler/scheduler_config.json','w'))"
peak_of() { # <label> <command...>: runs it while sampling GPU memory; prints the peak over the baseline
    local label=$1; shift
    local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$work/mem.log" &
    local sampler=$!
    "$@"
    kill $sampler; wait $sampler 2>/dev/null || true
    local top; top=$(sort -n "$work/mem.log" | tail -1)
    echo "$label: GPU memory at peak $((top - base)) MiB over the idle $base MiB (nvidia-smi, every 50 ms)" >> "$OUT/memory.txt"
}
{
    echo "| pipeline | steps | s per video (after a warm-up: 25 steps once, 4 steps the median of 2) | memory |"
    echo "|---|---:|---:|---|"
    for case in "25 $sd linspace 1" "4 $lightning trailing 2"; do
        set -- $case
        job="{\"model\":\"kiln-sd15-motion\",\"prompt\":\"a lighthouse on a cliff in a storm\",\"num_frames\":16,\"width\":512,\"height\":512,\"steps\":$1,\"guidance\":7.5,\"seed\":0}"
        peak_of "kiln $1 steps" "$bench" --device cuda video --package "$2" --job "$job" --repeats $4 > "$work/row.txt" 2>> "$OUT/bench.log"
        echo "| kiln motion-diffusion (ONNX Runtime CUDA, fp16) | $1 ($3) | $(cut -d'|' -f5 "$work/row.txt" | tr -d ' ') | |"
    done
    peak_of "diffusers" python3 gpu-runner/sd/peer_animatediff.py --pipeline "$sd-diffusers" --cases 25:linspace:1,4:trailing:2 2>> "$OUT/bench.log"
    echo
    echo "| frame | decode | device | s (median of 3, after a warm-up) |"
    echo "|---|---|---|---:|"
    for mode in tiled whole; do
        peak_of "decode $mode" "$bench" --device cuda decode --package "$sd" --width 1920 --height 1080 --mode $mode 2>> "$OUT/bench.log" \
            || echo "decode $mode failed (bench.log)"
    done
    echo
    cat "$OUT/memory.txt"
} 2>&1 | tee "$OUT/measure.md"
