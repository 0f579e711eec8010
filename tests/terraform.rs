//! terraform held to the code, with no AWS account and no terraform binary.
//!
//! - Every Lambda binary of the workspace (a bin of a package that depends on lambda_runtime
//!   or lambda_http) is a function in `terraform/functions.json`, or named there as not one.
//! - Everything functions.json names (env references, access, triggers, fixtures) exists in
//!   `terraform/stack.json`, the file the local stack provisions from; every env variable it
//!   sets is one the code reads.
//! - The HCL parses, its resource names are stack.json's, and checkov passes (on terraform/ and
//!   on the gpu-runner image's Dockerfile) with every skip carrying its reason.
//! - Recorded, not listed: each function binary runs as Lambda runs it (a process under a
//!   Lambda runtime API, with exactly the environment terraform gives it, its events/ fixtures
//!   as events), and the runner as its instance runs it, each with its AWS endpoint pointed at
//!   a proxy in front of moto that records every call (operation, table, index, queue, object;
//!   presigned links the function hands out are fetched through it too). Every recorded call
//!   must be granted by that function's `access` in functions.json (from which terraform
//!   builds its role), and every grant must have been used.

#[path = "terraform/harness.rs"]
mod harness;

use harness::{
    Access, Call, Deploy, FIXTURE_JOB, FIXTURE_KEY, FIXTURE_WEBHOOK, LambdaProcess, Recorder, resolve_env, root,
};
use kiln_app::ApiKey;
use kiln_local::{LocalStack, StackOptions};
use kiln_tests::{Client, moto_url, receiver::Receiver, stack_with, tools, unique_prefix};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

#[test]
fn every_lambda_binary_is_a_function_and_every_function_a_binary() {
    let deploy = Deploy::load();
    let binaries = harness::lambda_binaries();
    let declared: BTreeSet<String> =
        deploy.functions().keys().chain(deploy.json["not_functions"].as_object().unwrap().keys()).cloned().collect();
    let missing: Vec<_> = binaries.difference(&declared).collect();
    let stale: Vec<_> = declared.difference(&binaries).collect();
    assert!(
        missing.is_empty(),
        "Lambda binaries terraform does not deploy: {missing:?}; add each to terraform/functions.json \
         (trigger, env, access, events) or to its not_functions with the reason"
    );
    assert!(stale.is_empty(), "terraform/functions.json names binaries the workspace lacks: {stale:?}");
}

#[test]
fn no_function_nor_the_runner_may_write_api_keys_tenants_or_other_models() {
    // Only kiln-admin (an operator's own credentials) makes keys and tenants; a function that
    // keeps webhook secrets in the same table is held to its `webhook#` items.
    let deploy = Deploy::load();
    for (name, spec) in deploy.units() {
        let access = Access::parse(&spec["access"]).unwrap();
        for item in ["key#0123abcd", "tenant#acme"] {
            assert!(!access.may_write("tenants", item), "{name} may write `{item}` in the tenants table");
        }
        // The runner publishes the manifests of the packages it serves, and no other model's.
        assert!(!access.may_write("models", "a-model-it-does-not-serve"), "{name} may rewrite any model's limits");
    }
}

#[test]
fn terraform_serves_the_repositorys_model_packages_by_default() {
    let variables = std::fs::read_to_string(root().join("terraform/variables.tf")).unwrap();
    let served = harness::served_models();
    let default =
        format!("default     = [{}]", served.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "));
    assert!(variables.contains(&default), "variables.tf's served_models default is not {served:?}");
}

#[test]
fn functions_json_names_only_what_stack_json_creates() {
    let deploy = Deploy::load();
    let mut problems = Vec::new();
    let mut routes = BTreeMap::new();
    let mut claimed = BTreeMap::new();
    for (name, spec) in deploy.units() {
        for (key, value) in deploy.env_of(&name) {
            if key.starts_with("AWS_") || key.starts_with("LAMBDA_") || key.starts_with('_') {
                problems.push(format!("{name}: {key} is reserved by Lambda"));
            }
            if key == "KILN_AWS_ENDPOINT_URL" {
                problems.push(format!("{name}: {key} would send every AWS call away from AWS"));
            }
            if let Err(err) = deploy.check_ref(&value) {
                problems.push(format!("{name}: env {key}: {err}"));
            }
        }
        match Access::parse(&spec["access"]) {
            Ok(access) => problems.extend(access.check_names(&deploy).into_iter().map(|p| format!("{name}: {p}"))),
            Err(err) => problems.push(format!("{name}: access: {err}")),
        }
        if name == "runner" {
            continue;
        }
        problems.extend(deploy.check_trigger(&name, &spec["trigger"]).into_iter().map(|p| format!("{name}: {p}")));
        for route in spec["trigger"]["routes"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if let Some(other) = routes.insert(route.to_owned(), name.clone()) {
                problems.push(format!("route {route} goes to both {other} and {name}"));
            }
        }
        let events = spec["events"].as_array().map(Vec::as_slice).unwrap_or_default();
        if events.is_empty() {
            problems.push(format!("{name}: no events/ fixture to run it with (\"events\")"));
        }
        for event in events.iter().filter_map(Value::as_str) {
            if !root().join("events").join(event).exists() {
                problems.push(format!("{name}: events/{event} does not exist"));
            }
            claimed.insert(event.to_owned(), name.clone());
        }
        // What Lambda keeps of its failures (`on_failure`), as `kiln-replay` reads it.
        let replay_events = spec["replay_events"].as_array().cloned().unwrap_or_default();
        if spec["trigger"].get("on_failure").is_some() && replay_events.is_empty() {
            problems.push(format!("{name}: an on_failure queue without a fixture of its records (\"replay_events\")"));
        }
        for event in replay_events.iter().filter_map(Value::as_str) {
            if !root().join("events").join(event).exists() {
                problems.push(format!("{name}: events/{event} does not exist"));
            }
            claimed.insert(event.to_owned(), name.clone());
        }
    }
    for entry in std::fs::read_dir(root().join("events")).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if file.ends_with(".json") && !claimed.contains_key(&file) {
            problems.push(format!("events/{file} is no function's fixture in functions.json (\"events\")"));
        }
    }
    assert!(problems.is_empty(), "terraform/functions.json:\n  {}", problems.join("\n  "));
}

#[test]
fn every_env_variable_terraform_sets_is_one_the_code_reads() {
    let deploy = Deploy::load();
    let read_by_code = harness::env_names_in_sources();
    let read_by_runner = harness::runner_env_names();
    let mut problems = Vec::new();
    for (name, _) in deploy.units() {
        let known = if name == "runner" { &read_by_runner } else { &read_by_code };
        for key in deploy.env_of(&name).keys() {
            if key != "RUST_LOG" && !known.contains(key) {
                problems.push(format!("{name}: {key} is read by no config struct"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_runner_settings_fit_its_queue_and_its_drain() {
    let deploy = Deploy::load();
    let env = deploy.env_of("runner");
    let number = |key: &str, default: u64| env.get(key).map_or(default, |v| v.parse::<u64>().expect(key));
    let queue = &deploy.stack["queues"]["jobs"];
    assert_eq!(
        number("KILN_MAX_RECEIVES", 5),
        queue["dead_letter"]["max_receive_count"].as_u64().unwrap(),
        "KILN_MAX_RECEIVES must be the job queue's maxReceiveCount: the runner fails a job on its last delivery"
    );
    let (lease, heartbeat) = (number("KILN_LEASE_SECS", 60), number("KILN_HEARTBEAT_SECS", 20));
    assert!(
        heartbeat * 2 <= lease,
        "the heartbeat ({heartbeat} s) must renew the lease ({lease} s) well before it ends"
    );
    assert!(
        lease <= queue["visibility_timeout_seconds"].as_u64().unwrap(),
        "the runner's lease outlasts the queue's own visibility timeout"
    );
    assert!(
        env.contains_key("KILN_SHUTDOWN_DEADLINE_SECS"),
        "runner.tf sizes the drain from KILN_SHUTDOWN_DEADLINE_SECS"
    );
    assert!(env.get("KILN_DEVICE").is_some_and(|d| d.starts_with("cuda")), "the runner instances have GPUs");
    assert!(env.get("KILN_METRICS_ADDR").is_some_and(|a| a.contains(':')), "the agent reads the metrics port from it");
}

/// Instance types of 1, 4 and 8 GPUs mix in one runner group: each type weighs its GPUs, so the
/// group's bounds and backlog target count GPUs, and the backlog is divided by the GPUs in
/// service (a metric the group must publish), not by instances.
#[test]
fn the_runner_group_counts_gpus_so_instance_types_with_several_mix() {
    let python = harness::checkov_python();
    let parsed = harness::parse_hcl(&python);
    let variables = &parsed["variable"];
    let gpus = variables["runner_instance_gpus"]["default"][0].as_object().expect("runner_instance_gpus' default");
    for (kind, count) in [("g6.xlarge", 1), ("g6.12xlarge", 4), ("p4d.24xlarge", 8), ("p5.48xlarge", 8)] {
        assert_eq!(gpus[kind].as_u64(), Some(count), "{kind}");
    }
    for kind in variables["runner_instance_types"]["default"].as_array().unwrap() {
        assert!(gpus.contains_key(kind.as_str().unwrap()), "{kind} has no GPU count");
    }
    let group = &parsed["resource"]["aws_autoscaling_group"]["runner"];
    let template = &group["mixed_instances_policy"][0]["launch_template"][0];
    let override_ = &template["dynamic"][0]["override"]["content"][0];
    assert_eq!(override_["weighted_capacity"], "${tostring(var.runner_instance_gpus[override.value])}", "{template}");
    let metrics: Vec<&str> = group["enabled_metrics"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(metrics.contains(&"GroupInServiceCapacity"), "{metrics:?}");
    assert_eq!(group["max_size"], "${local.runner_max_gpus}");
    let policy = &parsed["resource"]["aws_autoscaling_policy"]["runner_backlog"]["target_tracking_configuration"][0];
    assert_eq!(policy["target_value"], "${var.runner_backlog_per_gpu}");
    let spec = &policy["customized_metric_specification"][0]["metrics"];
    let names: Vec<&str> = spec
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["metric_stat"][0]["metric"][0]["metric_name"].as_str())
        .collect();
    // The backlog is the queued jobs that may scale out (expire-jobs' EMF metric): low-priority
    // ones never do on their own.
    assert_eq!(names, ["SchedulableBacklog", "GroupInServiceCapacity"]);
}

/// Which of `cases` Python's `re.search` finds `pattern` in (WAF's regexes are PCRE-like).
fn python_matches(python: &std::path::Path, pattern: &str, cases: &[String]) -> Vec<bool> {
    let script = "import re, json, sys\npattern, cases = json.load(sys.stdin)\nprint(json.dumps([re.search(pattern, c) is not None for c in cases]))";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), json!([pattern, cases]).to_string().as_bytes()).unwrap();
    serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap()
}

/// Keyless floods: API Gateway's throttle is shared by every caller and keys are checked in the
/// functions, so requests without a key must be refused before they reach the stage. The API
/// is a REST API (AWS WAF cannot sit on an HTTP API) behind a web ACL that refuses a request
/// without a well-formed key (401) before its throttle, then limits each address and each key
/// (the per-tenant throttle at the edge).
#[test]
fn a_web_acl_refuses_keyless_requests_and_limits_each_key_and_address_before_the_api() {
    let python = harness::checkov_python();
    let parsed = harness::parse_hcl(&python);
    let resources = parsed["resource"].as_object().unwrap();
    let http_apis: Vec<&String> = resources.keys().filter(|kind| kind.starts_with("aws_apigatewayv2")).collect();
    assert!(http_apis.is_empty(), "an HTTP API cannot have a web ACL: {http_apis:?}");
    let association = &parsed["resource"]["aws_wafv2_web_acl_association"]["api"];
    assert_eq!(
        association["resource_arn"], "${aws_api_gateway_stage.api.arn}",
        "the web ACL is not on the API's stage"
    );
    assert_eq!(association["web_acl_arn"], "${aws_wafv2_web_acl.api.arn}");

    let acl = &parsed["resource"]["aws_wafv2_web_acl"]["api"];
    let rules = acl["rule"].as_array().expect("rules");
    let order: Vec<(&str, u64)> =
        rules.iter().map(|r| (r["name"].as_str().unwrap(), r["priority"].as_u64().unwrap())).collect();
    assert_eq!(order, [("keyless", 0), ("per-ip", 1), ("per-key", 2)], "the keyless rule must come first");
    for rule in rules {
        assert!(rule["action"][0]["block"].is_array(), "{} does not block: {rule}", rule["name"]);
    }
    let status = |rule: &Value| rule["action"][0]["block"][0]["custom_response"][0]["response_code"].as_u64();
    assert_eq!(rules.iter().map(status).collect::<Vec<_>>(), [Some(401), Some(429), Some(429)]);

    // 1. Refused unless `Authorization` has the form of a key, or the path is a public route's.
    let both = &rules[0]["statement"][0]["and_statement"][0]["statement"];
    let unless = |n: usize| both[n]["not_statement"][0]["statement"][0]["regex_match_statement"][0].clone();
    let (keyless, public) = (unless(0), unless(1));
    assert_eq!(keyless["field_to_match"][0]["single_header"][0]["name"], "authorization", "{keyless}");
    assert_eq!(keyless["regex_string"], "${local.edge_key_pattern}");
    let pattern = parsed["locals"]["edge_key_pattern"].as_str().expect("the key pattern");
    let keys: Vec<String> = (0..200).map(|_| format!("Bearer {}", ApiKey::generate().expose())).collect();
    let refused = ["", "Bearer", "Bearer ", "Basic a2lsbjpwYXNz", "Bearer kiln_short", "Bearer sk_live_0123456789"];
    let cases: Vec<String> = keys.iter().cloned().chain(refused.iter().map(|s| s.to_string())).collect();
    let matched = python_matches(&python, pattern, &cases);
    assert!(matched[..keys.len()].iter().all(|m| *m), "a key the API issues would be refused at the edge");
    assert!(matched[keys.len()..].iter().all(|m| !*m), "a keyless header passes the edge: {refused:?} {matched:?}");

    // The public paths: exactly the routes functions.json marks `public`, with or without the
    // stage; every other route's path is behind the key.
    assert_eq!(public["field_to_match"][0]["uri_path"].as_array().map(Vec::len), Some(1), "{public}");
    assert_eq!(public["regex_string"], "${local.edge_public_path_pattern}");
    let deploy = Deploy::load();
    let mut public_paths = Vec::new();
    let mut keyed_paths = Vec::new();
    let mut public_routes = std::collections::BTreeSet::new();
    for (name, spec) in deploy.functions() {
        let public: Vec<&str> =
            spec["trigger"]["public"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        public_routes.extend(public.iter().map(|route| route.to_string()));
        for route in spec["trigger"]["routes"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let path = route.split_once(' ').unwrap().1;
            assert!(path.starts_with("/v1/"), "{name}: {route}");
            let paths = if public.contains(&route) { &mut public_paths } else { &mut keyed_paths };
            paths.push(path.replace("{id}", "01KAQ3Z8X9K2M3N4P5Q6R7S8T9"));
        }
    }
    assert_eq!(public_paths.len(), 2, "the document and the playground: {public_paths:?}");
    // The same routes the API document marks as needing no key (`security: [{}]`).
    let document: Value = serde_json::from_str(kiln_api::openapi::document_json()).unwrap();
    let keyless: std::collections::BTreeSet<String> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .iter()
                .filter(|(_, op)| op["security"] == json!([{}]))
                .map(move |(method, _)| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    assert_eq!(public_routes, keyless, "functions.json's public routes and the document's keyless operations");
    // The pattern as terraform builds it from the public routes (its `replace` and `join`).
    let mut escaped: Vec<String> = public_paths.iter().map(|p| p.replace('.', "\\.")).collect();
    escaped.sort();
    let stage = parsed["locals"]["api_stage"].as_str().expect("the API's stage");
    let pattern = format!("^(/{stage})?({})$", escaped.join("|"));
    let built = parsed["locals"]["edge_public_path_pattern"].as_str().expect("the public path pattern");
    assert!(built.contains("^(/${local.api_stage})?(") && built.contains("local.public_routes"), "{built}");
    let staged =
        |paths: &[String]| -> Vec<String> { paths.iter().flat_map(|p| [p.clone(), format!("/{stage}{p}")]).collect() };
    let cases: Vec<String> = staged(&public_paths)
        .into_iter()
        .chain(staged(&keyed_paths))
        .chain(["/v1/openapi.jsonx", "/x/v1/playground", "/v1/playground/", "/"].map(String::from))
        .collect();
    let matched = python_matches(&python, &pattern, &cases);
    let open = public_paths.len() * 2;
    assert!(matched[..open].iter().all(|m| *m), "a public route would need a key: {cases:?} {matched:?}");
    assert!(matched[open..].iter().all(|m| !*m), "a keyed path passes the edge without a key: {cases:?} {matched:?}");

    // 2. and 3. Per address and per key (the tenant's throttle), within WAF's bounds.
    let rate = |rule: &Value| rule["statement"][0]["rate_based_statement"][0].clone();
    let (per_ip, per_key) = (rate(&rules[1]), rate(&rules[2]));
    assert_eq!(per_ip["aggregate_key_type"], "IP");
    assert_eq!(per_key["aggregate_key_type"], "CUSTOM_KEYS");
    assert_eq!(per_key["custom_key"][0]["header"][0]["name"], "authorization", "{per_key}");
    let default = |name: &str| parsed["variable"][name]["default"].as_u64().unwrap_or_else(|| panic!("{name}"));
    let (ip_limit, key_limit) = (default("edge_ip_requests_per_minute"), default("edge_key_requests_per_minute"));
    assert!(key_limit >= 10 && key_limit <= ip_limit, "per key {key_limit}/min, per address {ip_limit}/min");
    for statement in [&per_ip, &per_key] {
        assert!([60, 120, 300, 600].contains(&statement["evaluation_window_sec"].as_u64().unwrap()), "{statement}");
    }
    // The functions still check every key; WAF's logs never hold one.
    let logging = &parsed["resource"]["aws_wafv2_web_acl_logging_configuration"]["api"];
    assert_eq!(logging["redacted_fields"][0]["single_header"][0]["name"], "authorization", "{logging}");
}

#[test]
fn the_hcl_parses_and_checkov_passes_with_every_skip_explained() {
    let python = harness::checkov_python();
    let parsed = harness::parse_hcl(&python);
    let stack_names = |resource: &str, name_field: &str| {
        let block = &parsed["resource"][resource];
        assert!(block.is_object(), "terraform declares no {resource}");
        block.as_object().unwrap().values().map(|r| r[name_field].as_str().unwrap_or_default().to_owned()).collect()
    };
    let tables: Vec<String> = stack_names("aws_dynamodb_table", "name");
    assert_eq!(
        tables,
        ["${var.prefix}-${each.key}"],
        "tables must be <prefix>-<stack.json key>, as kiln-aws names them"
    );
    let queues: Vec<String> = stack_names("aws_sqs_queue", "name");
    assert_eq!(queues, ["${var.prefix}-${each.key}-dlq", "${var.prefix}-${each.key}"], "queues and their DLQs");
    let buckets: Vec<String> = stack_names("aws_s3_bucket", "bucket");
    assert_eq!(buckets, ["${var.prefix}-${each.key}"]);
    for (resource, source) in [
        ("aws_dynamodb_table", "${local.stack.tables}"),
        ("aws_sqs_queue", "${local.stack.queues}"),
        ("aws_s3_bucket", "${local.stack.buckets}"),
        ("aws_lambda_function", "${local.functions}"),
        ("aws_iam_role", "${local.functions}"),
        ("aws_iam_role_policy", "${local.functions}"),
    ] {
        for (name, block) in parsed["resource"][resource].as_object().unwrap() {
            if resource != "aws_iam_role" && resource != "aws_iam_role_policy" || name == "function" {
                assert_eq!(block["for_each"].as_str(), Some(source), "{resource}.{name} must be one per {source}");
            }
        }
    }
    assert_eq!(parsed["locals"]["stack"].as_str(), Some("${jsondecode(file(\"${path.module}/stack.json\"))}"));

    // What Lambda gives up on is kept: every stream and S3 (asynchronous) trigger names a
    // failures queue, and terraform wires it (the stream mapping's destination, the function's
    // event invoke config) with an alarm on it.
    let deploy = Deploy::load();
    for (name, spec) in deploy.functions() {
        let kind = spec["trigger"]["type"].as_str().unwrap_or_default();
        if ["dynamodb_stream", "s3"].contains(&kind) {
            assert!(spec["trigger"]["on_failure"].is_string(), "{name}: a {kind} trigger without an on_failure queue");
        }
    }
    let text = |value: &Value| value.to_string();
    let stream = &parsed["resource"]["aws_lambda_event_source_mapping"]["stream"];
    assert!(text(&stream["dynamic"]).contains("destination_config"), "the stream mapping keeps no failures: {stream}");
    assert!(text(&stream["dynamic"]).contains("on_failure"), "{stream}");
    assert_eq!(stream["bisect_batch_on_function_error"], json!(true), "{stream}");
    let invoke = &parsed["resource"]["aws_lambda_function_event_invoke_config"]["s3"];
    assert!(text(&invoke["destination_config"]).contains("on_failure"), "S3 invocations keep no failures: {invoke}");
    let kept = parsed["locals"]["kept_queues"].to_string();
    assert!(kept.contains("local.failure_queues"), "no alarm on the failures queues: {kept}");
    let alarm = &parsed["resource"]["aws_cloudwatch_metric_alarm"]["not_empty"];
    assert_eq!(alarm["for_each"].as_str(), Some("${local.kept_queues}"), "{alarm}");

    let skips = harness::checkov_skips();
    let unexplained: Vec<_> = skips.iter().filter(|(_, reason)| reason.trim().len() < 20).collect();
    assert!(unexplained.is_empty(), "checkov skips without a reason: {unexplained:?}");
    for (what, report) in [
        ("terraform/", harness::run_checkov(&python)),
        ("gpu-runner/Dockerfile", harness::run_checkov_dockerfile(&python)),
    ] {
        let summary = &report["summary"];
        let failed: Vec<String> = report["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} {} ({})", c["check_id"], c["resource"], c["file_path"]))
            .collect();
        assert!(failed.is_empty(), "checkov failed on {what}:\n  {}", failed.join("\n  "));
        assert_eq!(summary["parsing_errors"].as_u64(), Some(0), "checkov could not parse {what}: {summary}");
        assert!(summary["passed"].as_u64().unwrap_or(0) > 50, "checkov ran too few checks on {what}: {summary}");
    }
}

/// The functions step 3 leaves to `webhook_and_inbox_paths`.
/// The image id the fixtures name (`events/apigw-rest-submit-job-image.json`).
const FIXTURE_IMAGE: &str = "img_01JX3F8Z2M4N6P8R0T2V4W6Y8Z.png";

/// A 64×64 PNG.
fn small_png() -> Vec<u8> {
    let data: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, 64, 64);
    encoder.set_color(png::ColorType::Rgb);
    encoder.write_header().unwrap().write_image_data(&data).unwrap();
    out
}

/// Inbox specs that start from images, through the inbox-trigger binary: one names the
/// uploaded image's id (the function reads `images/`), one a file beside it (the runner reads
/// `inbox/`). The ids of the jobs they started.
async fn inbox_jobs_from_images(
    deploy: &Deploy,
    stack: &LocalStack,
    processes: &BTreeMap<String, (LambdaProcess, Recorder)>,
    client: &Client,
) -> Vec<String> {
    kiln_tests::put_object(stack, "inbox/fixture-tenant/with-photo/photo.png", small_png(), "image/png").await;
    let fixture = &deploy.events("inbox-trigger")[0];
    let mut ids = Vec::new();
    for (name, image) in [("with-photo", "photo.png"), ("with-image-id", FIXTURE_IMAGE)] {
        let prompt = format!("from the inbox, {name}");
        let spec = json!({"model": "kiln-tiny-sd", "prompt": prompt, "init_image": image, "steps": 2, "seed": 1});
        let key = format!("inbox/fixture-tenant/{name}/01JX3F8Z2M4N6P8R0T2V4W6Y8Z.json");
        kiln_tests::put_object(stack, &key, spec.to_string().into_bytes(), "application/json").await;
        let event = fixture.replace("inbox/fixture-tenant/lighthouse-1/01JX3F8Z2M4N6P8R0T2V4W6Y8Z.json", &key);
        processes["inbox-trigger"].0.invoke(&event).await.unwrap_or_else(|e| panic!("inbox-trigger {name}: {e}"));
        let listed = client.get("/v1/jobs?limit=100").await;
        let job =
            listed.body["jobs"].as_array().unwrap().iter().find(|j| j["input"]["prompt"] == prompt.as_str()).cloned();
        ids.push(
            job.unwrap_or_else(|| panic!("no job from {key}: {}", listed.body))["id"].as_str().unwrap().to_owned(),
        );
    }
    ids
}

const OWN_SCENARIO: [&str; 3] = ["job-events", "deliver-webhooks", "inbox-trigger"];

/// The scenario: the fixtures' submits through submit-job; the runner renders them (and a
/// long job, so its heartbeat runs), then SIGTERM; every function's fixtures against a
/// finished job and a queued one; submit-job once more with the queue failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_function_and_the_runner_call_only_what_their_roles_grant() {
    let deploy = Deploy::load();
    let prefix = unique_prefix();
    let stack = stack_with(StackOptions { prefix: prefix.clone(), ..StackOptions::default() }).await;
    stack.add_tenant_key("fixture-tenant", "Fixture", &ApiKey::from_text(FIXTURE_KEY)).await.unwrap();
    let client = Client::new(&stack.api_url, Some(FIXTURE_KEY));
    let binaries = harness::build_lambda_binaries(deploy.functions().keys());
    let moto = moto_url();
    let mut calls: BTreeMap<String, Vec<Call>> = BTreeMap::new();

    // Every env value terraform sets that the local stack also passes must be the same name.
    let local_env: BTreeMap<&str, String> = stack.resources.to_env().into_iter().collect();
    let mut processes = BTreeMap::new();
    for name in deploy.functions().keys() {
        let mut env = resolve_env(&deploy, name, &prefix, &stack).await;
        for (key, value) in &env {
            if let Some(local) = local_env.get(key.as_str()) {
                assert_eq!(value, local, "{name}: terraform's {key} is not the name the local stack creates");
            }
        }
        if name == "deliver-webhooks" {
            // Here only: the test's webhook receiver listens on 127.0.0.1.
            env.insert("KILN_WEBHOOK_ALLOW_LOOPBACK".into(), "true".into());
        }
        let recorder = Recorder::start(&moto, &prefix).await;
        let process = LambdaProcess::start(name, &binaries[name], &env, &recorder).await;
        // A function that cannot start (its configuration refused) shows its log here.
        process.init_time().await.unwrap_or_else(|e| panic!("{name} did not start: {e}"));
        processes.insert(name.clone(), (process, recorder));
    }

    // 1. The fixtures' jobs, submitted by the submit-job binary (one names the image uploaded
    //    here under its id), and two inbox specs that start from images.
    kiln_tests::put_object(&stack, &format!("images/fixture-tenant/{FIXTURE_IMAGE}"), small_png(), "image/png").await;
    let submit = &processes["submit-job"];
    let mut submitted = Vec::new();
    for event in deploy.events("submit-job") {
        let answer = submit.0.invoke(&event).await.unwrap_or_else(|e| panic!("submit-job: {e}"));
        assert!(answer["statusCode"].as_u64().is_some_and(|s| s < 300), "submit-job: {answer}");
        submitted.push(harness::body_of(&answer)["id"].as_str().unwrap().to_owned());
    }
    let slow = client
        .post_json(
            "/v1/jobs",
            &json!({"model": "kiln-demo", "prompt": "a slow one", "width": 768, "height": 768, "steps": 40, "seed": 1}),
        )
        .await;
    submitted.push(slow.body["id"].as_str().unwrap().to_owned());
    submitted.extend(inbox_jobs_from_images(&deploy, &stack, &processes, &client).await);
    // More of one tenant's jobs than the runner's slots: its fair intake sends some back to the
    // end of the queue (sqs:SendMessage) while it holds the tenant's share.
    for seed in 0..5 {
        let queued =
            client.post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": "one of many", "seed": seed})).await;
        submitted.push(queued.body["id"].as_str().unwrap().to_owned());
    }

    // 2. The runner renders them; a short lease makes its heartbeat run; then SIGTERM.
    let runner_recorder = Recorder::start(&moto, &prefix).await;
    let runner_env = resolve_env(&deploy, "runner", &prefix, &stack).await;
    let mut runner = harness::start_runner(&runner_env, &runner_recorder, &tools());
    for id in &submitted {
        let job = client.wait_finished(id, Duration::from_secs(240)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // A job canceled while it renders: the runner removes its artifact key before recording
    // the cancel.
    let canceled = client
        .post_json(
            "/v1/jobs",
            &json!({"model": "kiln-demo", "prompt": "canceled", "width": 768, "height": 768, "steps": 40, "seed": 2}),
        )
        .await;
    let canceled = canceled.body["id"].as_str().unwrap().to_owned();
    client.wait_for(&canceled, Duration::from_secs(240), |job| job["status"] == "running").await;
    let answer = client.post(&format!("/v1/jobs/{canceled}/cancel")).await;
    assert!(answer.status.is_success(), "{:?}", answer.body);
    let job = client.wait_finished(&canceled, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "canceled", "{job}");
    harness::stop_runner(&mut runner);
    calls.insert("runner".into(), runner_recorder.calls());

    // 3. Every function's fixtures, once with a finished job and once with a queued one; an
    //    overdue job for the sweeper; presigned links fetched through the function's proxy.
    //    The event-driven functions of step 5 follow their own scenario.
    let overdue = LocalStack::start(
        &moto,
        StackOptions { prefix: prefix.clone(), queued_ttl_secs: 0, ..StackOptions::default() },
    )
    .await
    .unwrap();
    for (name, (process, recorder)) in processes.iter().filter(|(name, _)| !OWN_SCENARIO.contains(&name.as_str())) {
        for event in deploy.events(name) {
            let queued = client
                .post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": format!("queued for {name}")}))
                .await;
            let queued = queued.body["id"].as_str().unwrap().to_owned();
            let late = Client::new(&overdue.api_url, Some(FIXTURE_KEY))
                .post_json("/v1/jobs", &json!({"model": "kiln-demo", "prompt": format!("overdue for {name}")}))
                .await;
            assert!(late.status.is_success(), "{:?}", late.body);
            tokio::time::sleep(Duration::from_millis(1100)).await;
            for job in [&submitted[0], &queued] {
                let event = event.replace(FIXTURE_JOB, job);
                let answer = process.invoke(&event).await.unwrap_or_else(|e| panic!("{name}: {e}"));
                if let Some(status) = answer["statusCode"].as_u64() {
                    assert!(status < 500, "{name} answered {answer}");
                }
                assert!(
                    answer["batchItemFailures"].as_array().is_none_or(Vec::is_empty),
                    "{name} reported failures: {answer}"
                );
                recorder.fetch_presigned_links(&answer).await;
            }
        }
    }

    // 4. submit-job while the queue refuses messages: the job is failed and its keys released.
    let (process, recorder) = &processes["submit-job"];
    recorder.fail_next("sqs:SendMessage");
    let event = harness::with_new_request(&deploy.events("submit-job")[0], "the queue is down");
    let answer = process.invoke(&event).await.unwrap();
    assert_eq!(answer["statusCode"], 503, "{answer}");
    overdue.stop().await;

    // 5. Webhooks and the inbox, along the paths a deployment takes.
    webhook_and_inbox_paths(&deploy, &stack, &processes, &submitted[0]).await;

    for (name, (process, recorder)) in processes {
        process.stop();
        calls.insert(name, recorder.calls());
    }
    let mut problems = Vec::new();
    for (name, calls) in &calls {
        let access = Access::parse(&deploy.unit(name)["access"]).unwrap();
        problems.extend(access.judge(name, calls));
    }
    let summary: Vec<String> = calls
        .iter()
        .map(|(name, calls)| {
            let distinct: BTreeSet<String> = calls.iter().map(|c| c.to_string()).collect();
            format!("{name}: {}", distinct.into_iter().collect::<Vec<_>>().join(", "))
        })
        .collect();
    println!("recorded AWS calls:\n  {}", summary.join("\n  "));
    assert!(
        problems.is_empty(),
        "terraform/functions.json access vs the calls the code made:\n  {}",
        problems.join("\n  ")
    );
    stack.stop().await;
}

/// - `job-events` gets the fixture's stream record of a finished job (with an outbox and the
///   webhook pointed at a receiver on 127.0.0.1): it queues `completed` and writes the outbox.
/// - `deliver-webhooks` gets that very message, received from the webhook queue: delivered
///   (the receiver fetches the event's download links through the function's proxy), then,
///   received again, answered 503: hidden for its next attempt and reported as a failure.
/// - `inbox-trigger` gets the fixture's S3 event for a new spec (a job starts), a spec the
///   API refuses (`error.json`), the spec of the finished job (a cached result: the outbox is
///   written at once), and a spec while the job queue refuses messages (an error, so S3 retries).
async fn webhook_and_inbox_paths(
    deploy: &Deploy,
    stack: &LocalStack,
    processes: &BTreeMap<String, (LambdaProcess, Recorder)>,
    finished: &str,
) {
    let receiver = Receiver::start(vec![200, 503]).await;
    let (events, _) = &processes["job-events"];
    let mut record: Value = serde_json::from_str(
        &deploy.events("job-events")[0].replace(FIXTURE_JOB, finished).replace(FIXTURE_WEBHOOK, &receiver.url),
    )
    .unwrap();
    // The job was started by an upload: every image of it carries the outbox.
    for change in record["Records"].as_array_mut().unwrap() {
        for image in ["OldImage", "NewImage"] {
            if let Some(image) = change["dynamodb"][image].as_object_mut() {
                image.insert("outboxes".into(), json!({"L": [{"S": "outbox/fixture-tenant/streamed/"}]}));
            }
        }
    }
    let answer = events.invoke(&record.to_string()).await.unwrap_or_else(|e| panic!("job-events: {e}"));
    assert!(answer["batchItemFailures"].as_array().is_none_or(Vec::is_empty), "job-events: {answer}");
    let outbox = kiln_tests::stored_keys(stack, "outbox/fixture-tenant/streamed/").await;
    assert_eq!(outbox.len(), 2, "the artifact and result.json: {outbox:?}");

    let (deliver, deliver_recorder) = &processes["deliver-webhooks"];
    let sqs = &stack.clients.sqs();
    let queue = &stack.resources.webhook_queue_url;
    let fixture: Value = serde_json::from_str(&deploy.events("deliver-webhooks")[0]).unwrap();
    for (attempt, expect_retry) in [(1, false), (2, true)] {
        let received = sqs
            .receive_message()
            .queue_url(queue)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .wait_time_seconds(5)
            .send()
            .await
            .unwrap();
        let messages = received.messages.unwrap_or_default();
        assert_eq!(messages.len(), 1, "attempt {attempt}: job-events queued one event");
        let message = &messages[0];
        let mut event = fixture.clone();
        let sqs_record = &mut event["Records"][0];
        sqs_record["messageId"] = json!(message.message_id());
        sqs_record["receiptHandle"] = json!(message.receipt_handle());
        sqs_record["body"] = json!(message.body());
        sqs_record["attributes"]["ApproximateReceiveCount"] = json!(attempt.to_string());
        let answer = deliver.invoke(&event.to_string()).await.unwrap_or_else(|e| panic!("deliver-webhooks: {e}"));
        let failures = answer["batchItemFailures"].as_array().map_or(0, Vec::len);
        assert_eq!(failures, usize::from(expect_retry), "attempt {attempt}: {answer}");
        let seen = receiver.wait_for(attempt, Duration::from_secs(5)).await;
        assert_eq!(seen.len(), attempt, "attempt {attempt} reached the receiver");
        if expect_retry {
            sqs.delete_message()
                .queue_url(queue)
                .receipt_handle(message.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        } else {
            deliver_recorder.fetch_presigned_links(&seen[0].body).await;
            sqs.change_message_visibility()
                .queue_url(queue)
                .receipt_handle(message.receipt_handle().unwrap())
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
        }
    }

    let (inbox, inbox_recorder) = &processes["inbox-trigger"];
    let fixture = &deploy.events("inbox-trigger")[0];
    let submit: Value = serde_json::from_str(&deploy.events("submit-job")[0]).unwrap();
    let same_as_finished = submit["body"].as_str().unwrap().to_owned();
    let specs = [
        ("lighthouse-1", r#"{"model": "kiln-demo", "prompt": "a lighthouse from the inbox"}"#.to_owned(), "started"),
        ("too-wide", r#"{"model": "kiln-demo", "prompt": "wide", "width": 100000}"#.to_owned(), "refused"),
        ("cached", same_as_finished, "cached"),
        ("queue-down", r#"{"model": "kiln-demo", "prompt": "while the queue is down"}"#.to_owned(), "failed"),
    ];
    for (name, spec, expect) in specs {
        // Each upload under its own name, with the fixture's upload id.
        let key = format!("inbox/fixture-tenant/{name}/01JX3F8Z2M4N6P8R0T2V4W6Y8Z.json");
        let put = stack.clients.s3().put_object().bucket(&stack.resources.artifacts_bucket).key(&key);
        put.body(spec.into_bytes().into()).send().await.unwrap();
        if expect == "failed" {
            inbox_recorder.fail_next("sqs:SendMessage");
        }
        let event = fixture.replace("inbox/fixture-tenant/lighthouse-1/01JX3F8Z2M4N6P8R0T2V4W6Y8Z.json", &key);
        let answer = inbox.invoke(&event).await;
        let outbox =
            kiln_tests::stored_keys(stack, &format!("outbox/fixture-tenant/{name}/01JX3F8Z2M4N6P8R0T2V4W6Y8Z/")).await;
        let files: Vec<&str> = outbox.iter().filter_map(|k| k.rsplit('/').next()).collect();
        match expect {
            "started" => assert!(answer.is_ok() && files.is_empty(), "{name}: {answer:?} {files:?}"),
            "refused" => assert!(answer.is_ok() && files == ["error.json"], "{name}: {answer:?} {files:?}"),
            "cached" => {
                assert!(
                    answer.is_ok() && files.contains(&"result.json") && files.len() == 2,
                    "{name}: {answer:?} {files:?}"
                )
            }
            _ => assert!(answer.is_err() && files.is_empty(), "{name}: S3 must retry: {answer:?} {files:?}"),
        }
    }
}
