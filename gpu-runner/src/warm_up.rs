//! One render per model before the runner takes its first job.
//!
//! Two reasons. A broken device setup (a missing CUDA library, a driver too old for the
//! kernels, too little GPU memory for the model) fails here, at startup, where the instance
//! can be replaced, instead of failing every job it takes. And the first run of a graph on a
//! GPU pays for kernel loading and cuDNN's algorithm search at that shape: the warm-up renders
//! at the model's default size, steps and guidance, the shape most jobs ask for, so the first
//! real job does not pay it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kiln_domain::{ModelSpec, Submission, WebhookPolicy};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::{
    batching::BatchKey,
    render::{RenderControl, RenderError, RenderRequest, RuntimeFailure},
    session::{RenderJob, SessionHandle},
};

/// One model's warm-up on one device.
#[derive(Debug, Clone)]
pub struct WarmedUp {
    pub model: String,
    pub version: String,
    pub device: crate::render::runtime::Device,
    /// Time in the render call, as the session measured it.
    pub render_time: Duration,
    /// From handing the job over to its frames coming back.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error("model {model}: its defaults do not make a job: {message}")]
    Defaults { model: String, message: String },
    #[error("model {model}: no render session")]
    NoSession { model: String },
    #[error("model {model}: the warm-up render failed: {source}")]
    Render {
        model: String,
        #[source]
        source: RenderError,
    },
}

/// Renders one image of each model with its defaults through each of its sessions (one per
/// device), in turn, each in a `warm_up` span.
pub async fn warm_up(models: &[ModelSpec], sessions: &[SessionHandle]) -> Result<Vec<WarmedUp>, WarmUpError> {
    let mut warmed = Vec::with_capacity(models.len());
    for model in models {
        let serving: Vec<&SessionHandle> =
            sessions.iter().filter(|s| s.model == model.name && s.version == model.version).collect();
        if serving.is_empty() {
            return Err(WarmUpError::NoSession { model: model.name.clone() });
        }
        for session in serving {
            let span =
                tracing::info_span!("warm_up", model = %model.name, version = %model.version, device = %session.device);
            warmed.push(warm_up_one(model, session).instrument(span).await?);
        }
    }
    Ok(warmed)
}

async fn warm_up_one(model: &ModelSpec, session: &SessionHandle) -> Result<WarmedUp, WarmUpError> {
    let defaults = |message: String| WarmUpError::Defaults { model: model.name.clone(), message };
    let failed = |source: RenderError| WarmUpError::Render { model: model.name.clone(), source };
    let body = serde_json::json!({ "model": model.name, "prompt": "warm-up", "seed": 0, "num_frames": 1 });
    let params = Submission::parse(body.to_string().as_bytes())
        .and_then(|submission| submission.resolve(model, WebhookPolicy::default(), || 0))
        .map_err(|err| defaults(err.to_string()))?
        .params;
    let (reply, rendered) = oneshot::channel();
    let key = BatchKey::new(&model.name, &model.version, &params);
    let request = RenderRequest { params, control: Arc::new(RenderControl::default()), init_image: None };
    let started = Instant::now();
    session.submit(RenderJob::new("warm-up", key, request, reply)).await.map_err(|err| failed(err.into()))?;
    let rendered = rendered.await.map_err(|_| failed(RuntimeFailure::Dropped.into()))?;
    rendered.result.map_err(failed)?;
    Ok(WarmedUp {
        model: model.name.clone(),
        version: model.version.clone(),
        device: session.device,
        render_time: rendered.render_time,
        elapsed: started.elapsed(),
    })
}
