"""One whole denoising step as one ONNX graph, so the latents never leave the device between
steps: the UNet with the classifier-free guidance combine and the scheduler's update around it.

    latents      float32 [L, 4, h, w]   the lanes' latents (one per image or video frame)
    hidden       UNet's  [R, 77, D]     prompt embeddings: R = L (no guidance) or 2L
                                        (unconditional rows first, then conditional)
    timestep     UNet's                 as the UNet declares it
    scale        float32 [1]            the scheduler's input scale this step
    guidance     float32 [L]            each lane's guidance scale (ignored without guidance)
    coefficients float32 [3]            A, B, C of this step's update
    noise        float32 [L, 4, h, w]   fresh standard-normal noise (zeros when C = 0)
  ->
    latents_next float32 [L, 4, h, w] = A * latents + B * eps + C * noise

where the UNet sees `latents * scale` (twice over when R = 2L) and eps = u + g * (c - u) from its
unconditional rows u and conditional rows c (u = c without guidance). Every scheduler the runner
implements (Euler and Euler-a with epsilon, v or sample prediction; LCM) is such an update,
with A, B, C computed on the host per step (`Scheduler::coefficients`). The latents and the
update stay float32 whatever the UNet's type; the UNet's own inputs and output are cast.

Also the VAE with its scaling and the conversion to RGB bytes:

    latents float32 [N, 4, h, w] -> rgb uint8 [N, H, W, 3] = clip((vae(latents / s) / 2 + 0.5) * 255 + 0.5)
"""

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np


_node = helper.make_node


def _input(graph, name):
    for value in graph.input:
        if value.name == name:
            return value
    raise ValueError(f"the graph has no input `{name}`")


def _const(graph, name, array):
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def _take_input(graph, name):
    """Turns graph input `name` into an internal value (the caller adds the node that produces
    it); returns its declared element type."""
    value = _input(graph, name)
    graph.input.remove(value)
    return value.type.tensor_type.elem_type


def _rename_output(graph, old, new):
    for node in graph.node:
        for index, output in enumerate(node.output):
            if output == old:
                node.output[index] = new
    for node in graph.node:
        for index, value in enumerate(node.input):
            if value == old:
                node.input[index] = new


def step_graph(unet: onnx.ModelProto) -> onnx.ModelProto:
    """The UNet graph `unet` (inputs sample, timestep, encoder_hidden_states; output out_sample)
    wrapped into the step above."""
    model = onnx.ModelProto()
    model.CopyFrom(unet)
    graph = model.graph
    sample_type = _take_input(graph, "sample")
    _input(graph, "encoder_hidden_states").name = "hidden"
    for node in graph.node:
        for index, value in enumerate(node.input):
            if value == "encoder_hidden_states":
                node.input[index] = "hidden"
    output = graph.output[0]
    _rename_output(graph, output.name, "step_unet_out")
    graph.output.remove(output)

    f32 = TensorProto.FLOAT
    dims = ["lanes", 4, "latent_height", "latent_width"]
    graph.input.extend([
        helper.make_tensor_value_info("latents", f32, dims),
        helper.make_tensor_value_info("scale", f32, [1]),
        helper.make_tensor_value_info("guidance", f32, ["lanes"]),
        helper.make_tensor_value_info("coefficients", f32, [3]),
        helper.make_tensor_value_info("noise", f32, dims),
    ])
    zero, one = _const(graph, "step_zero", np.array([0], np.int64)), _const(graph, "step_one", np.array([1], np.int64))
    two = _const(graph, "step_two", np.array([2], np.int64))
    ones3 = _const(graph, "step_ones3", np.array([1, 1, 1], np.int64))
    lane_shape = _const(graph, "step_lane_shape", np.array([-1, 1, 1, 1], np.int64))
    before, after = [], []
    # Rows: L lanes, R = L or 2L rows; the UNet sees the scaled latents R / L times over.
    before.append(_node("Shape", ["latents"], ["step_latents_shape"]))
    before.append(_node("Slice", ["step_latents_shape", zero, one], ["step_lanes"]))
    before.append(_node("Shape", ["hidden"], ["step_hidden_shape"]))
    before.append(_node("Slice", ["step_hidden_shape", zero, one], ["step_rows"]))
    before.append(_node("Div", ["step_rows", "step_lanes"], ["step_copies"]))
    before.append(_node("Concat", ["step_copies", ones3], ["step_repeats"], axis=0))
    before.append(_node("Mul", ["latents", "scale"], ["step_scaled"]))
    before.append(_node("Tile", ["step_scaled", "step_repeats"], ["step_tiled"]))
    before.append(_node("Cast", ["step_tiled"], ["sample"], to=sample_type))
    # The prediction: unconditional rows u = [0, L), conditional rows c = [R - L, R).
    after.append(_node("Cast", ["step_unet_out"], ["step_eps_all"], to=f32))
    after.append(_node("Slice", ["step_eps_all", zero, "step_lanes", zero], ["step_u"]))
    after.append(_node("Sub", ["step_rows", "step_lanes"], ["step_first_c"]))
    after.append(_node("Slice", ["step_eps_all", "step_first_c", "step_rows", zero], ["step_c"]))
    after.append(_node("Sub", ["step_c", "step_u"], ["step_c_minus_u"]))
    after.append(_node("Reshape", ["guidance", lane_shape], ["step_g"]))
    after.append(_node("Mul", ["step_g", "step_c_minus_u"], ["step_guided"]))
    after.append(_node("Add", ["step_u", "step_guided"], ["step_eps"]))
    # The update.
    after.append(_node("Slice", ["coefficients", zero, one], ["step_a"]))
    after.append(_node("Slice", ["coefficients", one, two], ["step_b"]))
    after.append(_node("Slice", ["coefficients", two, _const(graph, "step_three", np.array([3], np.int64))], ["step_c_coef"]))
    after.append(_node("Mul", ["step_a", "latents"], ["step_ax"]))
    after.append(_node("Mul", ["step_b", "step_eps"], ["step_be"]))
    after.append(_node("Mul", ["step_c_coef", "noise"], ["step_cn"]))
    after.append(_node("Add", ["step_ax", "step_be"], ["step_axbe"]))
    after.append(_node("Add", ["step_axbe", "step_cn"], ["latents_next"]))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(before + nodes + after)
    graph.output.append(helper.make_tensor_value_info("latents_next", f32, dims))
    onnx.checker.check_model(model)
    return model


def rgb_graph(vae: onnx.ModelProto, scaling_factor: float) -> onnx.ModelProto:
    """The VAE decoder `vae` (latent_sample -> sample) with the latents' scaling before it and
    the conversion to RGB bytes after it."""
    model = onnx.ModelProto()
    model.CopyFrom(vae)
    graph = model.graph
    latent_type = _take_input(graph, "latent_sample")
    output = graph.output[0]
    _rename_output(graph, output.name, "rgb_vae_out")
    graph.output.remove(output)
    f32 = TensorProto.FLOAT
    graph.input.append(helper.make_tensor_value_info("latents", f32, ["images", 4, "latent_height", "latent_width"]))
    before = [
        _node("Mul", ["latents", _const(graph, "rgb_unscale", np.array(1.0 / scaling_factor, np.float32))], ["rgb_scaled"]),
        _node("Cast", ["rgb_scaled"], ["latent_sample"], to=latent_type),
    ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(before + nodes)
    node = lambda op, inputs, outputs, **attrs: graph.node.append(_node(op, inputs, outputs, **attrs))
    node("Cast", ["rgb_vae_out"], ["rgb_f32"], to=f32)
    node("Mul", ["rgb_f32", _const(graph, "rgb_half", np.array(127.5, np.float32))], ["rgb_a"])
    node("Add", ["rgb_a", _const(graph, "rgb_offset", np.array(128.0, np.float32))], ["rgb_b"])
    node("Clip", ["rgb_b", _const(graph, "rgb_min", np.array(0.0, np.float32)),
                  _const(graph, "rgb_max", np.array(255.0, np.float32))], ["rgb_clipped"])
    node("Floor", ["rgb_clipped"], ["rgb_floor"])
    node("Cast", ["rgb_floor"], ["rgb_u8"], to=TensorProto.UINT8)
    node("Transpose", ["rgb_u8"], ["rgb"], perm=[0, 2, 3, 1])
    graph.output.append(helper.make_tensor_value_info("rgb", TensorProto.UINT8, ["images", "height", "width", 3]))
    onnx.checker.check_model(model)
    return model
