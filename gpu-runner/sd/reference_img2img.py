"""Frames diffusers' StableDiffusionImg2ImgPipeline renders from kiln-tiny-sd's weights, starting
from an image: the reference the runner's image-to-image is held to (`gpu-runner/tests/
diffusion.rs`). Writes `input.png` (a drawn test picture), the case in `case.json` and the
frame diffusers makes in `output.png`.

diffusers encodes the image with the VAE and samples its latent distribution with the generator;
kiln takes the distribution's mean (what its exported encoder gives). So the script encodes the
image itself (mean × scaling factor) and hands the pipeline those latents, and the noise it adds
is the runner's (reference.py's SplitMix64 Gaussians, stream 0). Everything else is diffusers':
prompt encoding, `get_timesteps` (the last strength × steps steps), `add_noise`, Euler, guidance.

    python3 gpu-runner/sd/build_sd.py --preset tiny --device cpu --out /tmp/tsd --diffusers /tmp/tsd-diffusers
    python3 gpu-runner/sd/reference_img2img.py --pipeline /tmp/tsd-diffusers --out gpu-runner/tests/fixtures/img2img

Needs torch, diffusers, numpy, Pillow.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import gaussian  # noqa: E402

CASE = dict(prompt="a red boat on a lake", width=64, height=64, steps=8, strength=0.6, guidance=7.5, seed=5)


def test_picture(width, height):
    y, x = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = (x * 255 // (width - 1)).astype(np.uint8)
    image[..., 1] = (y * 255 // (height - 1)).astype(np.uint8)
    inside = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (width / 4) ** 2
    image[inside] = [240, 240, 40]
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float32,
                                                          local_files_only=True, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if pipe.tokenizer.model_max_length > 77:
        pipe.tokenizer.model_max_length = 77
    args.out.mkdir(parents=True, exist_ok=True)
    c = CASE
    picture = test_picture(c["width"], c["height"])
    Image.fromarray(picture).save(args.out / "input.png")
    pixels = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    h, w = c["height"] // 8, c["width"] // 8
    noise = torch.from_numpy(gaussian(c["seed"], 0, 4 * h * w).reshape(1, 4, h, w).copy())
    img2img.randn_tensor = lambda *a, **k: noise.clone()
    out = pipe(c["prompt"], image=latents, strength=c["strength"], num_inference_steps=c["steps"],
               guidance_scale=c["guidance"], negative_prompt="", output_type="np")
    frame = (np.clip(out.images[0], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(frame).save(args.out / "output.png")
    (args.out / "case.json").write_text(json.dumps(c, indent=1))
    differs = np.abs(frame.astype(int) - picture.astype(int)).mean()
    print(f"img2img: {c['width']}x{c['height']}, strength {c['strength']}, {c['steps']} steps; "
          f"mean |output - input| {differs:.1f}")


if __name__ == "__main__":
    main()
