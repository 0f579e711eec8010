//! A webhook receiver on 127.0.0.1 for the tests that deliver webhooks.

use crate::http::{respond, serve};
use http_body_util::BodyExt;
use hyper::{Request, body::Incoming};
use kiln_webhooks::{Secret, verify};
use serde_json::Value;
use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// What the receiver saw: one entry per request.
#[derive(Debug, Clone)]
pub struct Received {
    /// `METHOD /path`.
    pub request_line: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Value,
    /// The indexes of the secrets the signature verified with.
    pub verified_with: Vec<usize>,
}

/// A webhook receiver on 127.0.0.1 that answers `statuses` in turn (then the last one for ever)
/// and checks each request's signature against `secrets` (by index).
pub struct Receiver {
    pub url: String,
    seen: Arc<Mutex<Vec<Received>>>,
    /// Signature checks use these; push the tenant's secret(s) before the first request.
    pub secrets: Arc<Mutex<Vec<Secret>>>,
}

impl Receiver {
    pub async fn start(statuses: Vec<u16>) -> Self {
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let secrets: Arc<Mutex<Vec<Secret>>> = Arc::default();
        let (seen2, secrets2) = (seen.clone(), secrets.clone());
        let address = serve(move |request: Request<Incoming>| {
            let (seen, secrets, statuses) = (seen2.clone(), secrets2.clone(), statuses.clone());
            async move {
                let request_line = format!("{} {}", request.method(), request.uri().path());
                let headers = request.headers().clone();
                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let verified_with = secrets
                    .lock()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .filter(|(_, secret)| {
                        verify(&headers, &body, secret, Duration::from_secs(300), SystemTime::now()).is_ok()
                    })
                    .map(|(index, _)| index)
                    .collect();
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let mut seen = seen.lock().unwrap();
                seen.push(Received {
                    request_line,
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    verified_with,
                });
                let status = statuses.get(seen.len() - 1).or(statuses.last()).copied().unwrap_or(200);
                respond(status, &[], "ok")
            }
        })
        .await;
        Self { url: format!("http://{address}/hook"), seen, secrets }
    }

    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, count: usize, limit: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.seen();
            if seen.len() >= count || tokio::time::Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
