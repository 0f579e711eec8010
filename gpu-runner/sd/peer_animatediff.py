"""The peer in the motion benchmarks: diffusers' own AnimateDiffPipeline on the same weights as the
motion package kiln renders (`build_motion.py --diffusers DIR` saves them), fp16, on the same
device, timed as `diffusion-bench video` times ours (one warm-up, then the median of --repeats
whole pipeline calls, synchronized). Prints markdown table rows.

    python3 gpu-runner/sd/peer_animatediff.py --pipeline DIR [--frames 16] [--size 512] [--cases 25,4:trailing]

Each case is steps[:timestep spacing[:timed runs]]; guidance --guidance. Needs torch with CUDA, diffusers and
transformers; nothing is downloaded.
"""

import argparse
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--cases", default="25,4:trailing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler

    pipe = AnimateDiffPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float16, local_files_only=True)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.tokenizer.model_max_length > 77:
        pipe.tokenizer.model_max_length = 77
    base = dict(pipe.scheduler.config)
    print(f"diffusers AnimateDiffPipeline (fp16, attention: "
          f"{type(next(iter(pipe.unet.attn_processors.values()))).__name__}), {args.frames} frames of "
          f"{args.size}x{args.size}, guidance {args.guidance}, {torch.cuda.get_device_name()}")
    for case in args.cases.split(","):
        steps, spacing, repeats = (case.split(":") + ["", ""])[:3]
        steps, repeats = int(steps), int(repeats or args.repeats)
        pipe.scheduler = EulerDiscreteScheduler.from_config(base, timestep_spacing=spacing or base["timestep_spacing"])

        def call():
            generator = torch.Generator(args.device).manual_seed(0)
            pipe("a lighthouse on a cliff in a storm", num_frames=args.frames, height=args.size, width=args.size,
                 num_inference_steps=steps, guidance_scale=args.guidance, generator=generator, output_type="np")
            torch.cuda.synchronize()

        torch.cuda.reset_peak_memory_stats()
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        seconds = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| diffusers | {steps} ({pipe.scheduler.config.timestep_spacing}) | {seconds:.3f} | {peak:.1f} GiB allocated at peak |",
              flush=True)


if __name__ == "__main__":
    main()
