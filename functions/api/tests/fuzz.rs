//! Property tests over everything a client sends the API: random methods, paths (real routes
//! with random, foreign and well-formed ids), query strings, `Authorization` and
//! `Idempotency-Key` headers, and bodies (random bytes, and job specs with random fields and
//! values), through `Api::handle` on the in-memory ports, for every function.
//!
//! Held for every request: no panic, no 5xx, an error body in the API's shape, and tenant B's
//! answers never mention tenant A's job. The case count is proptest's: CI runs the default
//! below; `PROPTEST_CASES=1000000 cargo test --release -p kiln-api --test fuzz` is the long run
//! (RELIABILITY.md).

use kiln_api::{Api, Function};
use kiln_app::{ApiKey, Tenant, memory::MemoryPorts, ports::TenantDirectory};
use kiln_domain::{ModelSpec, TenantId};
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{Value, json};

/// Tenant A's job's prompt: in any answer to tenant B, a leak.
const A_PROMPT: &str = "tenant a's secret lighthouse";

struct World {
    api: Api,
    b_key: String,
    a_job: String,
    runtime: tokio::runtime::Runtime,
}

fn world() -> World {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let models =
        ModelSpec::read_packages(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models"))
            .unwrap();
    let memory = MemoryPorts::with_models(models.into_iter().map(|(_, model)| model).collect());
    let resources = kiln_aws::Resources::placeholder();
    let mut config = kiln_lambda::FunctionConfig::for_resources(resources);
    // Enough room that the fuzzer's own submissions are not refused for quota.
    (config.default_max_active_jobs, config.default_jobs_per_minute) = (1_000_000, 1_000_000);
    let api = Api::new(&memory.ports(), &config);
    let (a_key, b_key) = (ApiKey::generate(), ApiKey::generate());
    let a_job = runtime.block_on(async {
        for (id, key) in [("tenant-a", &a_key), ("tenant-b", &b_key)] {
            let tenant = Tenant::new(TenantId::parse(id).unwrap(), id);
            memory.tenants.create_tenant(&tenant).await.unwrap();
            assert!(memory.tenants.add_key(&tenant.id, &key.stored(chrono::Utc::now())).await.unwrap());
        }
        let request = http::Request::builder()
            .method("POST")
            .uri("/v1/jobs")
            .header("authorization", format!("Bearer {}", a_key.expose()))
            .header("content-type", "application/json")
            .body(lambda_http::Body::Text(json!({"model": "kiln-demo", "prompt": A_PROMPT}).to_string().into()))
            .unwrap();
        let response = api.handle(Function::All, request).await;
        assert_eq!(response.status(), 202);
        body_json(response.body())["id"].as_str().unwrap().to_owned()
    });
    World { api, b_key: b_key.expose().to_owned(), a_job, runtime }
}

fn body_json(body: &lambda_http::Body) -> Value {
    serde_json::from_slice(body.as_ref()).unwrap_or(Value::Null)
}

fn body_text(body: &lambda_http::Body) -> String {
    String::from_utf8_lossy(body.as_ref()).into_owned()
}

/// A JSON value of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![Just(0u32), Just(1), Just(64), Just(512), Just(1024), Just(100_000)].prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("kiln-demo"),
            Just("kiln-demo@1.0.0"),
            Just("kiln-tiny-sd"),
            Just("png"),
            Just("gif"),
            Just("https://hooks.example.com/x"),
            Just("http://127.0.0.1/x"),
            Just("http://169.254.169.254/latest"),
            Just("completed"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A job spec: real fields (and some unknown ones) with random values.
fn any_spec() -> impl Strategy<Value = Value> {
    let fields = [
        "model",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "num_frames",
        "fps",
        "steps",
        "guidance",
        "seed",
        "format",
        "webhook",
        "priority",
        "name",
        "size",
        "bogus",
    ];
    prop::collection::vec((prop::sample::select(fields.to_vec()), any_json()), 0..8).prop_map(|pairs| {
        let mut spec = json!({"model": "kiln-demo", "prompt": "fuzz"});
        for (field, value) in pairs {
            spec[field] = value;
        }
        spec
    })
}

#[derive(Debug, Clone)]
struct Case {
    function: Function,
    method: &'static str,
    path: String,
    query: String,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

/// The API's routes: (method, path with `{id}`, the function serving it).
const ROUTES: [(&str, &str, Function); 9] = [
    ("POST", "/v1/jobs", Function::SubmitJob),
    ("GET", "/v1/jobs/{id}", Function::GetJob),
    ("GET", "/v1/jobs", Function::ListJobs),
    ("POST", "/v1/jobs/{id}/cancel", Function::CancelJob),
    ("GET", "/v1/models", Function::ListModels),
    ("GET", "/v1/usage", Function::GetUsage),
    ("GET", "/v1/webhooks/secret", Function::WebhookSecret),
    ("POST", "/v1/webhooks/secret/rotate", Function::WebhookSecret),
    ("POST", "/v1/uploads", Function::CreateUpload),
];

fn any_case(b_key: String, a_job: String) -> impl Strategy<Value = Case> {
    let id = prop_oneof![Just(a_job.clone()), Just("01KAQ3Z8X9K2M3N4P5Q6R7S8T9".to_owned()), "[0-9A-Za-z%._-]{0,30}"];
    // Mostly a real route served by its own function (or the local server's `All`); sometimes
    // any method, any function, any path.
    let routed = (prop::sample::select(ROUTES.to_vec()), id.clone(), any::<bool>()).prop_map(
        |((method, path, function), id, all)| {
            (method, path.replace("{id}", &id), if all { Function::All } else { function })
        },
    );
    let functions: Vec<Function> = ROUTES.iter().map(|route| route.2).chain([Function::All]).collect();
    let anything = (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
        prop_oneof![
            prop::sample::select(ROUTES.iter().map(|route| route.1).collect::<Vec<_>>()).prop_map(str::to_owned),
            "/[a-z0-9%/._-]{0,30}",
            "/v1/[a-z0-9%/._-]{0,30}",
        ],
        prop::sample::select(functions),
    )
        .prop_map(|(method, path, function)| (method, path, function));
    let target = prop_oneof![4 => routed, 1 => anything];
    let query = prop_oneof![
        Just(String::new()),
        "[a-z_=&%0-9A-Z-]{0,40}",
        (
            prop::sample::select(vec!["queued", "running", "succeeded", "failed", "x", ""]),
            "[0-9-]{0,6}",
            prop_oneof![Just(a_job.clone()), "[0-9A-Z]{0,27}"]
        )
            .prop_map(|(status, limit, cursor)| format!("status={status}&limit={limit}&cursor={cursor}")),
    ];
    let authorization = prop_oneof![
        6 => Just(Some(format!("Bearer {b_key}"))),
        1 => Just(None),
        1 => ".{0,60}".prop_map(Some),
    ];
    let body = prop_oneof![
        4 => any_spec().prop_map(|spec| spec.to_string().into_bytes()),
        // Weighted so that the uploads route (one of nine) still reaches its 201 in every run.
        3 => (prop_oneof!["[a-z0-9._-]{1,12}", ".{0,20}"], prop_oneof![0u64..100_000, any::<u64>()])
            .prop_map(|(name, size)| json!({"name": name, "size": size}).to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => Just(Vec::new()),
    ];
    let content_type = prop_oneof![
        4 => Just(Some("application/json")),
        1 => prop::option::of(prop::sample::select(vec!["text/plain", "application/json; charset=utf-8"])),
    ];
    (target, query, authorization, prop::option::of(".{0,300}"), content_type, body).prop_map(
        |((method, path, function), query, authorization, idempotency_key, content_type, body)| Case {
            function,
            method,
            path,
            query,
            authorization,
            idempotency_key,
            content_type,
            body,
        },
    )
}

fn request(case: &Case) -> Option<lambda_http::Request> {
    let uri = if case.query.is_empty() { case.path.clone() } else { format!("{}?{}", case.path, case.query) };
    let mut builder = http::Request::builder().method(case.method).uri(uri.parse::<http::Uri>().ok()?);
    for (name, value) in [
        ("authorization", case.authorization.as_deref()),
        ("idempotency-key", case.idempotency_key.as_deref()),
        ("content-type", case.content_type),
    ] {
        if let Some(value) = value.and_then(|v| http::HeaderValue::from_str(v).ok()) {
            builder = builder.header(name, value);
        }
    }
    builder.body(lambda_http::Body::Binary(case.body.clone())).ok()
}

/// Cases against one world before a fresh one: the in-memory store lists by scanning, so a
/// world that kept every job a million cases made would measure the fake, not the API.
const CASES_PER_WORLD: u32 = 10_000;

#[test]
fn no_request_crashes_the_api_gets_a_5xx_or_sees_another_tenants_job() {
    let total = ProptestConfig::default().cases.max(2_000);
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    let mut done = 0;
    while done < total {
        let cases = (total - done).min(CASES_PER_WORLD);
        run_cases(cases, &seen);
        done += cases;
    }
    // The cases reach every kind of answer, not only the first refusal.
    let seen = seen.into_inner();
    eprintln!("{done} cases; statuses: {seen:?}");
    for status in [200, 201, 202, 400, 401, 404, 405, 422] {
        assert!(seen.contains_key(&status), "no {status} among {seen:?}: the cases do not reach it");
    }
}

fn run_cases(cases: u32, seen: &std::cell::RefCell<std::collections::BTreeMap<u16, usize>>) {
    let world = world();
    let mut runner = TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    let strategy = any_case(world.b_key.clone(), world.a_job.clone());
    let result = runner.run(&strategy, |case| {
        let Some(request) = request(&case) else { return Ok(()) };
        let response = world.runtime.block_on(world.api.handle(case.function, request));
        let status = response.status().as_u16();
        *seen.borrow_mut().entry(status).or_default() += 1;
        let text = body_text(response.body());
        prop_assert!(status < 500, "{status} for {case:?}: {text}");
        // The id may come back as the caller's own words (a 404 naming the path); the job may not.
        prop_assert!(!text.contains(A_PROMPT), "tenant B saw tenant A's job: {case:?}: {text}");
        if status >= 400 {
            let error = &body_json(response.body())["error"];
            prop_assert!(
                error["code"].is_string() && error["message"].is_string(),
                "{status} without an error body: {text}"
            );
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
