//! The `procedural` pipeline: one ONNX graph called once per step, each call moving a canvas
//! from seeded noise toward the picture its style describes (see the demo model's
//! `build_model.py`). Frames of a video are a batch along the graph's first axis.

use ort::{session::Session, value::Tensor};
use std::path::Path;

use super::{
    Frames, Pipeline, RenderError, RenderRequest,
    noise::uniform,
    runtime::{self, RuntimeError, SessionOptions},
    style::{STYLE_LEN, style},
};

/// The graph file in a procedural package.
pub const MODEL_FILE: &str = "model.onnx";

/// Most pixels (frames × width × height) in one call; longer videos take several calls, which
/// bounds the memory a job needs whatever its size.
const MAX_PIXELS_PER_RUN: usize = 2 * 1024 * 1024;

pub struct Procedural {
    session: Session,
}

impl Procedural {
    pub fn load(package: &Path, options: &SessionOptions) -> Result<Self, RuntimeError> {
        Ok(Self { session: runtime::load(&package.join(MODEL_FILE), options)? })
    }
}

/// Fault injection for the runner's watchdog tests: a job whose prompt equals this variable's
/// value blocks its session thread for good, ignoring stop requests (a hung device call).
pub const STUCK_PROMPT_ENV: &str = "KILN_FAULT_STUCK_PROMPT";

impl Pipeline for Procedural {
    fn render(&mut self, request: &RenderRequest) -> Result<Frames, RenderError> {
        let params = &request.params;
        if std::env::var(STUCK_PROMPT_ENV).is_ok_and(|prompt| prompt == params.prompt) {
            loop {
                std::thread::park();
            }
        }
        let (width, height) = (params.width as usize, params.height as usize);
        let frame_count = params.num_frames.max(1) as usize;
        let steps = params.steps.max(1);
        let pixels = width * height;
        if pixels == 0 {
            return Err(RenderError::Invalid("width and height must be positive".into()));
        }
        let per_run = (MAX_PIXELS_PER_RUN / pixels).clamp(1, frame_count);
        let runs = frame_count.div_ceil(per_run) as u32;
        let total = runs * steps;
        let control = &request.control;
        control.report(0, total);
        let style = style(params);
        let mut frames = Vec::with_capacity(frame_count);
        for (run, first) in (0..frame_count).step_by(per_run).enumerate() {
            let count = per_run.min(frame_count - first);
            // Each frame's noise depends only on the seed and its index, so the picture does
            // not depend on how frames are split into runs.
            let mut canvas = Vec::with_capacity(count * pixels * 3);
            for frame in first..first + count {
                canvas.extend(uniform(u64::from(params.seed), frame as u64, pixels * 3));
            }
            let styles: Vec<f32> = (0..count).flat_map(|_| style).collect();
            let times: Vec<f32> = (first..first + count).map(|f| f as f32 / frame_count as f32).collect();
            for step in 0..steps {
                control.check()?;
                let blend = vec![1.0 / (steps - step) as f32; count];
                let outputs = self.session.run(ort::inputs![
                    "canvas" => Tensor::from_array(([count, height, width, 3], canvas))?,
                    "style" => Tensor::from_array(([count, STYLE_LEN], styles.clone()))?,
                    "t" => Tensor::from_array(([count], times.clone()))?,
                    "blend" => Tensor::from_array(([count], blend))?,
                ])?;
                let (_, data) = outputs["canvas_out"].try_extract_tensor::<f32>()?;
                canvas = data.to_vec();
                control.report(run as u32 * steps + step + 1, total);
            }
            frames.extend(canvas.chunks_exact(pixels * 3).map(to_rgb8));
        }
        Ok(Frames { width: params.width, height: params.height, frames, notes: Vec::new() })
    }
}

fn to_rgb8(frame: &[f32]) -> Vec<u8> {
    frame.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8).collect()
}
