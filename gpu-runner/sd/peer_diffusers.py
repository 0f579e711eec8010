"""The peer in the GPU benchmarks: diffusers' own StableDiffusionPipeline on the same weights as
the package kiln renders (`build_sd.py --diffusers DIR` saves them), on the same device, timed the
way diffusion-bench times ours (one warm-up, then the median of --repeats whole pipeline calls,
synchronized). Prints a markdown table.

    python3 gpu-runner/sd/peer_diffusers.py --pipeline DIR [--size 512] [--cases 50:7.5:1,50:7.5:8,1:0:1,1:0:8]

Each case is steps:guidance:images per call. Needs torch with CUDA, diffusers and transformers;
nothing is downloaded.
"""

import argparse
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cases", default="50:7.5:1,50:7.5:8,1:0:1,1:0:8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pipeline, torch_dtype=torch.float16, local_files_only=True, safety_checker=None,
        requires_safety_checker=False,
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    # CLIP reads 77 tokens; a tokenizer saved without model_max_length says "no limit".
    if pipe.tokenizer.model_max_length > 77:
        pipe.tokenizer.model_max_length = 77
    print(f"diffusers StableDiffusionPipeline (fp16, {type(pipe.scheduler).__name__}, "
          f"attention: {type(next(iter(pipe.unet.attn_processors.values()))).__name__}), {args.size}x{args.size}, "
          f"{torch.cuda.get_device_name()}")
    print("\n| steps | guidance | images per call | s per call (median) | s per image | images/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        steps, guidance, images = case.split(":")
        steps, guidance, images = int(steps), float(guidance), int(images)
        prompts = [f"a lighthouse on a cliff, scene {n}" for n in range(images)]

        def call():
            generator = torch.Generator(args.device).manual_seed(0)
            pipe(prompts, height=args.size, width=args.size, num_inference_steps=steps, guidance_scale=guidance,
                 generator=generator, output_type="np")
            torch.cuda.synchronize()

        call()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        seconds = sorted(times)[len(times) // 2]
        print(f"| {steps} | {guidance} | {images} | {seconds:.3f} | {seconds / images:.3f} | {images / seconds:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
