//! The job domain: what a job is, how it moves between statuses, what a client may ask for
//! (validated against a model's description), and how identical requests are recognised.
//!
//! Nothing here knows about AWS, HTTP or ONNX: the functions and the gpu-runner share it.

pub mod address;
pub mod cache_key;
pub mod catalog;
pub mod error;
pub mod events;
pub mod ids;
pub mod image;
pub mod job;
pub mod model;
pub mod params;
pub mod status;

pub use cache_key::CacheKey;
pub use catalog::{CatalogError, CatalogModel, Offered, ServedVersion};
pub use error::{InputError, InputErrorKind};
pub use events::{JobEvent, webhook_events};
pub use ids::{InvalidId, JobId, TenantId};
pub use image::{ImageFormat, ImageReference, InitImage};
pub use job::{
    IllegalTransition, Job, JobError, JobErrorCode, Output, Priority, Subscription, Timings, WebhookDelivery,
};
pub use model::{CostModel, FastPreset, ManifestError, ModelSpec, OutputFormat, RenderBudget};
pub use params::{
    JobParams, JobRequest, Quality, SeedSource, Submission, Webhook, WebhookEvent, WebhookPolicy, WebhookRequest,
};
pub use status::JobStatus;

/// The tenant shadow jobs belong to: no key is ever made for it, so no client sees them.
pub const SHADOW_TENANT: &str = "kiln-shadow";
