"""Builds an AnimateDiff-shaped video model package with random weights for kiln's
`motion-diffusion` pipeline: an SD-1.5-shaped UNet with motion modules (diffusers'
`UNetMotionModel` made from a `UNet2DConditionModel` and a `MotionAdapter`, both from configs),
exported with a frames axis, beside the same tokenizer, text encoder, VAE and scheduler files
`build_sd.py` writes:

    unet/model.onnx           sample [batch, 4, frames, h/8, w/8], timestep (int64) [batch],
                              encoder_hidden_states [batch, 77, width] -> out_sample (as sample)
    vae_encoder/model.onnx    sample [batch, 3, h, w] in -1..1 -> latent_sample (the posterior's
                              mean, unscaled): for init images
    (text_encoder, vae_decoder, tokenizer, scheduler, model_index.json as build_sd.py)
    manifest.json             (with --manifest)

Presets: `tiny` (the committed gpu-runner/models/kiln-tiny-motion: about 3 MB, runs anywhere)
and `sd15` (the shapes of Stable Diffusion 1.5 plus AnimateDiff's v1.5 motion adapter: for GPU
benchmarks only). Nothing is downloaded. With `--diffusers DIR` the same weights are also saved
as a diffusers `AnimateDiffPipeline` folder (the peer); with `--reference DIR` (tiny) the frames
diffusers renders from the package's weights are written there for the runner's tests (see
`reference_motion.py`).

    python3 gpu-runner/sd/build_motion.py --preset tiny --out gpu-runner/models/kiln-tiny-motion \
        --manifest gpu-runner/sd/tiny-motion-manifest.json

Needs torch, diffusers and transformers.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_sd  # noqa: E402
import clip_bpe  # noqa: E402

MOTION = {
    "tiny": dict(proj_out_std=0.05, motion_layers_per_block=1, motion_num_attention_heads=4, motion_norm_num_groups=32,
                 motion_max_seq_length=32, use_motion_mid_block=False),
    "sd15": dict(proj_out_std=0.05, motion_layers_per_block=2, motion_num_attention_heads=8, motion_norm_num_groups=32,
                 motion_max_seq_length=32, use_motion_mid_block=False),
}


class _ExpandInterleave:
    """While tracing, `Tensor.repeat_interleave(n, dim=0)` (diffusers repeats the time embedding
    per frame so) as unsqueeze-expand-reshape: the traced `n` lives on the CPU, and the traced
    index_select on CUDA refuses it; the same values, and `n` stays symbolic."""

    def __enter__(self):
        self.original = torch.Tensor.repeat_interleave
        original = self.original

        def interleave(tensor, repeats, dim=None, output_size=None):
            if dim == 0 and not (torch.is_tensor(repeats) and repeats.dim() > 0):
                rest = tensor.shape[1:]
                return tensor.unsqueeze(1).expand(tensor.shape[0], repeats, *rest).reshape(-1, *rest)
            return original(tensor, repeats, dim=dim, output_size=output_size)

        torch.Tensor.repeat_interleave = interleave
        return self

    def __exit__(self, *_):
        torch.Tensor.repeat_interleave = self.original


class MotionUNet(torch.nn.Module):
    """The graph's encoder_hidden_states are one row per video ([batch, 77, width]); diffusers'
    UNetMotionModel takes one per frame (its pipeline repeats them), so the graph repeats them."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        hidden = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return self.unet(sample, timestep, hidden, return_dict=False)[0]


def build(preset, dtype, out, device, seed, diffusers_dir=None):
    """The text encoder, tokenizer, VAE and scheduler as build_sd.py makes them (same seed: the
    same weights as its package), then the motion UNet in place of its UNet."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    text, vae = build_sd.build(preset, dtype, out, device, seed, unet_graph=False)
    spec = build_sd.PRESETS[preset]
    float_type = torch.float16 if dtype == "fp16" else torch.float32
    torch.manual_seed(seed + 1)
    unet_spec = spec["unet"]
    unet2d = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_spec)
    motion = dict(MOTION[preset])
    proj_out_std = float(os.environ.get("KILN_PROJ_OUT_STD", motion.pop("proj_out_std")))
    adapter = MotionAdapter(block_out_channels=unet_spec["block_out_channels"], **motion)
    # Trained adapters start from zero output projections; random ones make the modules matter.
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.endswith("proj_out.weight") or name.endswith("proj_out.bias"):
                parameter.normal_(0.0, proj_out_std)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter).eval().to(device, float_type)
    size = unet_spec["sample_size"]
    sample = build_sd.example(2, 4, 4, size, size, device=device, dtype=float_type)
    timestep = torch.tensor([999, 999], dtype=torch.int64, device=device)
    hidden = build_sd.example(2, clip_bpe.CONTEXT, unet_spec["cross_attention_dim"], device=device, dtype=float_type)
    axes = {0: "batch", 2: "frames", 3: "height", 4: "width"}
    with torch.no_grad(), _ExpandInterleave():
        build_sd.export(MotionUNet(unet), (sample, timestep, hidden), out / "unet/model.onnx",
                        ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                        {"sample": axes, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                         "out_sample": axes})
    if diffusers_dir:
        save_pipeline(diffusers_dir, text, vae, unet, out / "tokenizer")
    return text, vae, unet


def save_pipeline(path, text, vae, unet, tokenizer_dir):
    """The same weights as a diffusers AnimateDiffPipeline folder."""
    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=clip_bpe.CONTEXT)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in build_sd.SCHEDULER.items() if k != "_class_name"})
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, motion_adapter=None,
                               scheduler=scheduler)
    pipe.save_pretrained(path)
    print(f"wrote the diffusers pipeline {path}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=build_sd.PRESETS, default="tiny")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, help="a kiln manifest.json to copy into the package")
    parser.add_argument("--diffusers", type=Path, help="also save the same weights as a diffusers AnimateDiffPipeline")
    args = parser.parse_args()
    build(args.preset, args.dtype, args.out, args.device, args.seed, args.diffusers)
    if args.manifest:
        (args.out / "manifest.json").write_text(args.manifest.read_text())


if __name__ == "__main__":
    main()
