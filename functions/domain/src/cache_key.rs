//! The cache key: two requests with the same key render the same bytes.
//!
//! SHA-256 over the canonical JSON of every parameter that changes the output, plus the model
//! name and version. Defaults are applied first, so leaving a field out equals sending its
//! default. The seed counts only when the client chose it; a drawn seed means "any seed", so
//! such a request may be served by any finished render of the same parameters. Webhooks do not
//! count: they change who is told, not what is rendered.

use crate::params::{JobParams, SeedSource, canonical_json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Bumped whenever the canonical form changes, so old keys never match new ones.
const CANONICAL_FORM_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheKey(String);

impl CacheKey {
    pub fn compute(model: &str, model_version: &str, params: &JobParams) -> Self {
        Self(hex::encode(Sha256::digest(canonical_form(model, model_version, params).as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The text that is hashed; public so tests and operators can see what counts.
pub fn canonical_form(model: &str, model_version: &str, params: &JobParams) -> String {
    let mut form = serde_json::json!({
        "canonical_form": CANONICAL_FORM_VERSION,
        "model": model,
        "model_version": model_version,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "width": params.width,
        "height": params.height,
        "num_frames": params.num_frames,
        "steps": params.steps,
        "guidance": params.guidance,
        "format": params.format,
    });
    if let Some(fps) = params.fps {
        form["fps"] = fps.into();
    }
    if params.seed_source == SeedSource::Client {
        form["seed"] = params.seed.into();
    }
    // The image by its content: the same bytes uploaded twice are one request.
    if let Some(image) = &params.init_image {
        form["init_image"] = image.sha256.clone().into();
        form["strength"] = params.strength.into();
    }
    canonical_json(&form)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::tests::demo,
        params::{Submission, WebhookPolicy},
    };

    fn key(body: &str, drawn_seed: u32) -> CacheKey {
        let model = demo();
        let params = Submission::parse(body.as_bytes())
            .unwrap()
            .resolve(&model, WebhookPolicy::default(), || drawn_seed)
            .unwrap()
            .params;
        CacheKey::compute(&model.name, &model.version, &params)
    }

    #[test]
    fn equal_requests_have_equal_keys() {
        let base = key(r#"{"model":"demo","prompt":"a fox"}"#, 1);
        let same = [
            r#"{"prompt":"a fox","model":"demo"}"#,
            r#"{"model":"demo","prompt":" a fox\n"}"#,
            r#"{"model":"demo","prompt":"a fox","width":512,"height":512,"steps":4}"#,
            r#"{"model":"demo","prompt":"a fox","guidance":0}"#,
            r#"{"model":"demo","prompt":"a fox","fps":12}"#,
            r#"{"model":"demo","prompt":"a fox","webhook":{"url":"https://a.example"}}"#,
        ];
        for body in same {
            assert_eq!(key(body, 999), base, "{body}");
        }
    }

    #[test]
    fn every_output_changing_param_changes_the_key() {
        let base = key(r#"{"model":"demo","prompt":"a fox","num_frames":8}"#, 1);
        let different = [
            r#"{"model":"demo","prompt":"a cat","num_frames":8}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"negative_prompt":"blur"}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"width":256}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"height":256}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":9}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"fps":9}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"steps":5}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"guidance":1.5}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"format":"mp4"}"#,
            r#"{"model":"demo","prompt":"a fox","num_frames":8,"seed":1}"#,
        ];
        for body in different {
            assert_ne!(key(body, 1), base, "{body}");
        }
    }

    #[test]
    fn the_seed_counts_only_when_given() {
        assert_eq!(key(r#"{"model":"demo","prompt":"x"}"#, 1), key(r#"{"model":"demo","prompt":"x"}"#, 2));
        assert_ne!(
            key(r#"{"model":"demo","prompt":"x","seed":1}"#, 0),
            key(r#"{"model":"demo","prompt":"x","seed":2}"#, 0)
        );
    }

    #[test]
    fn the_model_version_counts() {
        let model = demo();
        let params = Submission::parse(br#"{"model":"demo","prompt":"x"}"#)
            .unwrap()
            .resolve(&model, WebhookPolicy::default(), || 0)
            .unwrap()
            .params;
        assert_ne!(CacheKey::compute("demo", "1.0.0", &params), CacheKey::compute("demo", "1.0.1", &params));
    }

    #[test]
    fn the_canonical_form_is_stable() {
        // Pinned: changing the canonical form must bump CANONICAL_FORM_VERSION.
        let model = demo();
        let params = Submission::parse(br#"{"model":"demo","prompt":"a fox","seed":3}"#)
            .unwrap()
            .resolve(&model, WebhookPolicy::default(), || 0)
            .unwrap()
            .params;
        assert_eq!(
            canonical_form("demo", "1.0.0", &params),
            r#"{"canonical_form":1,"format":"png","guidance":0.0,"height":512,"model":"demo","model_version":"1.0.0","negative_prompt":"","num_frames":1,"prompt":"a fox","seed":3,"steps":4,"width":512}"#
        );
    }
}
