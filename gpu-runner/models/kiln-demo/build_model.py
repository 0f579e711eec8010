#!/usr/bin/env python3
"""Builds kiln-demo's ONNX graph: a procedural "landscape at dusk" renderer.

    python3 gpu-runner/models/kiln-demo/build_model.py    # needs the onnx package

The graph is one denoising-like step. Given a canvas (the runner starts from seeded noise),
it computes the target picture for each item's style and time and moves the canvas toward it:

    inputs   canvas [N, H, W, 3]  current image, 0..1
             style  [N, 16]       0..1; colours from the prompt, shapes from the seed
             t      [N]           animation time, 0..1 (frame / num_frames)
             blend  [N]           how far to move this step; 1 lands on the target
    output   canvas_out [N, H, W, 3]

The runner calls it `steps` times with blend = 1 / (steps - i), so the last step lands exactly
on the picture: progress and cancellation are real, and the result is deterministic. N is the
batch: the frames of a video, or several jobs of the same size.

Style slots: 0-2 sky top colour, 3-5 horizon colour, 6 horizon height, 7-8 sun position,
9 sun size, 10-12 sun colour, 13-14 ridge frequencies, 15 contrast (from guidance).
"""

import math
import os

import onnx
from onnx import TensorProto, helper

OPSET = 17


class Graph:
    """A tiny builder: every method adds a node and returns the name of its output."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=TensorProto.FLOAT, shape=None):
        values = value if isinstance(value, list) else [value]
        name = self.name("c")
        self.inits.append(helper.make_tensor(name, dtype, shape if shape is not None else [], values))
        return name

    def op(self, kind, *inputs, **attrs):
        out = self.name(kind.lower())
        named = [i if isinstance(i, str) else self.const(float(i)) for i in inputs]
        self.nodes.append(helper.make_node(kind, named, [out], **attrs))
        return out

    def add(self, a, b): return self.op("Add", a, b)
    def sub(self, a, b): return self.op("Sub", a, b)
    def mul(self, a, b): return self.op("Mul", a, b)
    def div(self, a, b): return self.op("Div", a, b)
    def sin(self, a): return self.op("Sin", a)
    def exp(self, a): return self.op("Exp", a)
    def sqrt(self, a): return self.op("Sqrt", a)
    def abs(self, a): return self.op("Abs", a)

    def clip01(self, a):
        return self.op("Clip", a, self.const(0.0), self.const(1.0))

    def mix(self, a, b, w):
        """a * (1 - w) + b * w"""
        return self.add(a, self.mul(self.sub(b, a), w))

    def smooth_step(self, edge, value, sharpness):
        """0 below the edge, 1 above, with a soft transition."""
        return self.clip01(self.add(self.mul(self.sub(value, edge), sharpness), 0.5))

    def ints(self, values):
        return self.const(values, TensorProto.INT64, [len(values)])


def build():
    g = Graph()
    canvas, style, t, blend = "canvas", "style", "t", "blend"

    # Pixel-centre coordinates in 0..1: x is [1, 1, W, 1], y is [1, H, 1, 1].
    shape = g.op("Shape", canvas)

    def axis(index, target_shape):
        size = g.op("Cast", g.op("Gather", shape, g.const(index, TensorProto.INT64), axis=0), to=TensorProto.FLOAT)
        steps = g.op("Range", g.const(0.0), size, g.const(1.0))
        centred = g.div(g.add(steps, 0.5), size)
        return g.op("Reshape", centred, g.ints(target_shape))

    y = axis(1, [1, -1, 1, 1])
    x = axis(2, [1, 1, -1, 1])

    def slot(index, width=1):
        """style[:, index:index+width] as [N, 1, 1, width]."""
        part = g.op("Slice", style, g.ints([index]), g.ints([index + width]), g.ints([1]))
        return g.op("Reshape", part, g.ints([-1, 1, 1, width]))

    tau = 2 * math.pi
    time = g.op("Reshape", t, g.ints([-1, 1, 1, 1]))
    phase = g.mul(time, tau)
    sky_top, horizon_colour, sun_colour = slot(0, 3), slot(3, 3), slot(10, 3)
    contrast = g.add(0.8, g.mul(slot(15), 0.6))

    # Sky: a vertical gradient down to the horizon, brighter near it.
    horizon = g.add(0.52, g.mul(slot(6), 0.14))
    sky_depth = g.clip01(g.div(y, horizon))
    sky = g.mix(g.mul(sky_top, 0.55), horizon_colour, g.mul(sky_depth, sky_depth))

    # Sun: rises and sets along an arc as t goes round; a hard disc with a soft glow.
    sun_x = g.add(g.add(0.2, g.mul(slot(7), 0.6)), g.mul(g.sin(phase), 0.08))
    sun_y = g.sub(g.sub(horizon, g.add(0.12, g.mul(slot(8), 0.16))), g.mul(g.sin(g.add(phase, math.pi / 2)), 0.05))
    radius = g.add(0.045, g.mul(slot(9), 0.05))
    dx, dy = g.sub(x, sun_x), g.sub(y, sun_y)
    distance = g.sqrt(g.add(g.mul(dx, dx), g.mul(dy, dy)))
    disc = g.smooth_step(distance, radius, 300.0)
    glow = g.mul(g.exp(g.mul(distance, -7.0)), 0.55)
    sky = g.clip01(g.add(g.mix(sky, sun_colour, disc), g.mul(sun_colour, glow)))

    # Two mountain ridges, sums of sines whose frequencies and phases come from the seed.
    def ridge(base, amplitude, f_slot, offset):
        f = g.add(1.5, g.mul(slot(f_slot), 4.0))
        wave = g.add(
            g.mul(g.sin(g.add(g.mul(x, g.mul(f, tau)), offset)), 0.55),
            g.add(
                g.mul(g.sin(g.add(g.mul(x, g.mul(f, tau * 2.3)), offset * 1.7)), 0.3),
                g.mul(g.sin(g.add(g.mul(x, g.mul(f, tau * 5.1)), offset * 3.1)), 0.15),
            ),
        )
        return g.sub(g.sub(horizon, base), g.mul(wave, amplitude))

    far_top = ridge(0.10, 0.06, 13, 0.7)
    near_top = ridge(0.03, 0.04, 14, 2.1)
    far = g.mul(g.smooth_step(far_top, y, 400.0), g.smooth_step(y, horizon, 400.0))
    near = g.mul(g.smooth_step(near_top, y, 400.0), g.smooth_step(y, horizon, 400.0))
    far_colour = g.mix(horizon_colour, sky_top, 0.55)
    near_colour = g.mul(sky_top, 0.25)
    land = g.mix(g.mix(sky, g.mul(far_colour, 0.6), far), near_colour, near)

    # Water: the sky mirrored about the horizon, darkened, with moving ripples and the sun's
    # reflection as a shimmering column.
    below = g.sub(y, horizon)
    mirror_depth = g.clip01(g.div(g.sub(horizon, below), horizon))
    reflected = g.mix(g.mul(sky_top, 0.55), horizon_colour, g.mul(mirror_depth, mirror_depth))
    ripple = g.sin(g.add(g.add(g.mul(below, 140.0), g.mul(x, 9.0)), g.mul(phase, 2.0)))
    ripple_light = g.add(0.78, g.mul(ripple, 0.08))
    column = g.exp(g.mul(g.abs(g.sub(x, sun_x)), -22.0))
    shimmer = g.clip01(g.mul(g.mul(column, g.add(ripple, 0.6)), g.exp(g.mul(below, -4.0))))
    water = g.clip01(g.add(g.mul(reflected, ripple_light), g.mul(sun_colour, g.mul(shimmer, 0.7))))
    is_water = g.smooth_step(horizon, y, 600.0)
    picture = g.mix(land, water, is_water)

    # Contrast about mid-grey, then clamp.
    target = g.clip01(g.add(g.mul(g.sub(picture, 0.5), contrast), 0.5))
    weight = g.op("Reshape", blend, g.ints([-1, 1, 1, 1]))
    g.nodes.append(helper.make_node("Add", [canvas, g.mul(g.sub(target, canvas), weight)], ["canvas_out"]))

    floats = TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "kiln-demo",
        [
            helper.make_tensor_value_info(canvas, floats, ["N", "H", "W", 3]),
            helper.make_tensor_value_info(style, floats, ["N", 16]),
            helper.make_tensor_value_info(t, floats, ["N"]),
            helper.make_tensor_value_info(blend, floats, ["N"]),
        ],
        [helper.make_tensor_value_info("canvas_out", floats, ["N", "H", "W", 3])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kiln")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
    onnx.save(build(), out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
