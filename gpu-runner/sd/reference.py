"""The runner's latent-diffusion pipeline, reimplemented in numpy on onnxruntime: the reference
the Rust pipeline is tested against (`gpu-runner/tests/diffusion.rs`).

It shares nothing with the Rust code but the model files: its own CLIP tokenizer
(`clip_bpe.py`), schedulers written from diffusers' definitions, its own noise generator
(SplitMix64 + Box-Muller, vectorised), its own classifier-free guidance and latent walk.

    python reference.py --package DIR --prompt "a lighthouse" --seed 7 --steps 4 \
        --guidance 7.5 --width 64 --height 64 --frames 1 --out frames.rgb

writes the frames as raw RGB bytes, frame after frame; `--tokens "text"` prints token ids.
Needs numpy and onnxruntime (the project's .venv has both).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clip_bpe  # noqa: E402

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
FRAMES_PER_KEY = 8
STEP_STREAM = 1 << 32
MASK = (1 << 64) - 1


def splitmix(seed, stream, count):
    base = (seed ^ ((stream * 0x9E3779B97F4A7C15) & MASK)) & MASK
    with np.errstate(over="ignore"):
        z = np.uint64(base) + GOLDEN * np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def gaussian(seed, stream, length):
    pairs = (length + 1) // 2
    bits = splitmix(seed, stream, 2 * pairs)
    scale = 1.0 / float(1 << 53)
    u1 = ((bits[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * scale
    u2 = (bits[1::2] >> np.uint64(11)).astype(np.float64) * scale
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = radius * np.cos(angle)
    out[1::2] = radius * np.sin(angle)
    return out[:length].astype(np.float32)


def slerp(a, b, t):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = float(np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64)))
    if abs(cos) > 0.9995:
        wa, wb = 1.0 - t, t
    else:
        theta = np.arccos(cos)
        wa, wb = np.sin((1.0 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    return (wa * a64 + wb * b64).astype(np.float32)


def walk_noise(seed, frame, frames, length):
    key, offset = divmod(frame, FRAMES_PER_KEY)
    start = gaussian(seed, key, length)
    if offset == 0 or frames <= 1:
        return start
    return slerp(start, gaussian(seed, key + 1, length), offset / FRAMES_PER_KEY)


class Scheduler:
    """Euler, Euler-ancestral and LCM, from diffusers' definitions, in float64."""

    def __init__(self, config, steps):
        self.kind = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                     "LCMScheduler": "lcm"}.get(config["_class_name"], "euler")
        train = config.get("num_train_timesteps", 1000)
        start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
        if config.get("beta_schedule", "linear") == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, train, dtype=np.float64) ** 2
        else:
            betas = np.linspace(start, end, train, dtype=np.float64)
        self.alphas = np.cumprod(1.0 - betas)
        self.prediction = config.get("prediction_type", "epsilon")
        spacing = config.get("timestep_spacing", "linspace")
        if self.kind == "lcm":
            original = config.get("original_inference_steps", 50)
            origin = (np.arange(1, original + 1) * (train // original) - 1)[::-1]
            index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
            self.timesteps = origin[index].astype(np.float64)
            self.init_sigma = 1.0
            self.final_alpha = 1.0 if config.get("set_alpha_to_one", True) else self.alphas[0]
            self.scaling = config.get("timestep_scaling", 10.0)
            return
        if spacing == "linspace":
            self.timesteps = np.linspace(0, train - 1, steps)[::-1].copy()
        elif spacing == "leading":
            self.timesteps = (np.arange(0, steps) * (train // steps))[::-1].astype(np.float64) + config.get("steps_offset", 0)
        else:
            self.timesteps = np.round(np.arange(train, 0, -train / steps)) - 1.0
        full = np.sqrt((1 - self.alphas) / self.alphas)
        self.sigmas = np.append(np.interp(self.timesteps, np.arange(len(full)), full), 0.0)
        top = self.sigmas.max()
        self.init_sigma = top if spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    def input_scale(self, i):
        return 1.0 if self.kind == "lcm" else 1.0 / (self.sigmas[i] ** 2 + 1) ** 0.5

    def needs_noise(self, i):
        return self.kind == "euler_a" or (self.kind == "lcm" and i + 1 < len(self.timesteps))

    def step(self, i, output, sample, noise):
        x, e = sample.astype(np.float64), output.astype(np.float64)
        if self.kind == "lcm":
            t = int(self.timesteps[i])
            alpha = self.alphas[t]
            alpha_prev = self.alphas[int(self.timesteps[i + 1])] if i + 1 < len(self.timesteps) else self.final_alpha
            scaled = t * self.scaling
            c_skip = 0.25 / (scaled ** 2 + 0.25)
            c_out = scaled / (scaled ** 2 + 0.25) ** 0.5
            if self.prediction == "epsilon":
                original = (x - np.sqrt(1 - alpha) * e) / np.sqrt(alpha)
            elif self.prediction == "v_prediction":
                original = np.sqrt(alpha) * x - np.sqrt(1 - alpha) * e
            else:
                original = e
            denoised = c_out * original + c_skip * x
            if noise is not None:
                return (np.sqrt(alpha_prev) * denoised + np.sqrt(1 - alpha_prev) * noise.astype(np.float64)).astype(np.float32)
            return denoised.astype(np.float32)
        sigma, following = self.sigmas[i], self.sigmas[i + 1]
        if self.prediction == "epsilon":
            denoised = x - sigma * e
        elif self.prediction == "v_prediction":
            denoised = e * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        else:
            denoised = e
        up, down = 0.0, following
        if self.kind == "euler_a":
            up = max(following ** 2 * (sigma ** 2 - following ** 2) / sigma ** 2, 0.0) ** 0.5
            down = max(following ** 2 - up ** 2, 0.0) ** 0.5
        out = x + (x - denoised) / sigma * (down - sigma)
        if up > 0 and noise is not None:
            out = out + noise.astype(np.float64) * up
        return out.astype(np.float32)


class Pipeline:
    def __init__(self, package):
        package = Path(package)
        self.tokenizer = clip_bpe.ClipTokenizer(package / "tokenizer")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        load = lambda name: ort.InferenceSession(str(package / name / "model.onnx"), options,
                                                 providers=["CPUExecutionProvider"])
        self.text, self.unet, self.vae = load("text_encoder"), load("unet"), load("vae_decoder")
        self.config = json.loads((package / "scheduler/scheduler_config.json").read_text())
        vae_config = package / "vae_decoder/config.json"
        self.scaling = json.loads(vae_config.read_text()).get("scaling_factor", 0.18215) if vae_config.exists() else 0.18215
        self.types = {i.name: i.type for s in (self.text, self.unet, self.vae) for i in s.get_inputs()}

    def float_type(self, name):
        return np.float16 if self.types[name] == "tensor(float16)" else np.float32

    def encode(self, prompt):
        ids, _ = self.tokenizer.encode_padded(prompt)
        dtype = np.int64 if self.types["input_ids"] == "tensor(int64)" else np.int32
        return self.text.run(None, {"input_ids": np.array([ids], dtype=dtype)})[0][0].astype(np.float32)

    def render(self, prompt, negative, seed, steps, guidance, width, height, frames):
        scheduler = Scheduler(self.config, steps)
        guided = guidance > 1.0
        cond = self.encode(prompt)
        uncond = self.encode(negative) if guided else None
        shape = (4, height // 8, width // 8)
        length = int(np.prod(shape))
        images = []
        for frame in range(frames):
            latents = walk_noise(seed, frame, frames, length).astype(np.float64) * scheduler.init_sigma
            latents = latents.astype(np.float32)
            for i, t in enumerate(scheduler.timesteps):
                scaled = (latents.astype(np.float64) * scheduler.input_scale(i)).astype(np.float32).reshape(shape)
                rows = [uncond, cond] if guided else [cond]
                sample = np.stack([scaled] * len(rows)).astype(self.float_type("sample"))
                hidden = np.stack(rows).astype(self.float_type("encoder_hidden_states"))
                step_t = np.array([t] * len(rows)).astype(np.int64 if self.types["timestep"] == "tensor(int64)" else np.float32)
                out = self.unet.run(None, {"sample": sample, "timestep": step_t, "encoder_hidden_states": hidden})[0]
                out = out.astype(np.float32).reshape(len(rows), -1)
                if guided:
                    eps = (out[0].astype(np.float64) + guidance * (out[1].astype(np.float64) - out[0])).astype(np.float32)
                else:
                    eps = out[0]
                noise = gaussian(seed, STEP_STREAM + i, length) if scheduler.needs_noise(i) else None
                latents = scheduler.step(i, eps, latents, noise)
            z = (latents.astype(np.float64) / self.scaling).astype(np.float32).reshape((1,) + shape)
            image = self.vae.run(None, {"latent_sample": z.astype(self.float_type("latent_sample"))})[0][0]
            rgb = np.clip(image.astype(np.float32) / np.float32(2) + np.float32(0.5), 0, 1)
            images.append(np.floor(rgb * np.float32(255) + np.float32(0.5)).astype(np.uint8).transpose(1, 2, 0))
        return images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--tokens", help="print the padded token ids of this text and the count cut, then exit")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.tokens is not None:
        ids, cut = clip_bpe.ClipTokenizer(args.package / "tokenizer").encode_padded(args.tokens)
        print(json.dumps({"ids": ids, "truncated": cut}))
        return
    images = Pipeline(args.package).render(args.prompt, args.negative, args.seed, args.steps, args.guidance,
                                           args.width, args.height, args.frames)
    args.out.write_bytes(b"".join(image.tobytes() for image in images))


if __name__ == "__main__":
    main()
