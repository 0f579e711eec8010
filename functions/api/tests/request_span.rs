//! One span per request carries what is known about it: every log line of a submit, the
//! "answered" line included, names the tenant and the job it made.

use kiln_api::{Api, Function};
use kiln_app::{ApiKey, Tenant, memory::MemoryPorts, ports::TenantDirectory};
use kiln_domain::{ModelSpec, TenantId};
use std::{
    io::Write,
    sync::{Arc, Mutex},
};

/// Log lines written by the subscriber under test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_answered_line_of_a_submit_carries_the_tenant_and_the_job() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let models =
        ModelSpec::read_packages(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models"))
            .unwrap();
    let memory = MemoryPorts::with_models(models.into_iter().map(|(_, model)| model).collect());
    let tenant = Tenant::new(TenantId::parse("acme").unwrap(), "Acme");
    let key = ApiKey::generate();
    memory.tenants.create_tenant(&tenant).await.unwrap();
    assert!(memory.tenants.add_key(&tenant.id, &key.stored(chrono::Utc::now())).await.unwrap());
    let resources = kiln_aws::Resources::placeholder();
    let api = Api::new(&memory.ports(), &kiln_lambda::FunctionConfig::for_resources(resources));

    let request = http::Request::builder()
        .method("POST")
        .uri("/v1/jobs")
        .header("authorization", format!("Bearer {}", key.expose()))
        .header("content-type", "application/json")
        .body(lambda_http::Body::Text(r#"{"model":"kiln-demo","prompt":"a fox"}"#.into()))
        .unwrap();
    let response = api.handle(Function::SubmitJob, request).await;
    assert_eq!(response.status(), 202);
    let job_id = memory.queue.sent()[0].job_id.to_string();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let answered = logs
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|line| line["fields"]["message"] == "answered")
        .unwrap_or_else(|| panic!("no answered line in:\n{logs}"));
    let span = &answered["span"];
    assert_eq!(span["name"], "request", "{answered}");
    assert_eq!(
        (span["tenant_id"].as_str(), span["job_id"].as_str()),
        (Some("acme"), Some(job_id.as_str())),
        "{answered}"
    );
    assert_eq!(span["status"], 202, "{answered}");
}
