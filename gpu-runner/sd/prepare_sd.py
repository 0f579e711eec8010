"""Prepares a latent-diffusion package for CUDA: beside each plain graph (what the CPU runs) it
writes an optimized fp16 graph, and records in manifest.json which graph serves which device.

    python3 gpu-runner/sd/prepare_sd.py --package DIR [--out DIR] [--components unet,vae_decoder,text_encoder]
                                        [--steps-for cuda]

The input is an optimum / diffusers ONNX export in the layout gpu-runner/sd/build_sd.py writes
(`<component>/model.onnx`), fp32 or fp16. For each component this runs ONNX Runtime's own Stable
Diffusion recipe (onnxruntime.transformers, as its `optimize_pipeline.py --float16` does):

    fp16 graphs are first widened to fp32 (the fusions match fp32 exports)
    optimize_model(model_type=unet|vae|clip, opt_level=0, FusionOptions(model_type), use_gpu=True)
        MultiHeadAttention (packed QKV / KV), GroupNorm / SkipGroupNorm, NhwcConv, BiasSplitGelu,
        BiasAdd, LayerNorm / SkipLayerNorm fusions: contrib operators with CUDA kernels
    convert_float_to_float16(keep_io_types=False)

and writes `<component>/model.cuda.onnx`. manifest.json gains

    "graphs": {"cuda": {"unet": "unet/model.cuda.onnx", ...}}

and the runner, on a CUDA device, loads those; on the CPU it keeps loading `<component>/model.onnx`
(the fused operators have no CPU kernels). Without --out the package is prepared in place.

For each device of --steps-for (default cuda) it also writes the step graphs of step_graph.py
around that device's UNet and decoder: `unet/step[.cuda].onnx` (one whole denoising step: the
latents stay on the device) and `vae_decoder/rgb[.cuda].onnx` (decoder to RGB bytes), named
`unet_step` and `vae_decoder_rgb` in the device's `graphs` entry. (`--steps-for cpu,cuda` gives
the CPU step graphs of the plain graphs too: what the tests hold against the CPU's host loop.)

Needs numpy, onnx and onnxruntime (whose package carries onnxruntime.transformers): the local
venv has them (`cargo run -p kiln-local -- test` installs them); no GPU is needed.
"""

import argparse
import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# Component directory -> the optimizer's model type.
MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae", "text_encoder": "clip"}
CUDA_GRAPH = "model.cuda.onnx"
# Operators the recipe fuses; counted in what this prints.
FUSED = (
    "MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu",
    "BiasAdd", "BiasGelu", "FastGelu", "LayerNormalization", "SkipLayerNormalization", "QuickGelu",
)


def widen_to_fp32(model: onnx.ModelProto) -> int:
    """Turns an fp16 graph into the fp32 graph it was made from: fp16 initializers, constants,
    casts and declared types become fp32. Returns how many tensors changed."""
    changed = 0
    graph = model.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
            graph.initializer[index].CopyFrom(wide)
            changed += 1
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
                changed += 1
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                wide = numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name)
                attribute.t.CopyFrom(wide)
                changed += 1
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == TensorProto.FLOAT16:
            tensor_type.elem_type = TensorProto.FLOAT
            changed += 1
    return changed


def is_fp16(model: onnx.ModelProto) -> bool:
    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


def numpy_24_compatible():
    """ONNX Runtime 1.31.1's UNet attention fusion reads the head count of a PyTorch 2 export
    with `int()` of a one-element array, an error from numpy 2.4 on (the fusion then crashes).
    Reads it with `.item()` instead; the rest of the method is ONNX Runtime's. (The optimizer
    imports its modules by their bare names: onnxruntime.transformers puts its folder on the
    path, so `fusion_attention_unet` is the module the optimizer uses.)"""
    import onnxruntime.transformers  # noqa: F401  (puts its folder on sys.path)
    from fusion_attention_unet import FusionAttentionUnet

    original = FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and list(value.shape) == [1] and value.item() > 0:
                    return int(value.item())
        return original(self, reshape_q, is_torch2)

    FusionAttentionUnet.get_num_heads = get_num_heads


# The hidden sizes ONNX Runtime's CUDA BiasSplitGelu kernel takes (SD's 320-1280 channels, and
# SDXL's); any other it refuses at run time ("hidden size should be 2560, 5120, ...").
BIAS_SPLIT_GELU_SIZES = {2560, 5120, 6144, 10240, 12288}


def unsupported_fusions(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The fused nodes whose shapes ONNX Runtime's CUDA kernels refuse at run time, by kind:
    - "group norm": channels per group of GroupNorm / SkipGroupNorm ("GroupNorm in CUDA does not
      support the input"): it takes groups of a multiple of its channels per thread, which SD's
      128-1280 channels in 32 groups are and a tiny model's 32 channels in 32 groups are not
      (4 and up, even, is what the SD shapes use);
    - "bias split gelu": BiasSplitGelu's hidden size (the bias), one of BIAS_SPLIT_GELU_SIZES.
    Seen on the H100 with the tiny package; the SD-1.5 shapes pass both."""
    sizes = {tensor.name: tensor.dims[0] for tensor in model.graph.initializer if len(tensor.dims) == 1}
    refused: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.op_type in ("GroupNorm", "SkipGroupNorm"):
            groups = next((a.i for a in node.attribute if a.name == "groups"), 0)
            per_group = sizes.get(node.input[1], 0) // groups if groups else 0
            if per_group < 4 or per_group % 2:
                refused.setdefault("group norm", []).append(per_group)
        elif node.op_type == "BiasSplitGelu":
            hidden = sizes.get(node.input[1], 0)
            if hidden not in BIAS_SPLIT_GELU_SIZES:
                refused.setdefault("bias split gelu", []).append(hidden)
    return refused


def optimize(source: Path, target: Path, model_type: str) -> dict:
    """One component through ORT's recipe; returns what the graph became."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    numpy_24_compatible()

    def load():
        model = onnx.load(str(source))
        return model, widen_to_fp32(model) if is_fp16(model) else 0

    def fuse(model, refused=()):
        options = FusionOptions(model_type)
        if model_type == "unet":
            # What optimize_pipeline.py turns on with --float16 (ONNX Runtime >= 1.15).
            options.enable_packed_kv = True
            options.enable_packed_qkv = True
            options.enable_bias_add = True
        options.enable_group_norm = "group norm" not in refused
        options.enable_skip_group_norm = "group norm" not in refused
        options.enable_bias_splitgelu = "bias split gelu" not in refused
        return optimize_model(
            model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=options, use_gpu=True,
        )

    model, widened = load()
    nodes_before = len(model.graph.node)
    optimized = fuse(model)
    refused = unsupported_fusions(optimized.model)
    if refused:
        model, _ = load()
        optimized = fuse(model, refused)
    optimized.convert_float_to_float16(keep_io_types=False)
    optimized.save_model_to_file(str(target))
    ops = Counter(node.op_type for node in optimized.model.graph.node)
    report = {
        "from": "fp16 (widened to fp32 first)" if widened else "fp32",
        "nodes before": nodes_before,
        "nodes after": sum(ops.values()),
        "fused": {op: ops[op] for op in FUSED if ops[op]},
        "MB": round(target.stat().st_size / 1e6, 1),
    }
    if "group norm" in refused:
        report["group norm left unfused"] = (
            f"groups of {sorted(set(refused['group norm']))} channels, which ONNX Runtime's CUDA GroupNorm kernel "
            "does not take")
    if "bias split gelu" in refused:
        report["bias split gelu left unfused"] = (
            f"hidden sizes {sorted(set(refused['bias split gelu']))}; ONNX Runtime's CUDA BiasSplitGelu kernel "
            f"takes {sorted(BIAS_SPLIT_GELU_SIZES)}")
    return report


def write_step_graphs(out: Path, device: str, graphs: dict) -> dict:
    """The step and RGB decoder graphs around `device`'s UNet and decoder; returns their files."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_graph import rgb_graph, step_graph

    suffix = ".cuda" if device == "cuda" else ""
    unet = graphs.get("unet", "unet/model.onnx")
    decoder = graphs.get("vae_decoder", "vae_decoder/model.onnx")
    config = out / "vae_decoder" / "config.json"
    scaling = json.loads(config.read_text()).get("scaling_factor", 0.18215) if config.exists() else 0.18215
    files = {"unet_step": f"unet/step{suffix}.onnx", "vae_decoder_rgb": f"vae_decoder/rgb{suffix}.onnx"}
    onnx.save(step_graph(onnx.load(str(out / unet))), str(out / files["unet_step"]))
    onnx.save(rgb_graph(onnx.load(str(out / decoder)), scaling), str(out / files["vae_decoder_rgb"]))
    return files


def prepare(package: Path, out: Path, components: list[str], steps_for: list[str] | None = None) -> dict:
    if out != package:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(package, out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("pipeline") != "latent-diffusion":
        raise SystemExit(f"{manifest_path}: pipeline {manifest.get('pipeline')!r}; only latent-diffusion packages are prepared")
    report, cuda = {}, {}
    for component in components:
        source = out / component / "model.onnx"
        if not source.exists():
            raise SystemExit(f"{source}: no such graph")
        report[component] = optimize(source, out / component / CUDA_GRAPH, MODEL_TYPES[component])
        cuda[component] = f"{component}/{CUDA_GRAPH}"
    graphs = dict(manifest.get("graphs", {}), cuda=cuda)
    for device in steps_for if steps_for is not None else ["cuda"]:
        files = write_step_graphs(out, device, graphs.get(device, {}))
        graphs[device] = dict(graphs.get(device, {}), **files)
        report[f"step graphs ({device})"] = files
    manifest["graphs"] = graphs
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="write the prepared package here (default: in place)")
    parser.add_argument("--components", default="unet,vae_decoder,text_encoder",
                        help="which graphs to optimize (comma-separated; default all three)")
    parser.add_argument("--steps-for", default="cuda",
                        help="devices (cpu, cuda; comma-separated, or empty) to write step graphs for (default cuda)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    components = [c for c in args.components.split(",") if c]
    unknown = [c for c in components if c not in MODEL_TYPES]
    if unknown:
        raise SystemExit(f"--components: {unknown} not among {list(MODEL_TYPES)}")
    steps_for = [d for d in args.steps_for.split(",") if d]
    if any(d not in ("cpu", "cuda") for d in steps_for):
        raise SystemExit(f"--steps-for: {steps_for}: devices are cpu and cuda")
    report = prepare(args.package, args.out or args.package, components, steps_for)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
