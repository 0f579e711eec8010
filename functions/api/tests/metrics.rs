//! Each answered request prints its metrics as CloudWatch EMF lines: requests and latency by
//! function, a submit's disposition (created, cache hit, deduplicated), errors by code, 429s by
//! the limit that refused.

use kiln_api::{Api, Function, metrics::MetricsSink};
use kiln_app::{ApiKey, Tenant, TenantLimits, memory::MemoryPorts, ports::TenantDirectory};
use kiln_domain::{ModelSpec, TenantId};
use serde_json::Value;
use std::sync::{Arc, Mutex};

fn submit(key: &ApiKey, body: &str) -> http::Request<lambda_http::Body> {
    http::Request::builder()
        .method("POST")
        .uri("/v1/jobs")
        .header("authorization", format!("Bearer {}", key.expose()))
        .header("content-type", "application/json")
        .body(lambda_http::Body::Text(body.into()))
        .unwrap()
}

#[tokio::test]
async fn requests_print_their_metrics_as_emf_lines() {
    let models =
        ModelSpec::read_packages(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models"))
            .unwrap();
    let memory = MemoryPorts::with_models(models.into_iter().map(|(_, model)| model).collect());
    let mut tenant = Tenant::new(TenantId::parse("acme").unwrap(), "Acme");
    tenant.limits = Some(TenantLimits { max_active_jobs: 1, ..TenantLimits::default() });
    let key = ApiKey::generate();
    memory.tenants.create_tenant(&tenant).await.unwrap();
    assert!(memory.tenants.add_key(&tenant.id, &key.stored(chrono::Utc::now())).await.unwrap());
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let collected = lines.clone();
    let sink: MetricsSink = Arc::new(move |line| collected.lock().unwrap().push(line));
    let config = kiln_lambda::FunctionConfig::for_resources(kiln_aws::Resources::placeholder());
    let api = Api::new(&memory.ports(), &config).with_metrics(sink);

    let fox = r#"{"model":"kiln-demo","prompt":"a fox","seed":1}"#;
    assert_eq!(api.handle(Function::SubmitJob, submit(&key, fox)).await.status(), 202);
    assert_eq!(api.handle(Function::SubmitJob, submit(&key, fox)).await.status(), 202, "deduplicated");
    let wide = r#"{"model":"kiln-demo","prompt":"x","width":100000}"#;
    assert_eq!(api.handle(Function::SubmitJob, submit(&key, wide)).await.status(), 422);
    let other = r#"{"model":"kiln-demo","prompt":"another","seed":2}"#;
    assert_eq!(api.handle(Function::SubmitJob, submit(&key, other)).await.status(), 429, "one active job at most");

    let lines: Vec<Value> = lines.lock().unwrap().iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by_function: Vec<&Value> = lines.iter().filter(|l| l.get("Requests").is_some()).collect();
    assert_eq!(by_function.len(), 4, "one line per request: {lines:?}");
    let directive = &by_function[0]["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "kiln/api");
    assert_eq!(directive["Dimensions"], serde_json::json!([["Function"]]));
    assert!(
        directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["Name"] == "LatencyMs" && m["Unit"] == "Milliseconds")
    );
    let flags = |line: &Value| {
        ["Created", "Deduplicated", "CacheHits", "ClientErrors"].map(|name| line[name].as_f64().unwrap_or(-1.0))
    };
    assert_eq!(by_function[0]["Function"], "submit-job");
    assert_eq!(flags(by_function[0]), [1.0, 0.0, 0.0, 0.0], "created: {}", by_function[0]);
    assert_eq!(flags(by_function[1]), [0.0, 1.0, 0.0, 0.0], "deduplicated: {}", by_function[1]);
    assert_eq!(flags(by_function[2])[3], 1.0, "a client error: {}", by_function[2]);
    let errors: Vec<&str> =
        lines.iter().filter(|l| l.get("Errors").is_some()).map(|l| l["Code"].as_str().unwrap()).collect();
    assert_eq!(errors, ["invalid_value", "quota_exceeded"]);
    let throttled: Vec<&str> =
        lines.iter().filter(|l| l.get("Throttled").is_some()).map(|l| l["Limit"].as_str().unwrap()).collect();
    assert_eq!(throttled, ["max_active_jobs"]);
}
