//! The `kiln` binary against the local stack (moto, the API over HTTP, a runner): what a user
//! types, what it prints, the files it writes, its exit codes, and Ctrl-C canceling the job.

use kiln_local::LocalStack;
use kiln_tests::{Client, runner_options, stack, start_runner};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

struct Tenant {
    api: String,
    key: String,
}

async fn tenant(stack: &LocalStack, id: &str) -> Tenant {
    let key = stack.create_tenant(id, id).await.expect("tenant");
    Tenant { api: stack.api_url.clone(), key: key.expose().to_owned() }
}

fn kiln(tenant: &Tenant) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["--api", &tenant.api, "--key", &tenant.key])
        .env_remove("KILN_API")
        .env_remove("KILN_KEY")
        .env("KILN_CONFIG", "/nonexistent/kiln-config")
        .stdin(Stdio::null());
    command
}

/// Runs `kiln <args>` off the test's runtime; its output.
async fn run(tenant: &Tenant, args: &[&str]) -> Output {
    let mut command = kiln(tenant);
    command.args(args);
    tokio::task::spawn_blocking(move || command.output().expect("kiln runs")).await.unwrap()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    })
}

fn scratch(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let info = decoder.read_info().unwrap();
    (info.info().width, info.info().height)
}

#[tokio::test(flavor = "multi_thread")]
async fn run_follows_a_job_to_its_downloaded_output_and_the_other_commands_see_it() {
    let stack = stack().await;
    let _runner = start_runner(&stack, &runner_options("cli"));
    let acme = tenant(&stack, "acme").await;

    let models = run(&acme, &["--json", "models"]).await;
    assert!(models.status.success(), "{models:?}");
    let names: Vec<String> =
        json_of(&models)["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect();
    assert!(names.contains(&"kiln-demo".to_owned()), "{names:?}");

    // A human run: the file's path on stdout, the file there.
    let out = scratch("run");
    let args = ["run", "a lighthouse", "--model", "kiln-demo", "--size", "128x96", "--seed", "3", "--steps", "2"];
    let human = run(&acme, &[&args[..], &["--out", out.to_str().unwrap()]].concat()).await;
    assert!(human.status.success(), "{}", String::from_utf8_lossy(&human.stderr));
    let printed = String::from_utf8_lossy(&human.stdout);
    let path = PathBuf::from(printed.lines().next().expect("a path"));
    assert!(path.starts_with(&out), "{printed}");
    assert_eq!(png_size(&path), (128, 96));

    // The same with --json: the job, succeeded, with the downloaded files (cached the second time).
    let scripted = run(&acme, &[&["--json"], &args[..], &["--out", out.to_str().unwrap()]].concat()).await;
    assert!(scripted.status.success(), "{scripted:?}");
    let job = json_of(&scripted);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["downloaded"].as_array().unwrap().len(), 1, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();

    let got = json_of(&run(&acme, &["--json", "get", &id]).await);
    assert_eq!(got["id"], id.as_str());
    let listed = json_of(&run(&acme, &["--json", "jobs", "--status", "succeeded"]).await);
    assert!(listed["jobs"].as_array().unwrap().iter().any(|j| j["id"] == id.as_str()), "{listed}");
    let waited = run(&acme, &["wait", &id, "--no-download"]).await;
    assert!(waited.status.success(), "{waited:?}");

    // Another tenant cannot see it: the API's 404, exit code 3.
    let globex = tenant(&stack, "globex").await;
    let theirs = run(&globex, &["get", &id]).await;
    assert_eq!(theirs.status.code(), Some(3), "{theirs:?}");
    assert!(String::from_utf8_lossy(&theirs.stderr).contains("404"), "{theirs:?}");

    // The inbox: a spec file uploaded, its outbox printed.
    let spec = scratch("spec.json");
    std::fs::write(&spec, r#"{"model":"kiln-demo","prompt":"from the cli's upload","steps":1}"#).unwrap();
    let uploaded = json_of(&run(&acme, &["--json", "upload", spec.to_str().unwrap(), "--name", "cli-1"]).await);
    assert!(uploaded["key"].as_str().unwrap().starts_with("inbox/acme/cli-1/"), "{uploaded}");

    let secret = run(&acme, &["webhook-secret"]).await;
    assert!(String::from_utf8_lossy(&secret.stdout).starts_with("whsec_"), "{secret:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_field_and_exit_with_codes_scripts_can_use() {
    let stack = stack().await;
    let acme = tenant(&stack, "acme").await;
    let wide = run(&acme, &["--json", "run", "x", "--model", "kiln-demo", "--size", "100000x64"]).await;
    assert_eq!(wide.status.code(), Some(3), "{wide:?}");
    let error = json_of(&wide);
    assert_eq!(
        (error["error"]["status"].as_u64(), error["error"]["field"].as_str()),
        (Some(422), Some("width")),
        "{error}"
    );
    let bad_key = Tenant { api: acme.api.clone(), key: "kiln_not_a_key".into() };
    let refused = run(&bad_key, &["models"]).await;
    assert_eq!(refused.status.code(), Some(3), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"), "{refused:?}");
    let size = run(&acme, &["run", "x", "--model", "kiln-demo", "--size", "big"]).await;
    assert_eq!(size.status.code(), Some(2), "{size:?}");
    let nowhere = Tenant { api: "http://127.0.0.1:9".into(), key: "k".into() };
    let down = run(&nowhere, &["models"]).await;
    assert_eq!(down.status.code(), Some(4), "{down:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_the_running_job() {
    let stack = stack().await;
    let _runner = start_runner(&stack, &runner_options("cli-interrupt"));
    let acme = tenant(&stack, "acme").await;
    let client = Client::new(&acme.api, Some(&acme.key));
    let mut command = kiln(&acme);
    command
        .args([
            "--json",
            "run",
            "a slow one",
            "--model",
            "kiln-demo",
            "--size",
            "768x768",
            "--steps",
            "50",
            "--seed",
            "9",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("kiln runs");
    // Wait for the job to be running, then interrupt kiln as a terminal's Ctrl-C would.
    let started = Instant::now();
    let id = loop {
        let listed = client.get("/v1/jobs?status=running").await;
        if let Some(job) = listed.body["jobs"].as_array().and_then(|jobs| jobs.first()) {
            break job["id"].as_str().unwrap().to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the job never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("canceled job {id}")), "{output:?}");
    let job = client.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "canceled", "{job}");
}
