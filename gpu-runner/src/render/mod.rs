//! Rendering: the pipelines that turn a job's parameters into frames, on ONNX Runtime.
//!
//! A [`Pipeline`] is owned by one session thread and renders one batch at a time. It reports
//! each finished step to the job's [`RenderControl`] and checks it between steps, so progress is
//! real and a cancel stops the render at the next step.

pub mod device_memory;
pub mod diffusion;
pub mod input;
pub mod noise;
pub mod procedural;
pub mod runtime;
pub mod style;

use kiln_domain::JobParams;
use std::sync::{
    Arc,
    atomic::{AtomicU8, AtomicU32, Ordering},
};

/// Frames of 8-bit RGB pixels, row-major, all of one size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frames {
    pub width: u32,
    pub height: u32,
    pub frames: Vec<Vec<u8>>,
    /// What the client should know about how the job was rendered (a prompt cut to fit, say).
    pub notes: Vec<String>,
}

/// Denoising steps by how they ran on a session that captures CUDA graphs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphRuns {
    /// Steps that replayed a captured graph.
    pub replayed: u64,
    /// A graph's first two runs: ONNX Runtime runs a new graph id once plainly, then captures it.
    pub capturing: u64,
    /// Captured steps (either of the above) whose graph has more lanes than the chunk: padding.
    pub padded: u64,
    /// Steps run without a graph.
    pub uncaptured: u64,
    /// Chunks that found no graph: every graph taken by other shapes, none larger of theirs.
    pub no_graph_chunks: u64,
    /// Captures that failed; the session then stops using graphs.
    pub failed: u64,
}

/// Why a render stopped before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The client canceled the job.
    Canceled,
    /// The runner is shutting down and hands the job back to the queue.
    HandedBack,
    /// Another runner took the job over (this one's lease ran out).
    Lost,
    /// The render ran past its budget (the watchdog).
    TimedOut,
}

/// Shared between a job's task and the session thread rendering it: progress one way, a stop
/// request the other.
#[derive(Debug, Default)]
pub struct RenderControl {
    steps_done: AtomicU32,
    steps_total: AtomicU32,
    stop: AtomicU8,
}

impl RenderControl {
    pub fn report(&self, done: u32, total: u32) {
        self.steps_total.store(total, Ordering::Relaxed);
        self.steps_done.store(done, Ordering::Relaxed);
    }

    /// 0 to 1.
    pub fn progress(&self) -> f32 {
        match self.steps_total.load(Ordering::Relaxed) {
            0 => 0.0,
            total => self.steps_done.load(Ordering::Relaxed) as f32 / total as f32,
        }
    }

    /// Asks the render to stop at its next step. The first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Canceled => 1,
            StopReason::HandedBack => 2,
            StopReason::Lost => 3,
            StopReason::TimedOut => 4,
        };
        let _ = self.stop.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn stop_requested(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Canceled),
            2 => Some(StopReason::HandedBack),
            3 => Some(StopReason::Lost),
            4 => Some(StopReason::TimedOut),
            _ => None,
        }
    }

    /// `Err(Stopped)` when a stop was requested: call between steps.
    pub fn check(&self) -> Result<(), RenderError> {
        self.stop_requested().map_or(Ok(()), |reason| Err(RenderError::Stopped(reason)))
    }
}

/// Why a render produced no frames.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    #[error("stopped: {0:?}")]
    Stopped(StopReason),
    /// The job cannot be rendered by this model, however often it is tried.
    #[error("{0}")]
    Invalid(String),
    /// The runtime or the session around it failed; another attempt may succeed.
    #[error(transparent)]
    Runtime(#[from] RuntimeFailure),
}

impl From<ort::Error> for RenderError {
    fn from(err: ort::Error) -> Self {
        Self::Runtime(RuntimeFailure::Ort(Arc::new(err)))
    }
}

/// A render that failed for a reason of the machine, not of the job: another attempt, perhaps
/// on another runner, may succeed. Cheap to clone: a batch's failure is every job's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeFailure {
    /// ONNX Runtime refused a run (out of memory, a device error).
    #[error("ONNX Runtime failed: {0}")]
    Ort(#[source] Arc<ort::Error>),
    /// The pipeline panicked; its session thread caught it and goes on with the next batch.
    #[error("the pipeline panicked: {0}")]
    Panicked(String),
    /// The model's session thread has stopped, so it takes no more jobs.
    #[error("the render session has stopped")]
    SessionStopped,
    /// The session thread ended without answering for the job.
    #[error("the render session dropped the job")]
    Dropped,
}

/// One job of a batch.
#[derive(Debug, Clone)]
pub struct RenderRequest {
    pub params: JobParams,
    pub control: Arc<RenderControl>,
    /// The job's `init_image`, read and fitted to its frame (None when it names none).
    pub init_image: Option<Arc<input::InputImage>>,
}

/// A model's render path, loaded once per model and device.
pub trait Pipeline: Send {
    fn render(&mut self, request: &RenderRequest) -> Result<Frames, RenderError>;

    /// How its denoising steps ran on CUDA graphs since the last call (none, for a pipeline
    /// that captures none). The session thread adds them to the metrics after each batch.
    fn take_graph_runs(&mut self) -> GraphRuns {
        GraphRuns::default()
    }

    /// Renders compatible jobs (same model, version, size and steps, all guided or none: see
    /// [`crate::batching::BatchKey`]) together. Pipelines that can fuse them into one run
    /// override this; the default renders them one after another.
    fn render_batch(&mut self, batch: &[RenderRequest]) -> Vec<Result<Frames, RenderError>> {
        batch.iter().map(|request| self.render(request)).collect()
    }
}
