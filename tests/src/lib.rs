//! The harness of the end-to-end tests: one moto server per test process (or the one the test
//! command started), a fresh set of resources per test, the API on a free port, HTTP helpers.

use kiln_local::{LocalStack, MotoServer, StackOptions, ensure_moto, workspace_root};
use reqwest::StatusCode;
use serde_json::Value;
use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

/// Set by `kiln-local test` so every test process shares one moto server.
pub const MOTO_URL_ENV: &str = "KILN_TEST_MOTO_URL";

/// The moto server's URL, starting one for this process if the test command did not.
pub fn moto_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var(MOTO_URL_ENV) {
            return url;
        }
        let (sender, receiver) = std::sync::mpsc::channel();
        // moto lives as long as this thread, which parks until the process exits.
        std::thread::spawn(move || {
            let started = ensure_moto(&workspace_root()).and_then(|bin| MotoServer::start(&bin, 0));
            match started {
                Ok(server) => {
                    let _ = sender.send(Ok(server.url.clone()));
                    loop {
                        std::thread::park();
                    }
                }
                Err(err) => {
                    let _ = sender.send(Err(format!("{err:#}")));
                }
            }
        });
        match receiver.recv() {
            Ok(Ok(url)) => url,
            Ok(Err(err)) => panic!("could not start moto: {err}"),
            Err(_) => panic!("the moto thread died"),
        }
    })
    .clone()
}

/// A resource prefix no other test in any process uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

/// A local deployment with the repository's model packages published.
pub async fn stack_with(options: StackOptions) -> LocalStack {
    let stack = LocalStack::start(&moto_url(), options).await.expect("local stack");
    stack.publish_models(&workspace_root().join("gpu-runner/models")).await.expect("publishing models");
    stack
}

pub async fn stack() -> LocalStack {
    stack_with(StackOptions { prefix: unique_prefix(), ..StackOptions::default() }).await
}

/// An HTTP client acting as one tenant.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub key: Option<String>,
    http: reqwest::Client,
}

/// A response: status, headers and JSON body (Null when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The `error.field` of an error response.
    pub fn error_field(&self) -> Option<&str> {
        self.body["error"]["field"].as_str()
    }

    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

impl Client {
    pub fn new(base: &str, key: Option<&str>) -> Self {
        Self { base: base.to_owned(), key: key.map(str::to_owned), http: reqwest::Client::new() }
    }

    pub async fn tenant(stack: &LocalStack, id: &str) -> Self {
        let key = stack.create_tenant(id, id).await.expect("tenant");
        Self::new(&stack.api_url, Some(key.expose()))
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    pub async fn send(builder: reqwest::RequestBuilder) -> Answer {
        let response = builder.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, headers, body }
    }

    pub async fn get(&self, path: &str) -> Answer {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Answer {
        Self::send(self.request(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn post(&self, path: &str) -> Answer {
        Self::send(self.request(reqwest::Method::POST, path)).await
    }

    /// `POST /v1/jobs` with a raw body and headers.
    pub async fn submit_raw(&self, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> Answer {
        let mut builder = self.request(reqwest::Method::POST, "/v1/jobs").body(body);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        Self::send(builder).await
    }
}
