//! The machinery of `tests/terraform.rs`: reading functions.json and stack.json, the venv
//! with checkov (and its HCL parser), the recording proxy in front of moto, a Lambda runtime
//! API that runs a function binary as Lambda does, and the judgement of calls against grants.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use kiln_local::{LocalStack, Tools, runner_binary, workspace_root};
use kiln_tests::http::{respond, serve};
use serde_json::{Map, Value, json};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::oneshot;

/// The API key and job id the events/ fixtures carry.
pub const FIXTURE_KEY: &str = "kiln_fixture00000000000000000000000000000000000";
pub const FIXTURE_JOB: &str = "01KAQ3Z8X9K2M3N4P5Q6R7S8T9";
/// The webhook URL of the fixtures' jobs.
pub const FIXTURE_WEBHOOK: &str = "https://hooks.example.com/kiln";
/// What the venv holds: checkov, which brings its HCL parser (bc-python-hcl2, module `hcl2`).
const CHECKOV_REQUIREMENT: &str = "checkov==3.3.30";

pub fn root() -> PathBuf {
    workspace_root()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

// --- the two descriptions -----------------------------------------------------------------

/// terraform/functions.json beside terraform/stack.json.
pub struct Deploy {
    pub json: Value,
    pub stack: Value,
}

impl Deploy {
    pub fn load() -> Self {
        Self {
            json: read_json(&root().join("terraform/functions.json")),
            stack: read_json(&root().join("terraform/stack.json")),
        }
    }

    pub fn functions(&self) -> &Map<String, Value> {
        self.json["functions"].as_object().expect("functions.json has functions")
    }

    /// Every function, and the runner (as `runner`).
    pub fn units(&self) -> Vec<(String, Value)> {
        let mut units: Vec<_> = self.functions().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        units.push(("runner".into(), self.json["runner"].clone()));
        units
    }

    pub fn unit(&self, name: &str) -> &Value {
        if name == "runner" { &self.json["runner"] } else { &self.functions()[name] }
    }

    /// The environment terraform gives a function or the runner: common_env, then its own.
    pub fn env_of(&self, name: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for source in [&self.json["common_env"], &self.unit(name)["env"]] {
            for (key, value) in source.as_object().into_iter().flatten() {
                env.insert(
                    key.clone(),
                    value.as_str().unwrap_or_else(|| panic!("{name}: {key} is not a string")).into(),
                );
            }
        }
        env
    }

    /// The events/ fixtures a function is run with.
    pub fn events(&self, name: &str) -> Vec<String> {
        self.functions()[name]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|file| std::fs::read_to_string(root().join("events").join(file.as_str().unwrap())).unwrap())
            .collect()
    }

    fn has(&self, kind: &str, name: &str) -> bool {
        self.stack[kind].get(name).is_some()
    }

    fn has_queue(&self, name: &str) -> bool {
        self.has("queues", name.strip_suffix("-dlq").unwrap_or(name))
    }

    /// An env value: `@table:x`, `@queue_url:x` or `@bucket:x` must name what stack.json has.
    pub fn check_ref(&self, value: &str) -> Result<(), String> {
        let Some(reference) = value.strip_prefix('@') else { return Ok(()) };
        let (kind, name) = reference.split_once(':').ok_or(format!("{value}: not @kind:name"))?;
        let found = match kind {
            "table" => self.has("tables", name),
            "queue_url" => self.has_queue(name),
            "bucket" => self.has("buckets", name),
            _ => return Err(format!("{value}: main.tf resolves @table, @queue_url and @bucket, not @{kind}")),
        };
        if found { Ok(()) } else { Err(format!("{value}: stack.json has no such {kind}")) }
    }

    /// A function's trigger: a kind functions.tf wires, on resources stack.json has.
    pub fn check_trigger(&self, name: &str, trigger: &Value) -> Vec<String> {
        let text = |key: &str| trigger[key].as_str().unwrap_or_default();
        let mut problems = Vec::new();
        match text("type") {
            "http" => {
                let routes = trigger["routes"].as_array().map(Vec::as_slice).unwrap_or_default();
                if routes.is_empty() {
                    problems.push("an http trigger without routes".into());
                }
                for route in routes {
                    let route = route.as_str().unwrap_or_default();
                    let ok = route.split_once(' ').is_some_and(|(method, path)| {
                        ["GET", "POST", "PUT", "PATCH", "DELETE", "ANY"].contains(&method) && path.starts_with('/')
                    });
                    if !ok {
                        problems.push(format!("route `{route}` is not `METHOD /path`"));
                    }
                }
                for public in trigger["public"].as_array().into_iter().flatten() {
                    if !routes.contains(public) {
                        problems.push(format!("public route {public} is not among its routes"));
                    }
                }
            }
            "schedule" if text("expression").starts_with("rate(") || text("expression").starts_with("cron(") => {}
            "schedule" => problems.push("a schedule needs a rate() or cron() expression".into()),
            "sqs" if self.has_queue(text("queue")) => {}
            "sqs" => problems.push(format!("queue `{}` is not in stack.json", text("queue"))),
            "dynamodb_stream" if self.stack["tables"][text("table")]["stream"].is_string() => {}
            "dynamodb_stream" => {
                problems.push(format!("table `{}` has no stream in stack.json (the local stack's)", text("table")))
            }
            "s3" if self.has("buckets", text("bucket")) && !text("prefix").is_empty() => {}
            "s3" => problems.push("an s3 trigger needs a stack.json bucket and a prefix".into()),
            other => problems.push(format!("functions.tf wires no trigger of type `{other}` (for {name})")),
        }
        if let Some(queue) = trigger.get("on_failure") {
            let queue = queue.as_str().unwrap_or_default();
            if !["dynamodb_stream", "s3"].contains(&text("type")) {
                problems.push(format!("functions.tf sends only stream and s3 failures to a queue (for {name})"));
            }
            if !self.has_queue(queue) {
                problems.push(format!("on_failure queue `{queue}` is not in stack.json"));
            }
        }
        problems
    }
}

/// The Lambda binaries: bins of workspace packages that depend on lambda_runtime or lambda_http.
pub fn lambda_binaries() -> BTreeSet<String> {
    let output = kiln_local::cargo_command()
        .current_dir(root())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .expect("cargo metadata");
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut binaries = BTreeSet::new();
    for package in metadata["packages"].as_array().unwrap() {
        let lambda = package["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| matches!(d["name"].as_str(), Some("lambda_runtime" | "lambda_http")) && d["kind"].is_null());
        if !lambda {
            continue;
        }
        for target in package["targets"].as_array().unwrap() {
            if target["kind"].as_array().unwrap().iter().any(|k| k == "bin") {
                binaries.insert(target["name"].as_str().unwrap().to_owned());
            }
        }
    }
    binaries
}

/// Every `env = "NAME"` of a clap argument in the functions' and the runner's sources.
pub fn env_names_in_sources() -> BTreeSet<String> {
    fn walk(dir: &Path, names: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for piece in text.split("env = \"").skip(1) {
                    if let Some(name) = piece.split('"').next() {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    walk(&root().join("functions"), &mut names);
    walk(&root().join("gpu-runner/src"), &mut names);
    names
}

/// The variables `kiln-runner --help` lists.
pub fn runner_env_names() -> BTreeSet<String> {
    let binary = runner_binary(&root()).expect("the runner binary");
    let help = Command::new(&binary).arg("--help").output().expect("kiln-runner --help");
    String::from_utf8_lossy(&help.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|piece| piece.split(['=', ']']).next().map(str::to_owned))
        .collect()
}

/// Builds the function binaries (debug) with the target selection of the test command, so
/// the dependencies it built are reused.
pub fn build_lambda_binaries<'a>(names: impl Iterator<Item = &'a String>) -> BTreeMap<String, PathBuf> {
    let names: Vec<&String> = names.collect();
    let mut command = kiln_local::cargo_command();
    command.current_dir(root()).args(["build", "--workspace", "--lib", "--tests"]);
    for name in &names {
        command.args(["--bin", name]);
    }
    assert!(command.status().expect("cargo build").success(), "building the function binaries failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    names.into_iter().map(|name| (name.clone(), target.join("debug").join(name))).collect()
}

/// A function's (or the runner's) environment with its references resolved against the
/// local stack: the names terraform would give, here.
pub async fn resolve_env(deploy: &Deploy, name: &str, prefix: &str, stack: &LocalStack) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (key, value) in deploy.env_of(name) {
        deploy.check_ref(&value).unwrap_or_else(|e| panic!("{name}: {key}: {e}"));
        let resolved = match value.strip_prefix('@').and_then(|r| r.split_once(':')) {
            Some(("queue_url", queue)) => {
                let queue = format!("{prefix}-{queue}");
                let answer = stack.clients.sqs().get_queue_url().queue_name(&queue).send().await;
                answer
                    .unwrap_or_else(|e| panic!("{name}: the local stack has no queue {queue}: {e:?}"))
                    .queue_url
                    .unwrap()
            }
            Some((_, resource)) => format!("{prefix}-{resource}"),
            None => value,
        };
        env.insert(key, resolved);
    }
    env
}

// --- checkov --------------------------------------------------------------------------------

/// The venv's Python, with checkov installed (once; `target/checkov-venv`).
pub fn checkov_python() -> PathBuf {
    let target = root().join("target");
    let venv = target.join("checkov-venv");
    let stamp = venv.join("kiln-requirements.txt");
    let installed = || std::fs::read_to_string(&stamp).is_ok_and(|t| t == CHECKOV_REQUIREMENT);
    if !installed() {
        std::fs::create_dir_all(&target).unwrap();
        let lock = File::create(target.join(".checkov-venv.lock")).unwrap();
        lock.lock().unwrap();
        if !installed() {
            eprintln!("installing {CHECKOV_REQUIREMENT} into {} (first run only)", venv.display());
            let created = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().expect("python3 -m venv");
            assert!(created.success(), "python3 -m venv {} failed", venv.display());
            let pip = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", CHECKOV_REQUIREMENT])
                .status()
                .expect("pip");
            assert!(pip.success(), "pip could not install {CHECKOV_REQUIREMENT}");
            std::fs::write(&stamp, CHECKOV_REQUIREMENT).unwrap();
        }
    }
    venv.join("bin/python")
}

/// Every .tf file parsed (checkov's HCL parser), merged: resource.<type>.<name>, locals, ...
pub fn parse_hcl(python: &Path) -> Value {
    const SCRIPT: &str = r#"
import hcl2, json, pathlib, sys
def flat(value):
    if isinstance(value, list) and len(value) == 1 and not isinstance(value[0], dict):
        return flat(value[0])
    if isinstance(value, dict):
        return {k: flat(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [flat(v) for v in value]
    return value
merged = {"resource": {}, "data": {}, "locals": {}, "variable": {}, "output": {}}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.tf")):
    try:
        with open(path) as f:
            doc = hcl2.load(f)
    except Exception as err:
        sys.exit(f"{path.name} does not parse: {err}")
    for kind in ("resource", "data"):
        for block in doc.get(kind, []):
            for type_, named in block.items():
                merged[kind].setdefault(type_, {}).update(flat(named))
    for block in doc.get("locals", []):
        merged["locals"].update(flat(block))
    for kind in ("variable", "output"):
        for block in doc.get(kind, []):
            merged[kind].update(flat(block))
print(json.dumps(merged))
"#;
    let output = Command::new(python).arg("-c").arg(SCRIPT).arg(root().join("terraform")).output().unwrap();
    assert!(output.status.success(), "the HCL: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `#checkov:skip=<check>:<reason>` comments in the .tf files: (check, reason).
pub fn checkov_skips() -> Vec<(String, String)> {
    let mut skips = Vec::new();
    for entry in std::fs::read_dir(root().join("terraform")).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "tf") {
            for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
                if let Some(skip) = line.split("checkov:skip=").nth(1) {
                    let (check, reason) = skip.split_once(':').unwrap_or((skip, ""));
                    skips.push((check.trim().to_owned(), reason.trim().to_owned()));
                }
            }
        }
    }
    skips
}

/// checkov over terraform/ (offline), its JSON report.
pub fn run_checkov(python: &Path) -> Value {
    checkov_report(python, "terraform", &["-d", ".", "--framework", "terraform"])
}

/// checkov over the gpu-runner image's Dockerfile, its JSON report.
pub fn run_checkov_dockerfile(python: &Path) -> Value {
    checkov_report(python, "gpu-runner", &["-f", "Dockerfile", "--framework", "dockerfile"])
}

fn checkov_report(python: &Path, dir: &str, target: &[&str]) -> Value {
    let checkov = python.with_file_name("checkov");
    let output = Command::new(checkov)
        .current_dir(root().join(dir))
        .args(target)
        .args(["--skip-download", "--compact", "-o", "json"])
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .expect("running checkov");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("checkov printed no report ({e}): {}", String::from_utf8_lossy(&output.stderr)));
    match report {
        Value::Array(mut reports) => reports.remove(0),
        report => report,
    }
}

// --- the recording proxy ----------------------------------------------------------------------

/// What a call touched, named by its stack.json key (the `<prefix>-` taken off).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Table(String),
    Index(String, String),
    Queue(String),
    Object(String),
    Bucket(String),
    /// What the recorder could not place (an unknown S3 request, another service).
    Unknown(String),
}

/// One AWS call: its IAM action and what it touched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub action: String,
    pub resource: Resource,
    /// A DynamoDB item call's partition key value (what `dynamodb:LeadingKeys` sees).
    pub leading_key: Option<String>,
    /// Made with a presigned URL the function handed out (signed with its role).
    pub presigned: bool,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = if self.presigned { " (presigned)" } else { "" };
        match &self.resource {
            Resource::Table(t) => write!(f, "{} {t}{via}", self.action),
            Resource::Index(t, i) => write!(f, "{} {t}/{i}{via}", self.action),
            Resource::Queue(q) => write!(f, "{} {q}{via}", self.action),
            Resource::Object(o) => write!(f, "{} {o}{via}", self.action),
            Resource::Bucket(b) => write!(f, "{} bucket {b}{via}", self.action),
            Resource::Unknown(what) => write!(f, "{} {what}{via}", self.action),
        }
    }
}

#[derive(Default)]
struct RecorderState {
    calls: Vec<Call>,
    /// Actions answered with AccessDenied instead of being sent on.
    failing: BTreeSet<String>,
}

/// A proxy in front of moto that records every call made through it.
pub struct Recorder {
    pub url: String,
    state: Arc<Mutex<RecorderState>>,
    http: reqwest::Client,
}

impl Recorder {
    pub async fn start(moto: &str, prefix: &str) -> Self {
        let state = Arc::new(Mutex::new(RecorderState::default()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let (moto, prefix, shared, client) = (moto.to_owned(), prefix.to_owned(), state.clone(), http.clone());
        let address = serve(move |request| {
            let (moto, prefix, state, http) = (moto.clone(), prefix.clone(), shared.clone(), client.clone());
            async move { forward(request, &moto, &prefix, &state, &http).await }
        })
        .await;
        Self { url: format!("http://{address}"), state, http }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Answers every later call of `action` with AccessDenied.
    pub fn fail_next(&self, action: &str) {
        self.state.lock().unwrap().failing.insert(action.to_owned());
    }

    /// Fetches every presigned URL of this proxy in a function's answer (with the method the
    /// answer gives beside it, GET otherwise), so what it signs is recorded as its calls.
    pub async fn fetch_presigned_links(&self, answer: &Value) {
        fn links(value: &Value, base: &str, found: &mut Vec<(String, String)>) {
            match value {
                Value::Object(map) => {
                    for (key, item) in map {
                        match item.as_str() {
                            Some(url) if url.starts_with(base) && url.contains("X-Amz-Signature") => {
                                let method = map.get("method").and_then(Value::as_str).unwrap_or("GET");
                                found.push((method.to_owned(), url.to_owned()));
                            }
                            _ if key != "url" => links(item, base, found),
                            _ => {}
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|item| links(item, base, found)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        links(&body_of(answer), &self.url, &mut found);
        for (method, url) in found {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let body = if method == reqwest::Method::GET { Vec::new() } else { b"{}".to_vec() };
            let response = self.http.request(method.clone(), &url).body(body).send().await.unwrap();
            assert!(response.status().is_success(), "{method} {url}: {}", response.status());
        }
    }
}

async fn forward(
    request: Request<Incoming>,
    moto: &str,
    prefix: &str,
    state: &Mutex<RecorderState>,
    http: &reqwest::Client,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let calls = classify(parts.method.as_str(), &path, &header, &body, prefix);
    let refused = {
        let mut state = state.lock().unwrap();
        let refused = calls.iter().any(|c| state.failing.contains(&c.action));
        state.calls.extend(calls);
        refused
    };
    if refused {
        let error = json!({"__type": "com.amazon.coral.service#AccessDeniedException", "message": "refused by tests/terraform.rs"});
        return respond(400, &[("content-type", "application/x-amz-json-1.0".into())], error.to_string());
    }
    let mut outgoing = http.request(parts.method.clone(), format!("{moto}{path}")).body(body.to_vec());
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection" | "transfer-encoding") {
            outgoing = outgoing.header(name, value);
        }
    }
    match outgoing.send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            let headers: Vec<(String, String)> = answer
                .headers()
                .iter()
                .filter(|(n, _)| !matches!(n.as_str(), "content-length" | "connection" | "transfer-encoding"))
                .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                .collect();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = Response::builder().status(status);
            for (name, value) in headers {
                response = response.header(name, value);
            }
            response.body(Full::new(bytes)).unwrap()
        }
        Err(err) => respond(502, &[], format!("moto: {err}")),
    }
}

/// The IAM actions and resources of one request (DynamoDB and SQS by their JSON protocols'
/// X-Amz-Target, S3 by method, path and query).
fn classify(method: &str, path: &str, header: &dyn Fn(&str) -> String, body: &[u8], prefix: &str) -> Vec<Call> {
    let local = |name: &str| name.strip_prefix(&format!("{prefix}-")).unwrap_or(name).to_owned();
    let call = |action: String, resource: Resource| Call { action, resource, leading_key: None, presigned: false };
    // The partition key of an item call: the one attribute of `Key`, or the item's `pk`, `id` or
    // `name` (the tables' partition keys).
    let leading_key = |spec: &Value| -> Option<String> {
        let key = spec["Key"].as_object().filter(|key| key.len() == 1).and_then(|key| key.values().next());
        let item = ["pk", "id", "name"].iter().find_map(|name| spec["Item"].get(*name));
        key.or(item).and_then(|value| value["S"].as_str()).map(str::to_owned)
    };
    let target = header("x-amz-target");
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(op) = target.strip_prefix("DynamoDB_20120810.") {
        let table = |v: &Value| local(v["TableName"].as_str().unwrap_or("?"));
        return match op {
            "TransactWriteItems" | "TransactGetItems" => json["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|item| item.as_object().into_iter().flatten())
                .map(|(kind, spec)| {
                    let action = match kind.as_str() {
                        "Put" => "PutItem",
                        "Update" => "UpdateItem",
                        "Delete" => "DeleteItem",
                        "ConditionCheck" => "ConditionCheckItem",
                        _ => "GetItem",
                    };
                    let mut call = call(format!("dynamodb:{action}"), Resource::Table(table(spec)));
                    call.leading_key = leading_key(spec);
                    call
                })
                .collect(),
            "BatchWriteItem" | "BatchGetItem" => json["RequestItems"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, _)| call(format!("dynamodb:{op}"), Resource::Table(local(name))))
                .collect(),
            _ => {
                let resource = match json["IndexName"].as_str() {
                    Some(index) => Resource::Index(table(&json), index.to_owned()),
                    None => Resource::Table(table(&json)),
                };
                let mut call = call(format!("dynamodb:{op}"), resource);
                call.leading_key = leading_key(&json);
                vec![call]
            }
        };
    }
    if let Some(op) = target.strip_prefix("AmazonSQS.") {
        let queue = json["QueueUrl"].as_str().map_or_else(
            || json["QueueName"].as_str().map(&local).unwrap_or_default(),
            |url| local(url.rsplit('/').next().unwrap_or_default()),
        );
        let action = op.strip_suffix("Batch").unwrap_or(op);
        return vec![call(format!("sqs:{action}"), Resource::Queue(queue))];
    }
    if !target.is_empty() {
        return vec![call(target.clone(), Resource::Unknown(target))];
    }
    // S3, path-style (the SDK addresses buckets by path on a custom endpoint).
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let has = |name: &str| query.split('&').any(|pair| pair.split('=').next() == Some(name));
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let bucket = local(segments.next().unwrap_or_default());
    let key = percent_decode(segments.next().unwrap_or_default());
    let object = Resource::Object(format!("{bucket}/{key}"));
    let action = match (method, key.is_empty()) {
        ("GET" | "HEAD", true) if has("list-type") || method == "HEAD" => {
            return vec![call("s3:ListBucket".into(), Resource::Bucket(bucket))];
        }
        ("GET", false) if has("uploadId") => "s3:ListMultipartUploadParts",
        ("GET" | "HEAD", false) => "s3:GetObject",
        ("PUT", false) if has("tagging") => "s3:PutObjectTagging",
        ("PUT" | "POST", false) => "s3:PutObject",
        ("DELETE", false) if has("uploadId") => "s3:AbortMultipartUpload",
        ("DELETE", false) => "s3:DeleteObject",
        _ => return vec![call(format!("s3:? {method} {path}?{query}"), Resource::Unknown(path.to_owned()))],
    };
    let mut calls =
        vec![Call { action: action.into(), resource: object, leading_key: None, presigned: has("X-Amz-Signature") }];
    let source = header("x-amz-copy-source");
    if !source.is_empty() {
        let source = percent_decode(source.trim_start_matches('/'));
        let (bucket, key) = source.split_once('/').unwrap_or((&source, ""));
        calls.push(call("s3:GetObject".into(), Resource::Object(format!("{}/{key}", local(bucket)))));
    }
    calls
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// --- a function binary under a Lambda runtime API ---------------------------------------------

type Outcome = Result<Value, String>;

struct Runtime {
    next: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(String, String)>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    /// When the function first asked for an event: its init phase ended.
    first_poll: Mutex<Option<Instant>>,
}

/// A function binary started as Lambda starts it, fed events through a runtime API.
pub struct LambdaProcess {
    name: String,
    child: Mutex<Child>,
    log: PathBuf,
    queue: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    runtime: Arc<Runtime>,
    ids: AtomicU64,
    spawned: Instant,
}

impl LambdaProcess {
    pub async fn start(name: &str, binary: &Path, env: &BTreeMap<String, String>, recorder: &Recorder) -> Self {
        let (queue, next) = tokio::sync::mpsc::unbounded_channel();
        let runtime = Arc::new(Runtime {
            next: tokio::sync::Mutex::new(next),
            waiting: Mutex::default(),
            first_poll: Mutex::default(),
        });
        let shared = runtime.clone();
        let arn = format!("arn:aws:lambda:us-east-1:000000000000:function:{name}");
        let address = serve(move |request| {
            let (runtime, arn) = (shared.clone(), arn.clone());
            async move { runtime_api(request, &runtime, &arn).await }
        })
        .await;
        let log = log_file(name);
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env)
            .env("KILN_AWS_ENDPOINT_URL", &recorder.url)
            .env("AWS_LAMBDA_RUNTIME_API", &address)
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap());
        let spawned = Instant::now();
        let child = command.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        Self { name: name.to_owned(), child: Mutex::new(child), log, queue, runtime, ids: AtomicU64::new(1), spawned }
    }

    /// The init phase: from starting the process to its first request for an event (as Lambda's
    /// `Init Duration`). Waits for it, at most 30 s.
    pub async fn init_time(&self) -> Result<Duration, String> {
        for _ in 0..30_000 {
            if let Some(polled) = *self.runtime.first_poll.lock().unwrap() {
                return Ok(polled - self.spawned);
            }
            if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                return Err(self.failure(&format!("the process exited ({status})")));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err(self.failure("no request for an event in 30 s"))
    }

    /// Sends one event and waits for the function's answer (or its error, or its exit).
    pub async fn invoke(&self, event: &str) -> Outcome {
        let id = format!("{}-{}", self.name, self.ids.fetch_add(1, Ordering::SeqCst));
        let (sender, mut receiver) = oneshot::channel();
        self.runtime.waiting.lock().unwrap().insert(id.clone(), sender);
        self.queue.send((id, event.to_owned())).unwrap();
        let started = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_millis(200), &mut receiver).await {
                Ok(outcome) => return outcome.unwrap_or_else(|_| Err("the runtime API dropped the call".into())),
                Err(_) if started.elapsed() > Duration::from_secs(60) => return Err(self.failure("no answer in 60 s")),
                Err(_) => {
                    if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                        return Err(self.failure(&format!("the process exited ({status})")));
                    }
                }
            }
        }
    }

    fn failure(&self, what: &str) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: String =
            log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        format!("{what}; its log ({}):\n{tail}", self.log.display())
    }

    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for LambdaProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn runtime_api(request: Request<Incoming>, runtime: &Runtime, arn: &str) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let rest = path.strip_prefix("/2018-06-01/runtime/").unwrap_or_default();
    if method == hyper::Method::GET && rest == "invocation/next" {
        runtime.first_poll.lock().unwrap().get_or_insert_with(Instant::now);
        let Some((id, event)) = runtime.next.lock().await.recv().await else { return respond(500, &[], "") };
        let deadline = (std::time::SystemTime::now() + Duration::from_secs(60))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let headers = [
            ("lambda-runtime-aws-request-id", id),
            ("lambda-runtime-deadline-ms", deadline.to_string()),
            ("lambda-runtime-invoked-function-arn", arn.to_owned()),
            ("lambda-runtime-trace-id", "Root=1-00000000-000000000000000000000000;Sampled=0".into()),
            ("content-type", "application/json".into()),
        ];
        return respond(200, &headers, event);
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let finished = rest.strip_prefix("invocation/").and_then(|r| r.split_once('/'));
    match finished {
        Some((id, kind)) => {
            let outcome = match kind {
                "response" => {
                    serde_json::from_str(&text).map_err(|e| format!("an answer that is not JSON ({e}): {text}"))
                }
                _ => Err(format!("the function failed: {text}")),
            };
            if let Some(waiting) = runtime.waiting.lock().unwrap().remove(id) {
                let _ = waiting.send(outcome);
            }
        }
        None => eprintln!("runtime API: {method} {path}: {text}"),
    }
    respond(202, &[], "")
}

fn log_file(name: &str) -> PathBuf {
    let logs = root().join("target/test-logs");
    std::fs::create_dir_all(&logs).unwrap();
    logs.join(format!("terraform-{name}-{}.log", std::process::id()))
}

/// The body of an API Gateway answer, as JSON (Null when it is not).
pub fn body_of(answer: &Value) -> Value {
    match answer["body"].as_str() {
        Some(body) => serde_json::from_str(body).unwrap_or(Value::Null),
        None => answer.clone(),
    }
}

/// A submit event with a new idempotency key and prompt, so it makes a new job.
pub fn with_new_request(event: &str, prompt: &str) -> String {
    let mut event: Value = serde_json::from_str(event).unwrap();
    event["headers"]["idempotency-key"] = json!(format!("terraform-test-{}", prompt.replace(' ', "-")));
    event["headers"].as_object_mut().unwrap().remove("content-length");
    let mut body: Value = serde_json::from_str(event["body"].as_str().unwrap()).expect("a JSON body");
    body["prompt"] = json!(prompt);
    event["body"] = json!(body.to_string());
    event["isBase64Encoded"] = json!(false);
    event.to_string()
}

// --- the runner --------------------------------------------------------------------------------

/// Starts kiln-runner with terraform's environment. Only what differs on this machine is
/// replaced (and only where terraform sets it): the ONNX Runtime library, the models folder,
/// the device and the metrics address; short leases and polls are added so the test is quick
/// and the heartbeat runs.
pub fn start_runner(env: &BTreeMap<String, String>, recorder: &Recorder, tools: &Tools) -> Child {
    let mut env = env.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let here = [
        ("ORT_DYLIB_PATH", tools.ort_dylib.display().to_string()),
        ("KILN_MODELS_DIR", root().join("gpu-runner/models").display().to_string()),
        ("KILN_DEVICE", "cpu".to_owned()),
        ("KILN_METRICS_ADDR", format!("127.0.0.1:{port}")),
    ];
    for (key, value) in here {
        if let Some(slot) = env.get_mut(key) {
            *slot = value;
        }
    }
    for (key, value) in [
        ("KILN_POLL_WAIT_SECS", "1"),
        ("KILN_LEASE_SECS", "2"),
        ("KILN_HEARTBEAT_SECS", "1"),
        ("KILN_PROGRESS_INTERVAL_MS", "250"),
        ("KILN_SHUTDOWN_DEADLINE_SECS", "5"),
        ("KILN_RETRY_BASE_SECS", "1"),
    ] {
        env.insert(key.to_owned(), value.to_owned());
    }
    let log = log_file("runner");
    Command::new(runner_binary(&root()).expect("the runner binary"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&env)
        .env("KILN_AWS_ENDPOINT_URL", &recorder.url)
        .stdin(Stdio::null())
        .stdout(File::create(&log).unwrap())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("starting kiln-runner")
}

/// SIGTERM, as the instance's drain sends it, and the wait for the runner to hand back.
pub fn stop_runner(child: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("kiln-runner did not stop within 30 s of SIGTERM");
}

// --- grants -------------------------------------------------------------------------------------

/// One statement of functions.json's `access`.
#[derive(Debug)]
struct Statement {
    actions: Vec<String>,
    resources: Vec<Resource>,
    /// `leading_keys`: the partition key values (patterns) the statement is limited to (an IAM
    /// `dynamodb:LeadingKeys` condition); empty: any item.
    leading_keys: Vec<String>,
}

impl Statement {
    fn allows_key(&self, key: Option<&str>) -> bool {
        self.leading_keys.is_empty() || key.is_some_and(|key| self.leading_keys.iter().any(|p| glob(p, key)))
    }
}

/// A function's (or the runner's) `access`.
pub struct Access {
    statements: Vec<Statement>,
}

/// The names of the model packages the runner serves (`@served_models` in functions.json;
/// terraform's `served_models`).
pub fn served_models() -> Vec<String> {
    let dir = root().join("gpu-runner/models");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| {
            let manifest = std::fs::read(entry.ok()?.path().join("manifest.json")).ok()?;
            serde_json::from_slice::<Value>(&manifest).ok()?["name"].as_str().map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// `*` in an IAM action or ARN matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head) && (0..=text.len() - head.len()).any(|i| glob(tail, &text[head.len() + i..]))
        }
    }
}

impl Access {
    pub fn parse(value: &Value) -> Result<Self, String> {
        let mut statements = Vec::new();
        for statement in value.as_array().ok_or("not a list")? {
            let strings = |key: &str| -> Vec<String> {
                statement[key].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
            };
            let mut resources = Vec::new();
            resources.extend(strings("tables").into_iter().map(Resource::Table));
            for index in strings("indexes") {
                let (table, name) = index.split_once('/').ok_or(format!("index `{index}` is not table/index"))?;
                resources.push(Resource::Index(table.into(), name.into()));
            }
            resources.extend(strings("queues").into_iter().map(Resource::Queue));
            resources.extend(strings("objects").into_iter().map(Resource::Object));
            resources.extend(strings("buckets").into_iter().map(Resource::Bucket));
            let actions = strings("actions");
            if actions.is_empty() || resources.is_empty() {
                return Err(format!("a statement needs actions and resources: {statement}"));
            }
            let leading_keys = strings("leading_keys")
                .into_iter()
                .flat_map(|key| if key == "@served_models" { served_models() } else { vec![key] })
                .collect();
            statements.push(Statement { actions, resources, leading_keys });
        }
        Ok(Self { statements })
    }

    /// Names stack.json lacks, and wildcards.
    pub fn check_names(&self, deploy: &Deploy) -> Vec<String> {
        let mut problems = Vec::new();
        for statement in &self.statements {
            for action in &statement.actions {
                if action.contains('*') {
                    problems.push(format!("`{action}`: grant the actions the code calls, not a wildcard"));
                }
            }
            for resource in &statement.resources {
                let found = match resource {
                    Resource::Table(t) => deploy.has("tables", t),
                    Resource::Index(t, i) => deploy.stack["tables"][t]["indexes"]
                        .as_array()
                        .is_some_and(|indexes| indexes.iter().any(|x| x["name"] == i.as_str())),
                    Resource::Queue(q) => deploy.has_queue(q),
                    Resource::Object(o) => deploy.has("buckets", o.split('/').next().unwrap_or_default()),
                    Resource::Bucket(b) => deploy.has("buckets", b),
                    Resource::Unknown(_) => false,
                };
                if !found {
                    problems.push(format!("{resource:?} is not in stack.json"));
                }
            }
        }
        problems
    }

    /// Whether some unit's grant lets it write (`PutItem`, `UpdateItem`, `DeleteItem`) an item
    /// of `table` whose partition key is `key`.
    pub fn may_write(&self, table: &str, key: &str) -> bool {
        self.statements.iter().any(|s| {
            s.actions
                .iter()
                .any(|a| ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"].iter().any(|w| glob(a, w)))
                && s.resources.contains(&Resource::Table(table.to_owned()))
                && s.allows_key(Some(key))
        })
    }

    fn covers(resource: &Resource, call: &Resource) -> bool {
        match (resource, call) {
            (Resource::Object(pattern), Resource::Object(object)) => glob(pattern, object),
            (granted, called) => granted == called,
        }
    }

    /// Every call granted; every granted resource used.
    pub fn judge(&self, name: &str, calls: &[Call]) -> Vec<String> {
        let mut problems = BTreeSet::new();
        for call in calls {
            let granted = self.statements.iter().any(|s| {
                s.actions.iter().any(|a| glob(a, &call.action))
                    && s.resources.iter().any(|r| Self::covers(r, &call.resource))
                    && s.allows_key(call.leading_key.as_deref())
            });
            if !granted {
                problems.insert(format!("{name} calls {call} without a grant in its access"));
            }
        }
        for statement in &self.statements {
            for resource in &statement.resources {
                let used = calls.iter().any(|call| {
                    statement.actions.iter().any(|a| glob(a, &call.action)) && Self::covers(resource, &call.resource)
                });
                if !used {
                    problems.insert(format!(
                        "{name} is granted {:?} on {resource:?} but never used them",
                        statement.actions
                    ));
                }
            }
            for action in &statement.actions {
                if !calls.iter().any(|call| glob(action, &call.action)) {
                    problems.insert(format!("{name} is granted {action} but never called it"));
                }
            }
        }
        problems.into_iter().collect()
    }
}
