//! Deliveries to a real HTTP receiver on 127.0.0.1 (admitted through `allow_loopback` and
//! `allow_http`), which checks every request's signature with `kiln_webhooks::verify`; and the
//! guard refusing what it must, before anything is sent.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use kiln_webhooks::{
    DEFAULT_TOLERANCE, DeliveryRequest, Failure, MAX_ERROR_CHARS, Outcome, Resolver, Secret, SenderConfig, VerifyError,
    WEBHOOK_ID, WebhookSender, verify,
};
use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;
type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// What the receiver saw of one request.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    host: String,
    message_id: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
    signature: Result<(), VerifyError>,
}

/// A webhook endpoint on 127.0.0.1 that answers the `n`-th request (from 0) with `reply(n)`.
struct Receiver {
    address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(secret: Secret, reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(reply);
        let (secret, log) = (Arc::new(secret), received.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (secret, log, reply) = (secret.clone(), log.clone(), reply.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let (secret, log, reply) = (secret.clone(), log.clone(), reply.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|body| body.to_bytes()).unwrap_or_default();
                        let header = |name: &str| {
                            parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
                        };
                        let signature = verify(&parts.headers, &body, &secret, DEFAULT_TOLERANCE, SystemTime::now());
                        let index = {
                            let mut log = log.lock().unwrap();
                            log.push(Received {
                                path: parts.uri.path().to_owned(),
                                host: header("host"),
                                message_id: header(WEBHOOK_ID),
                                content_type: header("content-type"),
                                user_agent: header("user-agent"),
                                body,
                                signature,
                            });
                            log.len() - 1
                        };
                        if signature.is_err() {
                            return Ok::<_, Infallible>(answer(StatusCode::UNAUTHORIZED, "bad signature"));
                        }
                        Ok(reply(index).await)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { address, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn answer(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder().status(status).body(Full::new(Bytes::from_static(body.as_bytes())).boxed()).unwrap()
}

fn reply_with(response: impl FnOnce() -> Response<Body> + Send + 'static) -> Reply {
    Box::pin(async move { response() })
}

/// A response body that never ends.
struct Endless;

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        static CHUNK: [u8; 16 * 1024] = [b'x'; 16 * 1024];
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK)))))
    }
}

fn local_mode() -> SenderConfig {
    SenderConfig {
        allow_http: true,
        allow_loopback: true,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(3),
        ..SenderConfig::default()
    }
}

fn request(url: String, secrets: Vec<Secret>) -> DeliveryRequest {
    DeliveryRequest {
        url,
        message_id: "msg_01JA2B3C4D5E6F7G8H9J0K1M2N".to_owned(),
        body: Bytes::from_static(br#"{"type":"job.completed","job_id":"01JA2B3C4D5E6F7G8H9J0K1M2N"}"#),
        secrets,
    }
}

#[tokio::test]
async fn retries_on_500_until_the_receiver_takes_it() {
    let (old, new) = (Secret::generate(), Secret::generate());
    // The receiver has the new secret already; we still sign with both while rotating.
    let receiver = Receiver::start(new.clone(), |n| {
        reply_with(move || match n {
            0 | 1 => answer(StatusCode::INTERNAL_SERVER_ERROR, "database unavailable, try later"),
            _ => answer(StatusCode::OK, "thanks"),
        })
    })
    .await;
    let sender = WebhookSender::new(local_mode());
    let request = request(receiver.url("/hooks/kiln"), vec![old, new]);

    let mut attempts = Vec::new();
    for _ in 0..3 {
        attempts.push(sender.deliver(&request).await);
    }

    let outcomes: Vec<_> = attempts.iter().map(|a| (a.outcome, a.status, a.failure)).collect();
    assert_eq!(
        outcomes,
        [
            (Outcome::Retry { after: None }, Some(500), Some(Failure::Status)),
            (Outcome::Retry { after: None }, Some(500), Some(Failure::Status)),
            (Outcome::Delivered, Some(200), None),
        ]
    );
    let error = attempts[0].error.as_deref().unwrap();
    assert!(error.starts_with("HTTP 500") && error.contains("database unavailable"), "{error}");
    assert_eq!(attempts[2].error, None);

    let received = receiver.received();
    assert_eq!(received.len(), 3);
    for seen in &received {
        assert_eq!(seen.signature, Ok(()));
        assert_eq!(seen.path, "/hooks/kiln");
        assert_eq!(seen.message_id, request.message_id);
        assert_eq!(seen.content_type, "application/json");
        assert!(seen.user_agent.starts_with("kiln-webhooks/"), "{}", seen.user_agent);
        assert_eq!(seen.body, request.body);
    }
}

#[tokio::test]
async fn a_receiver_without_any_of_the_secrets_rejects_the_signature() {
    let receiver = Receiver::start(Secret::generate(), |_| reply_with(|| answer(StatusCode::OK, ""))).await;
    let attempt = WebhookSender::new(local_mode()).deliver(&request(receiver.url("/"), vec![Secret::generate()])).await;
    // Our receiver answers 401 to a bad signature, and a 4xx is final.
    assert_eq!((attempt.outcome, attempt.status), (Outcome::GiveUp, Some(401)));
    assert_eq!(receiver.received()[0].signature, Err(VerifyError::NoMatchingSignature));
}

#[tokio::test]
async fn honours_retry_after_on_503_and_429_within_the_cap() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |n| {
        reply_with(move || {
            let (status, retry_after) = match n {
                0 => (StatusCode::SERVICE_UNAVAILABLE, "120"),
                1 => (StatusCode::TOO_MANY_REQUESTS, "30"),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "86400"),
            };
            Response::builder()
                .status(status)
                .header("retry-after", retry_after)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        })
    })
    .await;
    let sender = WebhookSender::new(SenderConfig { max_retry_after: Duration::from_secs(3600), ..local_mode() });
    let request = request(receiver.url("/"), vec![secret]);

    let mut afters = Vec::new();
    for _ in 0..3 {
        let attempt = sender.deliver(&request).await;
        match attempt.outcome {
            Outcome::Retry { after } => afters.push(after),
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    let secs = |s| Some(Duration::from_secs(s));
    assert_eq!(afters, [secs(120), secs(30), secs(3600)]);
}

#[tokio::test]
async fn gives_up_on_410() {
    let secret = Secret::generate();
    let receiver =
        Receiver::start(secret.clone(), |_| reply_with(|| answer(StatusCode::GONE, "endpoint removed"))).await;
    let attempt = WebhookSender::new(local_mode()).deliver(&request(receiver.url("/"), vec![secret])).await;
    assert_eq!((attempt.outcome, attempt.status, attempt.failure), (Outcome::GiveUp, Some(410), Some(Failure::Status)));
    assert_eq!(attempt.error.as_deref(), Some("HTTP 410 Gone: endpoint removed"));
}

#[tokio::test]
async fn does_not_follow_redirects() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |_| {
        reply_with(|| {
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", "/elsewhere")
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        })
    })
    .await;
    let attempt = WebhookSender::new(local_mode()).deliver(&request(receiver.url("/hook"), vec![secret])).await;
    assert_eq!((attempt.outcome, attempt.status), (Outcome::GiveUp, Some(302)));
    let paths: Vec<_> = receiver.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/hook"]);
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_is_retried() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            answer(StatusCode::OK, "too late")
        })
    })
    .await;
    let config = SenderConfig { response_timeout: Duration::from_millis(300), ..local_mode() };
    let attempt = WebhookSender::new(config).deliver(&request(receiver.url("/"), vec![secret])).await;
    assert_eq!(
        (attempt.outcome, attempt.status, attempt.failure),
        (Outcome::Retry { after: None }, None, Some(Failure::Timeout))
    );
    assert!(
        attempt.duration >= Duration::from_millis(300) && attempt.duration < Duration::from_secs(3),
        "{:?}",
        attempt.duration
    );
    assert_eq!(receiver.received().len(), 1, "the request was sent; only the answer was late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_only_the_start_of_an_endless_body() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |n| {
        reply_with(move || {
            let status = if n == 0 { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
            Response::builder().status(status).body(Endless.boxed()).unwrap()
        })
    })
    .await;
    // Were the body read to its end, the attempt would last the whole response timeout.
    let config = SenderConfig { response_timeout: Duration::from_secs(10), ..local_mode() };
    let sender = WebhookSender::new(config);
    let request = request(receiver.url("/"), vec![secret]);

    let failed = sender.deliver(&request).await;
    assert_eq!(
        (failed.outcome, failed.status, failed.failure),
        (Outcome::Retry { after: None }, Some(500), Some(Failure::Status))
    );
    assert!(failed.duration < Duration::from_secs(5), "{:?}", failed.duration);
    let error = failed.error.unwrap();
    assert!(error.starts_with("HTTP 500 Internal Server Error: xxxx"), "{error}");
    assert!(error.chars().count() <= MAX_ERROR_CHARS + 1, "{} characters", error.chars().count());

    let delivered = sender.deliver(&request).await;
    assert_eq!((delivered.outcome, delivered.status), (Outcome::Delivered, Some(200)));
    assert!(delivered.duration < Duration::from_secs(5), "{:?}", delivered.duration);
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let attempt = WebhookSender::new(local_mode())
        .deliver(&request(format!("http://{address}/"), vec![Secret::generate()]))
        .await;
    assert_eq!(
        (attempt.outcome, attempt.status, attempt.failure),
        (Outcome::Retry { after: None }, None, Some(Failure::Connection))
    );
    let error = attempt.error.unwrap();
    assert!(error.to_lowercase().contains("refused"), "{error}");
    assert!(!error.contains("http://"), "the URL leaked into the error: {error}");
}

#[tokio::test]
async fn the_guard_refuses_non_public_addresses_before_sending() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |_| reply_with(|| answer(StatusCode::OK, ""))).await;
    let port = receiver.address.port();
    let production = SenderConfig { connect_timeout: Duration::from_secs(1), ..SenderConfig::default() };
    let http_without_loopback = SenderConfig { allow_http: true, ..production.clone() };
    let cases = [
        (production.clone(), "https://10.0.0.1/".to_owned()),
        (http_without_loopback.clone(), "http://169.254.169.254/latest/meta-data".to_owned()),
        (production.clone(), "https://[::ffff:127.0.0.1]/".to_owned()),
        (production.clone(), "https://[fd00:ec2::254]/".to_owned()),
        (http_without_loopback.clone(), format!("http://127.0.0.1:{port}/")),
        // Loopback spelled as one number, in octal or in hex (the URL parser normalizes them).
        (http_without_loopback.clone(), format!("http://2130706433:{port}/")),
        (http_without_loopback.clone(), format!("http://0177.0.0.1:{port}/")),
        (http_without_loopback.clone(), format!("http://0x7f.0.0.1:{port}/")),
        // A name is judged by what it resolves to.
        (http_without_loopback.clone(), format!("http://localhost:{port}/")),
    ];
    for (config, url) in cases {
        let attempt = WebhookSender::new(config).deliver(&request(url.clone(), vec![secret.clone()])).await;
        assert_eq!(
            (attempt.outcome, attempt.status, attempt.failure),
            (Outcome::GiveUp, None, Some(Failure::AddressRefused)),
            "{url}: {:?}",
            attempt.error
        );
        assert!(
            attempt.error.as_deref().unwrap_or_default().contains("not publicly routable"),
            "{url}: {:?}",
            attempt.error
        );
    }
    assert!(receiver.received().is_empty(), "the guard let a request through");
}

#[tokio::test]
async fn refuses_unusable_requests_without_sending() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |_| reply_with(|| answer(StatusCode::OK, ""))).await;
    let port = receiver.address.port();
    let https_only = SenderConfig { allow_loopback: true, ..SenderConfig::default() };
    let cases = [
        (
            https_only.clone(),
            request(format!("http://127.0.0.1:{port}/"), vec![secret.clone()]),
            "http:// webhook URLs are not allowed",
        ),
        (local_mode(), request(format!("http://user:pw@127.0.0.1:{port}/"), vec![secret.clone()]), "credentials"),
        (local_mode(), request("not a url".to_owned(), vec![secret.clone()]), "invalid"),
        (local_mode(), request(format!("ftp://127.0.0.1:{port}/"), vec![secret.clone()]), "ftp://"),
        (local_mode(), request(receiver.url("/"), vec![]), "no secret"),
        (
            local_mode(),
            DeliveryRequest { message_id: "a.b".to_owned(), ..request(receiver.url("/"), vec![secret]) },
            "message id",
        ),
    ];
    for (config, request, expected) in cases {
        let attempt = WebhookSender::new(config).deliver(&request).await;
        assert_eq!(
            (attempt.outcome, attempt.failure),
            (Outcome::GiveUp, Some(Failure::InvalidRequest)),
            "{}",
            request.url
        );
        let error = attempt.error.unwrap_or_default();
        assert!(error.contains(expected), "{}: {error}", request.url);
    }
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn localhost_is_reachable_in_local_mode() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |_| reply_with(|| answer(StatusCode::NO_CONTENT, ""))).await;
    let url = format!("http://localhost:{}/hook", receiver.address.port());
    let attempt = WebhookSender::new(local_mode()).deliver(&request(url, vec![secret])).await;
    assert_eq!((attempt.outcome, attempt.status), (Outcome::Delivered, Some(204)));
    assert_eq!(receiver.received()[0].signature, Ok(()));
}

/// A DNS server that rebinds: its first answer is `first`, every later one `then`.
struct Rebinding {
    first: SocketAddr,
    then: SocketAddr,
    lookups: AtomicUsize,
}

impl Resolver for Rebinding {
    async fn lookup(&self, _host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        let n = self.lookups.fetch_add(1, Ordering::SeqCst);
        Ok(vec![if n == 0 { self.first } else { self.then }])
    }
}

#[tokio::test]
async fn connects_only_to_the_address_that_was_vetted() {
    let secret = Secret::generate();
    let receiver = Receiver::start(secret.clone(), |_| reply_with(|| answer(StatusCode::OK, ""))).await;
    let port = receiver.address.port();
    let dns = Arc::new(Rebinding {
        first: receiver.address,
        then: "169.254.169.254:80".parse().unwrap(),
        lookups: AtomicUsize::new(0),
    });
    let sender = WebhookSender::with_resolver(local_mode(), dns.clone());
    // `rebind.test` exists only in the fake resolver: the request reaches the receiver only
    // because the client connects to the address the guard vetted, looked up once.
    let request = request(format!("http://rebind.test:{port}/hook"), vec![secret]);

    let first = sender.deliver(&request).await;
    assert_eq!((first.outcome, first.status), (Outcome::Delivered, Some(200)), "{:?}", first.error);
    assert_eq!(dns.lookups.load(Ordering::SeqCst), 1, "the host was resolved more than once");
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].host, format!("rebind.test:{port}"), "the Host header is the URL's");

    // The next attempt resolves afresh and meets the rebound answer: refused, nothing sent.
    let second = sender.deliver(&request).await;
    assert_eq!((second.outcome, second.failure), (Outcome::GiveUp, Some(Failure::AddressRefused)));
    assert_eq!(receiver.received().len(), 1);
}
