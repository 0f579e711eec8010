"""Builds a Stable-Diffusion-shaped model package with random weights, in the layout Hugging Face
optimum exports (`optimum-cli export onnx`), plus the kiln manifest the runner serves it by.

    text_encoder/model.onnx   input_ids (int32) -> last_hidden_state, pooler_output
    unet/model.onnx           sample, timestep (int64), encoder_hidden_states -> out_sample
    vae_decoder/model.onnx    latent_sample -> sample        (+ config.json with scaling_factor)
    tokenizer/                vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    scheduler/scheduler_config.json
    model_index.json
    manifest.json             (kiln: name, version, limits, defaults)

Presets:
    tiny  about a megabyte: a 2-level UNet of 32 channels with cross-attention, a 2-layer CLIP of
          width 32, a 4-level VAE decoder of 16 channels (so latents are 1/8 of the image, as in
          SD). The
          committed `gpu-runner/models/kiln-tiny-sd` is `--preset tiny --dtype fp32`.
    sd15  the shapes of Stable Diffusion 1.5 (UNet 860M, CLIP ViT-L text encoder 123M, VAE
          decoder 49M parameters), random weights; for benchmarks only.

Nothing is downloaded: every module is built from a config. Needs torch, diffusers and
transformers (run on the GPU machine; see BENCHMARKS.md for the exact command). With
`--schedulers FILE` it also writes the timesteps and sigmas diffusers' schedulers give, which the
runner's scheduler tests hold ours against.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clip_bpe  # noqa: E402

PRESETS = {
    "tiny": dict(
        merges=300,
        vocab_size=None,  # the tokenizer's own
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        unet=dict(
            block_out_channels=(32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
            sample_size=8,
        ),
        vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=16),
    ),
    "sd15": dict(
        merges=300,
        vocab_size=49408,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=64,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    ),
}

SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 1,
}


def example(*shape, device, dtype, uniform=False):
    """Example inputs for tracing, drawn from their own generator: the global one makes the
    weights, which must not depend on whether examples were drawn on the CPU (a CUDA draw does
    not advance it), so a package builds to the same weights on any device."""
    generator = torch.Generator().manual_seed(1234)
    draw = torch.rand if uniform else torch.randn
    return draw(*shape, generator=generator).to(device, dtype)


def export(module, args, path, inputs, outputs, dynamic):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module, args, str(path), input_names=inputs, output_names=outputs,
        dynamic_axes=dynamic, opset_version=17, do_constant_folding=True, dynamo=False,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=False)
        return out[0], out[1]


class VaeEncoder(torch.nn.Module):
    """The posterior's mean, unscaled: what init images start from."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].mean


def build(preset, dtype, out, device, seed, diffusers_dir=None, unet_graph=True):
    """Writes the package; returns the text encoder and the VAE (for build_motion.py). Without
    `unet_graph` the UNet is made (the same random draws) but not exported."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = PRESETS[preset]
    torch.manual_seed(seed)
    half = dtype == "fp16"
    float_type = torch.float16 if half else torch.float32

    merges = clip_bpe.train(clip_bpe.CORPUS, spec["merges"])
    vocab = clip_bpe.write(out / "tokenizer", merges)
    eos = vocab[clip_bpe.EOS]

    text_config = CLIPTextConfig(
        vocab_size=spec["vocab_size"] or len(vocab), max_position_embeddings=clip_bpe.CONTEXT,
        hidden_act="quick_gelu", bos_token_id=vocab[clip_bpe.BOS], eos_token_id=eos, pad_token_id=eos,
        **spec["text"],
    )
    # The text encoder runs once per batch, so it stays fp32 in every package: transformers 5's
    # CLIP traced in fp16 gives LayerNormalization nodes with mixed input types (invalid ONNX).
    # The runner converts between graphs' types, so mixed packages are fine.
    text = CLIPTextModel(text_config).eval().to(device, torch.float32)
    ids = torch.full((1, clip_bpe.CONTEXT), eos, dtype=torch.int32, device=device)
    ids[0, 0] = vocab[clip_bpe.BOS]
    with torch.no_grad():
        export(TextEncoder(text), (ids,), out / "text_encoder/model.onnx", ["input_ids"],
               ["last_hidden_state", "pooler_output"], {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"},
                                                         "pooler_output": {0: "batch"}})
    if diffusers_dir:
        text.save_pretrained(diffusers_dir / "text_encoder")

    unet_spec = spec["unet"]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_spec).eval().to(device, float_type)
    size = unet_spec["sample_size"]
    sample = example(2, 4, size, size, device=device, dtype=float_type)
    timestep = torch.tensor([999, 999], dtype=torch.int64, device=device)
    hidden = example(2, clip_bpe.CONTEXT, unet_spec["cross_attention_dim"], device=device, dtype=float_type)
    if unet_graph:
        with torch.no_grad():
            export(UNet(unet), (sample, timestep, hidden), out / "unet/model.onnx",
                   ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                   {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "steps"},
                    "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"}})
    if diffusers_dir:
        unet.save_pretrained(diffusers_dir / "unet")
    del unet

    vae_spec = spec["vae"]
    levels = len(vae_spec["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        **vae_spec,
    ).eval().to(device, float_type)
    latent = example(1, 4, size, size, device=device, dtype=float_type)
    with torch.no_grad():
        export(VaeDecoder(vae), (latent,), out / "vae_decoder/model.onnx", ["latent_sample"], ["sample"],
               {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "height", 3: "width"}})
    image = example(1, 3, size * 8, size * 8, device=device, dtype=float_type, uniform=True) * 2 - 1
    with torch.no_grad():
        export(VaeEncoder(vae), (image,), out / "vae_encoder/model.onnx", ["sample"], ["latent_sample"],
               {"sample": {0: "batch", 2: "height", 3: "width"}, "latent_sample": {0: "batch", 2: "height", 3: "width"}})
    (out / "vae_decoder/config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}))
    if diffusers_dir:
        save_diffusers_pipeline(diffusers_dir, vae, out / "tokenizer")

    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {
        "_class_name": "ORTStableDiffusionPipeline",
        "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
        "unet": ["onnxruntime", "ORTModelUnet"],
        "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
        "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return text, vae


def save_diffusers_pipeline(path, vae, tokenizer_dir):
    """Completes a diffusers StableDiffusionPipeline folder of the same weights (the text encoder
    and UNet were saved as they were exported): the peer that benchmarks run beside ours."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    vae.save_pretrained(path / "vae")
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=clip_bpe.CONTEXT)
    tokenizer.save_pretrained(path / "tokenizer")
    EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_class_name"}).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote the diffusers pipeline {path}", flush=True)


def scheduler_fixtures(path):
    """Timesteps and sigmas diffusers' schedulers give, for the runner's scheduler tests."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler

    base = {k: v for k, v in SCHEDULER.items() if k != "_class_name"}
    cases = []
    for cls, overrides in [
        (EulerDiscreteScheduler, {"timestep_spacing": "linspace"}),
        (EulerDiscreteScheduler, {"timestep_spacing": "leading"}),
        (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
        (EulerDiscreteScheduler, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
        (EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"}),
        (EulerAncestralDiscreteScheduler, {"timestep_spacing": "leading"}),
        (LCMScheduler, {"timestep_spacing": "leading", "original_inference_steps": 50}),
    ]:
        config = dict(base, **overrides)
        for steps in (1, 4, 25):
            scheduler = cls(**config)
            scheduler.set_timesteps(steps)
            case = {"config": dict(config, _class_name=cls.__name__), "steps": steps,
                    "timesteps": [float(t) for t in scheduler.timesteps],
                    "init_noise_sigma": float(scheduler.init_noise_sigma)}
            if hasattr(scheduler, "sigmas"):
                case["sigmas"] = [float(s) for s in scheduler.sigmas]
            if cls is not EulerAncestralDiscreteScheduler:
                # One deterministic step from a fixed sample and model output (LCM's last step is
                # deterministic; Euler's every step is).
                sample = torch.linspace(-1.0, 1.0, 8).reshape(1, 2, 2, 2)
                output = torch.cos(torch.arange(8, dtype=torch.float32)).reshape(1, 2, 2, 2)
                index = steps - 1
                t = scheduler.timesteps[index]
                if cls is EulerDiscreteScheduler:
                    scheduler._step_index = index
                    scaled = scheduler.scale_model_input(sample, t)
                    scheduler._step_index = index
                    case["scaled_input"] = scaled.flatten().tolist()
                else:
                    scheduler._step_index = index
                step = scheduler.step(output, t, sample, return_dict=False)
                case["step_index"] = index
                case["step_sample"] = sample.flatten().tolist()
                case["step_output"] = output.flatten().tolist()
                case["step_result"] = step[0].flatten().tolist()
            cases.append(case)
    Path(path).write_text(json.dumps(cases, indent=1))
    print(f"wrote {path} ({len(cases)} cases)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, help="a kiln manifest.json to copy into the package")
    parser.add_argument("--schedulers", type=Path, help="also write diffusers' scheduler values here")
    parser.add_argument("--diffusers", type=Path,
                        help="also save the same weights as a diffusers StableDiffusionPipeline folder here (the peer)")
    args = parser.parse_args()
    build(args.preset, args.dtype, args.out, args.device, args.seed, args.diffusers)
    if args.manifest:
        (args.out / "manifest.json").write_text(args.manifest.read_text())
    if args.schedulers:
        scheduler_fixtures(args.schedulers)


if __name__ == "__main__":
    main()
