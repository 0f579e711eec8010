"""Frames diffusers renders from a motion package's weights: the references the runner's
`motion-diffusion` pipeline is held to (`gpu-runner/tests/motion.rs`).

For each case it starts from the noise the runner draws (reference.py's SplitMix64 Gaussians: frame
f of a job is stream f, `[4, h/8, w/8]`), so the two start from the same latents, and writes the
frames as one PNG, frame under frame, plus the case in `cases.json`:

- `window`: a video no longer than the motion module's context: diffusers' own
  `AnimateDiffPipeline` (prompt encoding, classifier-free guidance, Euler, the VAE in chunks).
- `long`: a video longer than the context, rendered in overlapping windows of the context's
  length. diffusers has no such pipeline for AnimateDiff (FreeNoise windows inside the motion
  modules instead), so this case runs the same parts of the same pipeline object (its prompt
  embeddings, scheduler, UNet and decoder) in the windows kiln uses: starts every
  `context - overlap` frames, the last flush with the end; each window's noise prediction
  weighted by the pyramid diffusers' FreeNoise uses (1, 2, …, 2, 1) and averaged per frame.

    python3 gpu-runner/sd/reference_motion.py --pipeline DIR --out gpu-runner/tests/fixtures/motion

`--pipeline` is the `--diffusers` folder `build_motion.py` wrote beside the package. Needs torch,
diffusers, numpy, Pillow.
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

CASES = [
    dict(name="window", prompt="a lighthouse in a storm", width=64, height=64, frames=8, steps=4, guidance=7.5,
         seed=7, context=8, overlap=4),
    dict(name="long", prompt="waves on a beach at dusk", width=64, height=48, frames=14, steps=3, guidance=5.0,
         seed=11, context=8, overlap=4),
]


def start_noise(seed, frames, height, width):
    """`[1, 4, frames, h/8, w/8]`: frame f is stream f."""
    h, w = height // 8, width // 8
    per_frame = [gaussian(seed, f, 4 * h * w).reshape(4, h, w) for f in range(frames)]
    return torch.from_numpy(np.stack(per_frame, axis=1)[None].copy())


def windows(frames, context, overlap):
    """Window starts: every context - overlap frames, the last one flush with the end."""
    if frames <= context:
        return [0]
    stride = max(1, context - overlap)
    starts = list(range(0, frames - context, stride))
    starts.append(frames - context)
    return sorted(set(starts))


def pyramid(length):
    """diffusers' FreeNoise `pyramid` weights."""
    if length % 2 == 0:
        half = list(range(1, length // 2 + 1))
        return half + half[::-1]
    mid = (length + 1) // 2
    half = list(range(1, mid))
    return half + [mid] + half[::-1]


def to_bytes(video):
    """diffusers' float frames (0..1, [frames, h, w, 3]) as the runner rounds them."""
    return (np.clip(video, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_pipeline(pipe, case):
    latents = start_noise(case["seed"], case["frames"], case["height"], case["width"])
    out = pipe(case["prompt"], negative_prompt="", num_frames=case["frames"], height=case["height"],
               width=case["width"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
               latents=latents, output_type="np", decode_chunk_size=4)
    return to_bytes(out.frames[0])


@torch.no_grad()
def render_windows(pipe, case):
    frames, context, overlap = case["frames"], case["context"], case["overlap"]
    positive, negative = pipe.encode_prompt(case["prompt"], "cpu", 1, True, negative_prompt="")
    embeds = torch.cat([negative, positive])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(case["steps"])
    latents = start_noise(case["seed"], frames, case["height"], case["width"]) * scheduler.init_noise_sigma
    starts = windows(frames, context, overlap)
    weights = torch.tensor(pyramid(context), dtype=torch.float32).view(1, 1, context, 1, 1)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        total = torch.zeros_like(model_input)
        count = torch.zeros(1, 1, frames, 1, 1)
        for start in starts:
            window = model_input[:, :, start:start + context]
            hidden = embeds.repeat_interleave(window.shape[2], dim=0)
            eps = pipe.unet(window, t, encoder_hidden_states=hidden).sample
            total[:, :, start:start + context] += eps * weights
            count[:, :, start:start + context] += weights
        eps = total / count
        uncond, cond = eps.chunk(2)
        eps = uncond + case["guidance"] * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    video = pipe.decode_latents(latents, decode_chunk_size=4)
    video = pipe.video_processor.postprocess_video(video=video, output_type="np")
    return to_bytes(video[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if pipe.tokenizer.model_max_length > 77:
        pipe.tokenizer.model_max_length = 77
    args.out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        video = render_pipeline(pipe, case) if case["frames"] <= case["context"] else render_windows(pipe, case)
        strip = video.reshape(-1, case["width"], 3)
        Image.fromarray(strip).save(args.out / f"{case['name']}.png")
        print(f"{case['name']}: {video.shape[0]} frames of {case['width']}x{case['height']}, mean {video.mean():.1f}")
    # The window loop against diffusers' own pipeline, on the case both can render.
    short = CASES[0]
    difference = np.abs(render_pipeline(pipe, short).astype(int) - render_windows(pipe, short).astype(int))
    print(f"window loop vs AnimateDiffPipeline on `{short['name']}`: max |diff| {difference.max()}, "
          f"mean {difference.mean():.3f}")
    (args.out / "cases.json").write_text(json.dumps(CASES, indent=1))


if __name__ == "__main__":
    main()
