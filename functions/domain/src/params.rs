//! The body of `POST /v1/jobs`: parsed strictly (every mistake names its field), then resolved
//! against a model's description into the exact parameters a job renders with.

use crate::{
    error::{InputError, InputErrorKind},
    model::{ModelSpec, OutputFormat, Range},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{fmt::Display, net::IpAddr};

/// Longest prompt or negative prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 2_000;
/// Longest webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2_048;

/// Where a job's seed came from: only a client's seed is part of the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SeedSource {
    Client,
    Drawn,
}

/// The parameters a job renders with: every default applied, every limit checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobParams {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    /// 1 for an image.
    pub num_frames: u32,
    /// Frames per second; only for videos.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<u32>,
    pub steps: u32,
    pub guidance: f64,
    #[schema(value_type = u64, maximum = 4294967295_u64)]
    pub seed: u32,
    pub seed_source: SeedSource,
    pub format: OutputFormat,
    /// The image the job starts from (image-to-image; image-to-video: its first frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<crate::InitImage>,
    /// With `init_image`: how much of it is replaced, 0 (none) to 1 (all); the render runs
    /// the last `strength × steps` of its steps from the image noised to match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
}

/// Job events a webhook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    Started,
    Progress,
    /// The job ended: succeeded, failed, canceled or expired.
    Completed,
}

impl WebhookEvent {
    const ALL: [WebhookEvent; 3] = [Self::Started, Self::Progress, Self::Completed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Completed => "completed",
        }
    }
}

/// Where to tell the client about its job, and which events it wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Webhook {
    pub url: String,
    pub events: Vec<WebhookEvent>,
}

/// What webhook URLs are acceptable in this deployment.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookPolicy {
    /// Accept `http://` and loopback addresses (local development only). Private, link-local
    /// and other non-public addresses are refused whatever this says.
    pub allow_local: bool,
}

/// A submission as parsed, before the model is known.
#[derive(Debug, Clone)]
pub struct Submission {
    body: JobRequest,
    fingerprint: String,
}

/// The body of `POST /v1/jobs`. Every field is optional to the parser, so that a missing one
/// gets a clear error of our own; `model` and `prompt` are required. Ranges and defaults are the
/// model's (`GET /v1/models`: `limits`, `defaults`); a `null` field takes the default.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// `name`, or `name@version` to pin a version (`GET /v1/models` lists both).
    #[schema(required = true, nullable = false, example = "kiln-demo")]
    model: Option<String>,
    /// What to render; surrounding spaces are trimmed and it must not be empty.
    #[schema(required = true, nullable = false, max_length = 2000, example = "a lighthouse in a storm")]
    prompt: Option<String>,
    /// What to steer away from.
    #[schema(max_length = 2000)]
    negative_prompt: Option<String>,
    /// Pixels; within the model's `limits.width` and a multiple of its `limits.size_multiple`.
    /// With `init_image` and no size: the image's, scaled to fit.
    width: Option<u32>,
    /// Pixels; as `width`.
    height: Option<u32>,
    /// 1 for an image; more for a video (within the model's `limits.num_frames`, and
    /// `num_frames × width × height` at most its `limits.max_total_pixels`).
    num_frames: Option<u32>,
    /// Frames per second of a video; ignored for an image.
    fps: Option<u32>,
    /// Denoising steps.
    steps: Option<u32>,
    /// Classifier-free guidance scale (0, or at least 1e-6).
    guidance: Option<f64>,
    /// The start noise; drawn (and recorded in the job's `input`) when absent. The same seed,
    /// model version and parameters give the same output, and an earlier result is reused.
    #[schema(maximum = 4294967295_u64)]
    seed: Option<u64>,
    /// The encoding: an image format for one frame, a video format for several (the model's
    /// `limits.image_formats`, `limits.video_formats`).
    #[schema(value_type = Option<OutputFormat>)]
    format: Option<String>,
    /// Where to POST the job's events, signed (see the `jobEvent` webhook).
    webhook: Option<WebhookRequest>,
    /// The queue it waits in; capped by the account's maximum priority.
    priority: Option<crate::Priority>,
    quality: Option<Quality>,
    /// An uploaded image to start from (`img_….png` from `POST /v1/uploads`, kind `image`):
    /// image-to-image, or image-to-video with it as the first frame.
    #[schema(example = "img_01KBWJ5N0000000000000000AA.png")]
    init_image: Option<String>,
    /// With `init_image`: how much of it is replaced, 1e-6 up to 1 (default 0.8).
    #[schema(minimum = 0.000001, maximum = 1.0)]
    strength: Option<f64>,
}

/// What a request lets the platform trade for speed (`quality` on a request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Rendered as asked.
    #[default]
    Full,
    /// While the model's backlog per GPU slot is over the deployment's threshold, rendered
    /// with the model's `fast` preset (fewer steps); the job's `warnings` say so.
    Auto,
}

/// A job's webhook: where its events go and which.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// `https://` on a public address (plain `http://` and loopback only on a local stack).
    #[schema(required = true, nullable = false, max_length = 2048, example = "https://example.com/hooks/kiln")]
    url: Option<String>,
    /// The events to send; all three when absent.
    events: Option<Vec<WebhookEvent>>,
}

/// A submission checked against its model.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub params: JobParams,
    pub webhook: Option<Webhook>,
    /// As asked (normal when not); the tenant's maximum caps it on submission.
    pub priority: crate::Priority,
    pub quality: Quality,
}

impl Submission {
    /// Parses a request body. Fails on anything that is not a JSON object of known fields with
    /// the right types.
    pub fn parse(body: &[u8]) -> Result<Self, InputError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|err| {
            InputError::new(InputErrorKind::InvalidJson, None, format!("the body is not valid JSON: {err}"))
        })?;
        if !value.is_object() {
            return Err(InputError::new(InputErrorKind::InvalidJson, None, "the body must be a JSON object"));
        }
        let fingerprint = hex::encode(Sha256::digest(canonical_json(&value).as_bytes()));
        let body = serde_path_to_error::deserialize(&value).map_err(field_error)?;
        Ok(Self { body, fingerprint })
    }

    /// SHA-256 of the body's canonical JSON: equal for bodies that differ only in key order
    /// or spacing. Used to tell an idempotent retry from a reused key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The model asked for: `name` or `name@version`.
    pub fn model(&self) -> Result<(&str, Option<&str>), InputError> {
        let text = self.body.model.as_deref().ok_or_else(|| InputError::missing("model"))?;
        let (name, version) = match text.split_once('@') {
            Some((name, version)) => (name, Some(version)),
            None => (text, None),
        };
        if name.is_empty() || version.is_some_and(str::is_empty) {
            return Err(InputError::invalid("model", "expected `name` or `name@version`"));
        }
        Ok((name, version))
    }

    /// The image the request names, if any (its key depends on who asks: see
    /// [`crate::ImageReference::key`]).
    pub fn image_reference(&self) -> Result<Option<crate::ImageReference>, InputError> {
        self.body.init_image.as_deref().map(crate::ImageReference::parse).transpose()
    }

    /// Checks every field against `model` and fills in its defaults. `draw_seed` is called only
    /// when the client gave no seed. For a request that names an image, use
    /// [`Self::resolve_with_image`].
    pub fn resolve(
        &self,
        model: &ModelSpec,
        policy: WebhookPolicy,
        draw_seed: impl FnOnce() -> u32,
    ) -> Result<Resolved, InputError> {
        self.resolve_with_image(model, policy, draw_seed, None)
    }

    /// [`Self::resolve`], with the image the request names read (`image`). Without a width and
    /// height of its own, the job takes the image's, scaled down to fit the model's limits.
    pub fn resolve_with_image(
        &self,
        model: &ModelSpec,
        policy: WebhookPolicy,
        draw_seed: impl FnOnce() -> u32,
        image: Option<crate::InitImage>,
    ) -> Result<Resolved, InputError> {
        let (body, limits, defaults) = (&self.body, &model.limits, &model.defaults);
        if body.init_image.is_some() && image.is_none() {
            return Err(InputError::invalid("init_image", "the image could not be read"));
        }
        let strength = match (&image, body.strength) {
            (None, Some(_)) => return Err(InputError::invalid("strength", "applies only with init_image")),
            (None, None) => None,
            (Some(_), asked) => {
                let strength = asked.unwrap_or(crate::image::DEFAULT_STRENGTH);
                if !(strength > 0.0 && strength <= 1.0) {
                    return Err(InputError::invalid(
                        "strength",
                        format!("must be greater than 0 and at most 1 (got {strength})"),
                    ));
                }
                Some(storable("strength", strength)?)
            }
        };
        let from_image =
            image.as_ref().map(|image| size_from_image(image, model, body.num_frames.unwrap_or(defaults.num_frames)));

        let prompt = body.prompt.as_deref().ok_or_else(|| InputError::missing("prompt"))?.trim();
        if prompt.is_empty() {
            return Err(InputError::invalid("prompt", "must not be empty"));
        }
        check_prompt_length("prompt", prompt)?;
        let negative_prompt = body.negative_prompt.as_deref().unwrap_or("").trim();
        check_prompt_length("negative_prompt", negative_prompt)?;

        let width = body.width.or(from_image.map(|(w, _)| w)).unwrap_or(defaults.width);
        let height = body.height.or(from_image.map(|(_, h)| h)).unwrap_or(defaults.height);
        for (field, value, range) in [("width", width, limits.width), ("height", height, limits.height)] {
            in_range(field, value, range)?;
            if value % limits.size_multiple != 0 {
                return Err(InputError::invalid(
                    field,
                    format!("must be a multiple of {} (got {value})", limits.size_multiple),
                ));
            }
        }
        let num_frames = in_range("num_frames", body.num_frames.unwrap_or(defaults.num_frames), limits.num_frames)?;
        let fps = match num_frames {
            1 => None,
            _ => Some(in_range("fps", body.fps.unwrap_or(defaults.fps), limits.fps)?),
        };
        let steps = in_range("steps", body.steps.unwrap_or(defaults.steps), limits.steps)?;
        let guidance = in_range("guidance", body.guidance.unwrap_or(defaults.guidance), limits.guidance)?;
        let guidance = storable("guidance", guidance)?;

        let total_pixels = u64::from(width) * u64::from(height) * u64::from(num_frames);
        if total_pixels > limits.max_total_pixels {
            return Err(InputError::invalid(
                "num_frames",
                format!(
                    "width × height × num_frames is {total_pixels}; this model allows at most {}",
                    limits.max_total_pixels
                ),
            ));
        }

        let format = resolve_format(body.format.as_deref(), num_frames, model)?;
        let (seed, seed_source) = match body.seed {
            Some(seed) => match u32::try_from(seed) {
                Ok(seed) => (seed, SeedSource::Client),
                Err(_) => {
                    return Err(InputError::invalid("seed", format!("must be at most {} (got {seed})", u32::MAX)));
                }
            },
            None => (draw_seed(), SeedSource::Drawn),
        };
        let webhook = body.webhook.as_ref().map(|raw| resolve_webhook(raw, policy)).transpose()?;

        Ok(Resolved {
            params: JobParams {
                prompt: prompt.to_owned(),
                negative_prompt: negative_prompt.to_owned(),
                width,
                height,
                num_frames,
                fps,
                steps,
                guidance,
                seed,
                seed_source,
                format,
                init_image: image,
                strength,
            },
            webhook,
            priority: body.priority.unwrap_or_default(),
            quality: body.quality.unwrap_or_default(),
        })
    }
}

/// An image's size scaled down (never up) to fit the model's largest frame and pixel budget,
/// then down to the size multiple and up to the smallest frame.
fn size_from_image(image: &crate::InitImage, model: &ModelSpec, frames: u32) -> (u32, u32) {
    let limits = &model.limits;
    let (w, h) = (f64::from(image.width), f64::from(image.height));
    let budget = (limits.max_total_pixels as f64 / f64::from(frames.max(1))).sqrt();
    let scale = [1.0, f64::from(limits.width.max) / w, f64::from(limits.height.max) / h, budget / (w * h).sqrt()]
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let fit = |value: f64, range: Range<u32>| {
        let multiple = limits.size_multiple.max(1);
        let snapped = (value * scale) as u32 / multiple * multiple;
        snapped.clamp(range.min.div_ceil(multiple) * multiple, range.max)
    };
    (fit(w, limits.width), fit(h, limits.height))
}

fn check_prompt_length(field: &str, text: &str) -> Result<(), InputError> {
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(InputError::invalid(field, format!("at most {MAX_PROMPT_CHARS} characters (got {chars})")));
    }
    Ok(())
}

/// The smallest non-zero size a fractional parameter may have. Smaller numbers change nothing a
/// render does, and stores cannot keep all of them (DynamoDB's numbers end at 1e-130).
pub const MIN_FRACTION: f64 = 1e-6;

/// `value`, unless it is non-zero and smaller than [`MIN_FRACTION`].
fn storable(field: &str, value: f64) -> Result<f64, InputError> {
    if value != 0.0 && value.abs() < MIN_FRACTION {
        return Err(InputError::invalid(field, format!("must be 0 or at least {MIN_FRACTION} in size (got {value})")));
    }
    Ok(value)
}

fn in_range<T: PartialOrd + Copy + Display>(field: &str, value: T, range: Range<T>) -> Result<T, InputError> {
    if range.contains(value) {
        Ok(value)
    } else {
        Err(InputError::invalid(
            field,
            format!("must be between {} and {} for this model (got {value})", range.min, range.max),
        ))
    }
}

fn resolve_format(asked: Option<&str>, num_frames: u32, model: &ModelSpec) -> Result<OutputFormat, InputError> {
    let (allowed, default, kind) = if num_frames == 1 {
        (&model.limits.image_formats, model.defaults.image_format, "an image (num_frames = 1)")
    } else {
        (&model.limits.video_formats, model.defaults.video_format, "a video (num_frames > 1)")
    };
    let Some(asked) = asked else {
        return Ok(default);
    };
    match OutputFormat::parse(asked) {
        Some(format) if allowed.contains(&format) => Ok(format),
        _ => {
            let names: Vec<&str> = allowed.iter().map(|f| f.as_str()).collect();
            Err(InputError::invalid(
                "format",
                format!("`{}` is not available for {kind}; use one of: {}", truncate(asked, 20), names.join(", ")),
            ))
        }
    }
}

fn resolve_webhook(raw: &WebhookRequest, policy: WebhookPolicy) -> Result<Webhook, InputError> {
    let text = raw.url.as_deref().ok_or_else(|| InputError::missing("webhook.url"))?;
    if text.len() > MAX_WEBHOOK_URL_BYTES {
        return Err(InputError::invalid("webhook.url", format!("at most {MAX_WEBHOOK_URL_BYTES} bytes")));
    }
    let url = url::Url::parse(text)
        .map_err(|err| InputError::invalid("webhook.url", format!("not an absolute URL: {err}")))?;
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_local => {}
        _ => {
            return Err(InputError::invalid("webhook.url", "must be an https:// URL"));
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(InputError::invalid("webhook.url", "must not carry credentials"));
    }
    let literal_ip = match url.host() {
        None => return Err(InputError::invalid("webhook.url", "has no host")),
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
    };
    if let Some(ip) = literal_ip
        && !crate::address::is_public(ip)
        && !(policy.allow_local && ip.is_loopback())
    {
        return Err(InputError::invalid("webhook.url", format!("{ip} is not a public address")));
    }
    let mut events = raw.events.clone().unwrap_or_else(|| vec![WebhookEvent::Completed]);
    if events.is_empty() {
        return Err(InputError::invalid("webhook.events", "must name at least one event"));
    }
    events.sort_by_key(|e| WebhookEvent::ALL.iter().position(|x| x == e));
    events.dedup();
    Ok(Webhook { url: url.to_string(), events })
}

/// Turns a serde error into one that names the field and says what was expected.
fn field_error(err: serde_path_to_error::Error<serde_json::Error>) -> InputError {
    let path = err.path().to_string();
    let message = err.inner().to_string();
    let prefix = if path == "." || path == "?" { String::new() } else { path.clone() };
    if let Some(name) = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next()) {
        // The path already ends with the unknown key.
        let field = if prefix.is_empty() { name.to_owned() } else { prefix };
        return InputError::new(
            InputErrorKind::UnknownField,
            Some(truncate(&field, 80)),
            format!("unknown field `{}`", truncate(name, 64)),
        );
    }
    let message = match message.find(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    };
    let message = message
        .replace("u32", "a non-negative integer up to 4294967295")
        .replace("u64", "a non-negative integer")
        .replace("f64", "a number");
    InputError::new(InputErrorKind::InvalidType, Some(prefix).filter(|p| !p.is_empty()), message)
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// JSON with object keys sorted at every depth and no spaces: one text per value.
pub fn canonical_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical_json(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        scalar => scalar.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::demo;

    fn resolve(body: &str) -> Result<Resolved, InputError> {
        let submission = Submission::parse(body.as_bytes())?;
        submission.model()?;
        submission.resolve(&demo(), WebhookPolicy::default(), || 42)
    }

    #[test]
    fn good_inputs() {
        let cases: &[(&str, &dyn Fn(&JobParams) -> bool)] = &[
            (r#"{"model":"demo","prompt":"a fox"}"#, &|p| {
                p.width == 512 && p.num_frames == 1 && p.format == OutputFormat::Png && p.fps.is_none()
            }),
            (r#"{"model":"demo","prompt":"  a fox  "}"#, &|p| p.prompt == "a fox"),
            (r#"{"model":"demo","prompt":"x","seed":7}"#, &|p| p.seed == 7 && p.seed_source == SeedSource::Client),
            (r#"{"model":"demo","prompt":"x"}"#, &|p| p.seed == 42 && p.seed_source == SeedSource::Drawn),
            (r#"{"model":"demo","prompt":"x","num_frames":16}"#, &|p| {
                p.format == OutputFormat::Gif && p.fps == Some(8)
            }),
            (r#"{"model":"demo","prompt":"x","num_frames":16,"format":"webm","fps":24}"#, &|p| {
                p.format == OutputFormat::Webm && p.fps == Some(24)
            }),
            (r#"{"model":"demo","prompt":"x","width":64,"height":1024,"guidance":7}"#, &|p| {
                p.width == 64 && p.height == 1024 && p.guidance == 7.0
            }),
            (r#"{"model":"demo","prompt":"x","width":null,"fps":3}"#, &|p| p.width == 512 && p.fps.is_none()),
            (&format!(r#"{{"model":"demo","prompt":"{}"}}"#, "é".repeat(2000)), &|p| p.prompt.chars().count() == 2000),
        ];
        for (body, check) in cases {
            let resolved = resolve(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert!(check(&resolved.params), "{body}: {:?}", resolved.params);
        }
    }

    #[test]
    fn bad_inputs_name_the_field() {
        use InputErrorKind::*;
        let long = "x".repeat(2001);
        let cases: Vec<(String, InputErrorKind, Option<&str>)> = vec![
            ("".into(), InvalidJson, None),
            ("{".into(), InvalidJson, None),
            ("[1,2]".into(), InvalidJson, None),
            ("\"text\"".into(), InvalidJson, None),
            (r#"{"prompt":"x"}"#.into(), MissingField, Some("model")),
            (r#"{"model":"demo"}"#.into(), MissingField, Some("prompt")),
            (r#"{"model":"demo","prompt":null}"#.into(), MissingField, Some("prompt")),
            (r#"{"model":"demo","prompt":"   "}"#.into(), InvalidValue, Some("prompt")),
            (format!(r#"{{"model":"demo","prompt":"{long}"}}"#), InvalidValue, Some("prompt")),
            (
                format!(r#"{{"model":"demo","prompt":"x","negative_prompt":"{long}"}}"#),
                InvalidValue,
                Some("negative_prompt"),
            ),
            (r#"{"model":"demo","prompt":7}"#.into(), InvalidType, Some("prompt")),
            (r#"{"model":"demo","prompt":"x","width":"512"}"#.into(), InvalidType, Some("width")),
            (r#"{"model":"demo","prompt":"x","width":-8}"#.into(), InvalidType, Some("width")),
            (r#"{"model":"demo","prompt":"x","width":512.5}"#.into(), InvalidType, Some("width")),
            (r#"{"model":"demo","prompt":"x","height":99999999999}"#.into(), InvalidType, Some("height")),
            (r#"{"model":"demo","prompt":"x","width":500}"#.into(), InvalidValue, Some("width")),
            (r#"{"model":"demo","prompt":"x","width":2048}"#.into(), InvalidValue, Some("width")),
            (r#"{"model":"demo","prompt":"x","height":32}"#.into(), InvalidValue, Some("height")),
            (r#"{"model":"demo","prompt":"x","num_frames":0}"#.into(), InvalidValue, Some("num_frames")),
            (r#"{"model":"demo","prompt":"x","num_frames":49}"#.into(), InvalidValue, Some("num_frames")),
            (
                r#"{"model":"demo","prompt":"x","num_frames":48,"width":1024,"height":1024}"#.into(),
                InvalidValue,
                Some("num_frames"),
            ),
            (r#"{"model":"demo","prompt":"x","num_frames":8,"fps":0}"#.into(), InvalidValue, Some("fps")),
            (r#"{"model":"demo","prompt":"x","steps":0}"#.into(), InvalidValue, Some("steps")),
            (r#"{"model":"demo","prompt":"x","steps":51}"#.into(), InvalidValue, Some("steps")),
            (r#"{"model":"demo","prompt":"x","guidance":-1}"#.into(), InvalidValue, Some("guidance")),
            // In range, but no store keeps it: DynamoDB's numbers stop at 1e-130 (schemathesis
            // found this one: a 503 `backend_unavailable` for a client's number).
            (
                r#"{"model":"demo","prompt":"x","guidance":2.225073858507203e-309}"#.into(),
                InvalidValue,
                Some("guidance"),
            ),
            (r#"{"model":"demo","prompt":"x","guidance":1e-12}"#.into(), InvalidValue, Some("guidance")),
            (r#"{"model":"demo","prompt":"x","guidance":"high"}"#.into(), InvalidType, Some("guidance")),
            (r#"{"model":"demo","prompt":"x","seed":4294967296}"#.into(), InvalidValue, Some("seed")),
            (r#"{"model":"demo","prompt":"x","seed":-1}"#.into(), InvalidType, Some("seed")),
            (r#"{"model":"demo","prompt":"x","format":"gif"}"#.into(), InvalidValue, Some("format")),
            (r#"{"model":"demo","prompt":"x","format":"bmp"}"#.into(), InvalidValue, Some("format")),
            (r#"{"model":"demo","prompt":"x","num_frames":4,"format":"png"}"#.into(), InvalidValue, Some("format")),
            (r#"{"model":"demo","prompt":"x","widht":512}"#.into(), UnknownField, Some("widht")),
            (r#"{"model":"demo","prompt":"x","quality":"best"}"#.into(), InvalidType, Some("quality")),
            (r#"{"model":"demo","prompt":"x","priority":"urgent"}"#.into(), InvalidType, Some("priority")),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://a.example","evts":[]}}"#.into(),
                UnknownField,
                Some("webhook.evts"),
            ),
            (r#"{"model":"demo","prompt":"x","webhook":{}}"#.into(), MissingField, Some("webhook.url")),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"http://a.example"}}"#.into(),
                InvalidValue,
                Some("webhook.url"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"not a url"}}"#.into(),
                InvalidValue,
                Some("webhook.url"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://127.0.0.1/h"}}"#.into(),
                InvalidValue,
                Some("webhook.url"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://169.254.169.254/"}}"#.into(),
                InvalidValue,
                Some("webhook.url"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://[::1]/"}}"#.into(),
                InvalidValue,
                Some("webhook.url"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://u:p@a.example/"}}"#.into(),
                InvalidValue,
                Some("webhook.url"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://a.example","events":["done"]}}"#.into(),
                InvalidType,
                Some("webhook.events[0]"),
            ),
            (
                r#"{"model":"demo","prompt":"x","webhook":{"url":"https://a.example","events":[]}}"#.into(),
                InvalidValue,
                Some("webhook.events"),
            ),
            (r#"{"model":"demo","prompt":"x","webhook":"https://a.example"}"#.into(), InvalidType, Some("webhook")),
        ];
        for (body, kind, field) in cases {
            let err = resolve(&body).expect_err(&body);
            assert_eq!((err.kind, err.field.as_deref()), (kind, field), "{body}: {err}");
            assert!(!err.message.is_empty());
            // Position hints help with syntax errors only; elsewhere the field says where.
            assert!(kind == InvalidJson || !err.message.contains("at line"), "{}", err.message);
        }
    }

    #[test]
    fn model_reference_may_pin_a_version() {
        let parse = |body: &str| Submission::parse(body.as_bytes()).unwrap();
        assert_eq!(parse(r#"{"model":"demo"}"#).model().unwrap(), ("demo", None));
        assert_eq!(parse(r#"{"model":"demo@1.0.0"}"#).model().unwrap(), ("demo", Some("1.0.0")));
        assert_eq!(parse(r#"{"model":"demo@"}"#).model().unwrap_err().field.as_deref(), Some("model"));
        assert_eq!(parse(r#"{}"#).model().unwrap_err().kind, InputErrorKind::MissingField);
    }

    #[test]
    fn local_policy_allows_plain_http_to_loopback() {
        let body = r#"{"model":"demo","prompt":"x","webhook":{"url":"http://127.0.0.1:9/h","events":["progress","started","started"]}}"#;
        let hook = Submission::parse(body.as_bytes())
            .unwrap()
            .resolve(&demo(), WebhookPolicy { allow_local: true }, || 1)
            .unwrap()
            .webhook
            .unwrap();
        assert_eq!(hook.events, vec![WebhookEvent::Started, WebhookEvent::Progress]);
        assert!(resolve(body).is_err());
        let metadata = r#"{"model":"demo","prompt":"x","webhook":{"url":"http://169.254.169.254/latest"}}"#;
        let refused = Submission::parse(metadata.as_bytes())
            .unwrap()
            .resolve(&demo(), WebhookPolicy { allow_local: true }, || 1)
            .unwrap_err();
        assert_eq!(refused.field.as_deref(), Some("webhook.url"));
    }

    #[test]
    fn fingerprint_ignores_key_order_and_spacing() {
        let a = Submission::parse(
            br#"{"model":"demo","prompt":"x","webhook":{"url":"https://a.example","events":["completed"]}}"#,
        )
        .unwrap();
        let b = Submission::parse(b"{ \"webhook\": {\"events\":[\"completed\"], \"url\":\"https://a.example\"}, \"prompt\":\"x\", \"model\":\"demo\" }").unwrap();
        let c = Submission::parse(br#"{"model":"demo","prompt":"y"}"#).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    fn image(width: u32, height: u32) -> crate::InitImage {
        crate::InitImage {
            key: "images/acme/img_x.png".into(),
            sha256: "ab".repeat(32),
            width,
            height,
            format: crate::ImageFormat::Png,
        }
    }

    fn resolve_image(body: &str, image: crate::InitImage) -> Result<Resolved, InputError> {
        Submission::parse(body.as_bytes())?.resolve_with_image(&demo(), WebhookPolicy::default(), || 42, Some(image))
    }

    #[test]
    fn an_image_gives_its_size_and_a_default_strength() {
        let body = r#"{"model":"demo","prompt":"x","init_image":"img_01KBWJ5N0000000000000000AA.png"}"#;
        let params = resolve_image(body, image(640, 480)).unwrap().params;
        assert_eq!((params.width, params.height, params.strength), (640, 480, Some(0.8)));
        assert_eq!(params.init_image.as_ref().map(|i| i.width), Some(640));
        // Larger than the model's frame: scaled down as a whole, then to the size multiple.
        let params = resolve_image(body, image(3000, 1500)).unwrap().params;
        assert_eq!((params.width, params.height), (1024, 512));
        // Odd sizes go down to the multiple; a size the request gives wins.
        let params = resolve_image(body, image(333, 250)).unwrap().params;
        assert_eq!((params.width, params.height), (328, 248));
        let sized = r#"{"model":"demo","prompt":"x","init_image":"img_01KBWJ5N0000000000000000AA.png","width":256,"height":256,"strength":0.5}"#;
        let params = resolve_image(sized, image(333, 250)).unwrap().params;
        assert_eq!((params.width, params.height, params.strength), (256, 256, Some(0.5)));
    }

    #[test]
    fn strength_is_checked_and_needs_an_image() {
        let err = resolve(r#"{"model":"demo","prompt":"x","strength":0.5}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("strength"));
        for strength in ["0", "1.5", "-0.1"] {
            let body = format!(
                r#"{{"model":"demo","prompt":"x","init_image":"img_01KBWJ5N0000000000000000AA.png","strength":{strength}}}"#
            );
            assert_eq!(
                resolve_image(&body, image(64, 64)).unwrap_err().field.as_deref(),
                Some("strength"),
                "{strength}"
            );
        }
        // Named but not read: refused, never rendered without it.
        let err =
            resolve(r#"{"model":"demo","prompt":"x","init_image":"img_01KBWJ5N0000000000000000AA.png"}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("init_image"));
    }

    #[test]
    fn the_image_counts_in_the_cache_key_by_its_content() {
        let body = r#"{"model":"demo","prompt":"x","seed":1,"init_image":"img_01KBWJ5N0000000000000000AA.png"}"#;
        let key = |image: crate::InitImage, body: &str| {
            let params = resolve_image(body, image).unwrap().params;
            crate::CacheKey::compute("demo", "1", &params)
        };
        let plain = crate::CacheKey::compute(
            "demo",
            "1",
            &resolve(r#"{"model":"demo","prompt":"x","seed":1}"#).unwrap().params,
        );
        let a = key(image(512, 512), body);
        let mut moved = image(512, 512);
        moved.key = "inbox/acme/x/photo.png".into();
        assert_eq!(a, key(moved, body), "the same bytes under another key: the same request");
        let mut other = image(512, 512);
        other.sha256 = "cd".repeat(32);
        assert_ne!(a, key(other, body));
        assert_ne!(a, plain);
        assert_ne!(a, key(image(512, 512), &body.replace("}", r#","strength":0.3}"#)));
    }
}
