//! The API against its own OpenAPI document, by schemathesis (PyPI, in the project's `.venv`)
//! over real HTTP to the local stack, as two tenants: every response's status, content type,
//! headers and body as documented, no 5xx, bad input refused, and tenant B never given what
//! only tenant A may read (schemathesis's `object_level_authorization` check replays A's reads
//! as B). The suite runs a small budget per operation; `KILN_SCHEMATHESIS_EXAMPLES=500 cargo
//! test -p kiln-tests --test openapi -- --nocapture` is the long run (RELIABILITY.md).

use kiln_local::{ensure_tools, workspace_root};
use kiln_tests::{Client, stack};
use serde_json::{Value, json};
use std::process::Command;

/// Examples per operation and phase in the suite's run.
const SUITE_EXAMPLES: u32 = 12;

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_as_its_document_says_for_two_tenants() {
    let stack = stack().await;
    let a = Client::tenant(&stack, "schema-a").await;
    let b = Client::tenant(&stack, "schema-b").await;
    // Each tenant has a job, so the job routes have real ids to find (and to try as the other).
    let mut ids = Vec::new();
    for (client, prompt) in [(&a, "tenant a's lighthouse"), (&b, "tenant b's harbour")] {
        let submitted = client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": prompt, "seed": 1})).await;
        assert_eq!(submitted.status, 202, "{}", submitted.body);
        ids.push(submitted.job_id());
    }
    let served: Value = reqwest::get(format!("{}/v1/openapi.json", stack.api_url)).await.unwrap().json().await.unwrap();
    assert_eq!(served["openapi"], "3.1.0");

    let out = workspace_root().join("target/schemathesis");
    std::fs::create_dir_all(&out).unwrap();
    let auth = out.join("tenants.json");
    let identity = |name: &str, client: &Client| json!({"name": name, "fixedHeaders": [{"name": "Authorization", "value": format!("Bearer {}", client.key.as_deref().unwrap())}]});
    let document = json!({"schemaVersion": "1.0", "auth": [identity("tenant-a", &a), identity("tenant-b", &b)]});
    std::fs::write(&auth, document.to_string()).unwrap();

    let examples: u32 =
        std::env::var("KILN_SCHEMATHESIS_EXAMPLES").ok().and_then(|n| n.parse().ok()).unwrap_or(SUITE_EXAMPLES);
    let tools = ensure_tools(&workspace_root()).unwrap();
    let schemathesis = tools.python.with_file_name("schemathesis");
    let report = out.join("report.xml");
    let started = std::time::Instant::now();
    let run = Command::new(&schemathesis)
        .args(["run", &format!("{}/v1/openapi.json", stack.api_url), "--checks", "all"])
        // Schema-valid is not model-valid: a width the model does not allow is a documented 422.
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--auth-wfc"])
        .arg(&auth)
        .args(["--max-examples", &examples.to_string(), "--seed", "7", "--workers", "2"])
        .args(["--phases", "examples,coverage,fuzzing,stateful", "--no-color", "--report", "junit"])
        .arg("--report-junit-path")
        .arg(&report)
        .args(["--suppress-health-check", "too_slow,filter_too_much", "--request-timeout", "20"])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its own cache (`.schemathesis/`) goes to target/, not into the tree.
        .current_dir(&out)
        .output()
        .expect("running schemathesis (installed into .venv by ensure_tools)");
    let printed = String::from_utf8_lossy(&run.stdout);
    println!("{printed}\n{}", String::from_utf8_lossy(&run.stderr));
    println!("schemathesis: {examples} examples per operation in {:.0?}", started.elapsed());
    assert!(
        run.status.success(),
        "schemathesis found answers that differ from the document (above; {})",
        report.display()
    );

    // Whatever schemathesis did as either tenant, neither can see the other's jobs: by id, and
    // in their lists (kept short: no tenant has more than a page of jobs here).
    for (client, other) in [(&b, &ids[0]), (&a, &ids[1])] {
        assert_eq!(client.get(&format!("/v1/jobs/{other}")).await.status, 404);
        assert_eq!(client.post(&format!("/v1/jobs/{other}/cancel")).await.status, 404);
    }
    let prompts = |page: &Value| -> Vec<String> {
        page["jobs"].as_array().unwrap().iter().map(|job| job["input"]["prompt"].as_str().unwrap().to_owned()).collect()
    };
    let seen_by_b = prompts(&b.get("/v1/jobs?limit=100").await.body);
    assert!(!seen_by_b.iter().any(|p| p == "tenant a's lighthouse"), "{seen_by_b:?}");
    let seen_by_a = prompts(&a.get("/v1/jobs?limit=100").await.body);
    assert!(!seen_by_a.iter().any(|p| p == "tenant b's harbour"), "{seen_by_a:?}");
}
