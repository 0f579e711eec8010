//! The runner instances' agent (`terraform/runner-agent.sh`) run as the instance runs it, next
//! to a real runner over moto: the script itself, with a stand-in instance metadata service
//! (IMDSv2 tokens enforced) and stand-ins of the three commands it drives (`aws`, `systemctl`,
//! `nvidia-smi`) that log their arguments. `systemctl stop` does what the instance's unit does:
//! SIGTERM to the runner, then waits for it to exit.
//!
//! What is held: scale-in protection follows the runner's work (off while idle, on while a job
//! renders, off again after); GPU metrics are published; when the instance's target lifecycle
//! state turns `Terminated` mid-render, the runner is stopped first (it hands the job back) and
//! only then is the lifecycle action completed, and another runner finishes the job.

use hyper::{Method, Request, body::Incoming};
use kiln_local::{RunnerProcess, wait_exit, workspace_root};
use kiln_tests::{
    Client,
    http::{respond, serve},
    runner_options, slow_job, stack, start_runner, unique_prefix,
};
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const LIMIT: Duration = Duration::from_secs(120);
const GROUP: &str = "kiln-test-runners";
const HOOK: &str = "kiln-test-drain";
const INSTANCE: &str = "i-0agenttest";

/// The instance metadata service as far as the agent uses it: IMDSv2 tokens and the instance's
/// target lifecycle state, which the test changes.
struct Imds {
    url: String,
    state: Arc<Mutex<String>>,
}

impl Imds {
    async fn start(state: &str) -> Self {
        const TOKEN: &str = "imds-token-for-the-agent-test";
        let state = Arc::new(Mutex::new(state.to_owned()));
        let shared = state.clone();
        let address = serve(move |request: Request<Incoming>| {
            let state = shared.clone();
            async move {
                let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
                match (request.method(), request.uri().path()) {
                    (&Method::PUT, "/latest/api/token") if header("x-aws-ec2-metadata-token-ttl-seconds").is_some() => {
                        respond(200, &[], TOKEN)
                    }
                    (&Method::GET, _) if header("x-aws-ec2-metadata-token") != Some(TOKEN) => respond(401, &[], ""),
                    (&Method::GET, "/latest/meta-data/autoscaling/target-lifecycle-state") => {
                        respond(200, &[], state.lock().unwrap().clone())
                    }
                    _ => respond(404, &[], ""),
                }
            }
        })
        .await;
        Self { url: format!("http://{address}"), state }
    }

    fn set(&self, state: &str) {
        *self.state.lock().unwrap() = state.to_owned();
    }
}

/// `runner-agent.sh` as a child process, with the stand-in commands first on its PATH.
struct Agent {
    child: Child,
    calls: PathBuf,
}

impl Agent {
    /// The agent of `runner`'s instance.
    fn start(runner: &RunnerProcess, imds: &Imds) -> Self {
        Self::start_with(&runner.metrics_url, runner.id(), imds, &[])
    }

    fn start_with(metrics_url: &str, runner_pid: u32, imds: &Imds, env: &[(&str, &str)]) -> Self {
        let dir = workspace_root().join("target/test-logs").join(format!("agent-{}", unique_prefix()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let calls = dir.join("calls.log");
        std::fs::write(&calls, "").unwrap();
        write_stub(&bin, "aws", r#"echo "aws $*" >> "$KILN_TEST_CALLS""#);
        // What `systemctl stop kiln-runner.service` does on the instance: docker stop sends
        // SIGTERM and waits for the container to exit (a zombie has exited: the test reaps it).
        write_stub(
            &bin,
            "systemctl",
            r#"echo "systemctl $*" >> "$KILN_TEST_CALLS"
if [ "$1" = stop ]; then
  kill -TERM "$KILN_TEST_RUNNER_PID"
  while [ -e "/proc/$KILN_TEST_RUNNER_PID" ] && [ "$(cut -d' ' -f3 "/proc/$KILN_TEST_RUNNER_PID/stat")" != Z ]; do sleep 0.1; done
  echo "runner exited" >> "$KILN_TEST_CALLS"
fi"#,
        );
        write_stub(
            &bin,
            "nvidia-smi",
            r#"case "$*" in
  *utilization.gpu*) echo 37 ;;
  *memory.used*) echo "2048, 81920" ;;
esac"#,
        );
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new("bash")
            .arg(workspace_root().join("terraform/runner-agent.sh"))
            .env("PATH", path)
            .env("AWS_REGION", "us-east-1")
            .env("KILN_INSTANCE", INSTANCE)
            .env("KILN_GROUP", GROUP)
            .env("KILN_HOOK", HOOK)
            .env("KILN_METRICS_URL", metrics_url)
            .env("KILN_UNIT", "kiln-runner.service")
            .env("KILN_IMDS_URL", &imds.url)
            .env("KILN_AGENT_INTERVAL", "1")
            .env("KILN_TEST_CALLS", &calls)
            .env("KILN_TEST_RUNNER_PID", runner_pid.to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting bash terraform/runner-agent.sh");
        Self { child, calls }
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls).unwrap().lines().map(str::to_owned).collect()
    }

    /// Waits until `count` logged calls contain `text`; returns the log.
    async fn wait_for(&self, text: &str, count: usize) -> Vec<String> {
        let started = Instant::now();
        loop {
            let calls = self.calls();
            if calls.iter().filter(|call| call.contains(text)).count() >= count {
                return calls;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no {count}× `{text}` from the agent; calls: {calls:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, limit)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_stub(bin: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = bin.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_protects_a_busy_runner_and_drains_it_before_the_instance_goes() {
    let stack = stack().await;
    let client = Client::tenant(&stack, "acme").await;
    let mut options = runner_options("agent");
    options.shutdown_deadline_secs = 1;
    let mut runner = start_runner(&stack, &options);
    let imds = Imds::start("InService").await;
    let mut agent = Agent::start(&runner, &imds);
    let protect = format!(
        "aws autoscaling --region us-east-1 set-instance-protection --auto-scaling-group-name {GROUP} --instance-ids {INSTANCE} --protected-from-scale-in"
    );
    let unprotect = protect.replace("--protected-from-scale-in", "--no-protected-from-scale-in");

    // Idle: scale-in may take it. The GPU figures and the jobs held go to CloudWatch.
    agent.wait_for(&unprotect, 1).await;
    let calls = agent.wait_for("put-metric-data", 1).await;
    let metrics = calls.iter().find(|call| call.contains("put-metric-data")).unwrap();
    for datum in [
        format!(
            "MetricName=GPUUtilization,Dimensions=[{{Name=AutoScalingGroupName,Value={GROUP}}}],Value=37.0,Unit=Percent"
        ),
        "MetricName=GPUMemoryUtilization".to_owned(),
        "Value=2.5,Unit=Percent".to_owned(),
        "MetricName=RunnerJobsInFlight".to_owned(),
        "--namespace kiln".to_owned(),
    ] {
        assert!(metrics.contains(&datum), "{datum} missing from {metrics}");
    }
    assert!(!calls.iter().any(|call| call.contains(&protect)), "protected while idle: {calls:#?}");

    // Busy: protected until the job is done, then released.
    let id = client.post_json("/v1/jobs", &slow_job("kept through scale-in")).await.job_id();
    client.wait_for(&id, LIMIT, |job| job["status"] == "running").await;
    agent.wait_for(&protect, 1).await;
    let job = client.wait_finished(&id, LIMIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    agent.wait_for(&unprotect, 2).await;

    // Terminating mid-render: the runner is stopped (SIGTERM, hand-back), then the hook completes.
    let id = client.post_json("/v1/jobs", &slow_job("drained")).await.job_id();
    client.wait_for(&id, LIMIT, |job| job["status"] == "running" && job["progress"].as_f64() > Some(0.0)).await;
    imds.set("Terminated");
    let status = agent.wait_exit(Duration::from_secs(60)).expect("the agent did not finish the drain");
    assert!(status.success(), "agent: {status}");
    let calls = agent.calls();
    let position = |text: &str| {
        calls.iter().position(|call| call.contains(text)).unwrap_or_else(|| panic!("no `{text}`: {calls:#?}"))
    };
    let complete = format!(
        "complete-lifecycle-action --lifecycle-action-result CONTINUE --lifecycle-hook-name {HOOK} --auto-scaling-group-name {GROUP} --instance-id {INSTANCE}"
    );
    let (stop, exited, completed) =
        (position("systemctl stop kiln-runner.service"), position("runner exited"), position(&complete));
    assert!(stop < exited && exited < completed, "stop, runner exit, complete out of order: {calls:#?}");
    let runner_status = runner.wait_exit(Duration::from_secs(5)).expect("the runner is still running");
    assert!(runner_status.success(), "runner after SIGTERM: {runner_status}");

    // The render was handed back, not lost: the next runner takes it at once.
    let job = client.get(&format!("/v1/jobs/{id}")).await.body;
    assert_eq!(job["status"], "running", "the first runner must not have finished it: {job}");
    let _next = start_runner(&stack, &runner_options("agent-next"));
    let job = client.wait_finished(&id, LIMIT).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("succeeded"), Some(2)), "{job}");

    // A runner that stops answering /healthz past the grace: the instance is marked unhealthy.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let imds = Imds::start("InService").await;
    let silent = Agent::start_with(
        &format!("http://{closed}"),
        0,
        &imds,
        &[("KILN_AGENT_START_GRACE", "0"), ("KILN_AGENT_UNHEALTHY_AFTER", "1")],
    );
    let unhealthy = silent
        .wait_for(
            &format!("set-instance-health --instance-id {INSTANCE} --health-status Unhealthy --no-should-respect-grace-period"),
            1,
        )
        .await;

    // Every AWS action the agent called is granted to the runner instances' role in
    // terraform/runner.tf, and every autoscaling or cloudwatch action granted there was called.
    let called: BTreeSet<String> = calls.iter().chain(&unhealthy).filter_map(|call| iam_action(call)).collect();
    let runner_tf = std::fs::read_to_string(workspace_root().join("terraform/runner.tf")).unwrap();
    let granted: BTreeSet<String> = runner_tf
        .split('"')
        .filter(|text| text.starts_with("autoscaling:") || text.starts_with("cloudwatch:"))
        // IAM actions only: not the condition key cloudwatch:namespace, nor the lifecycle
        // transition autoscaling:EC2_INSTANCE_TERMINATING.
        .filter(|text| text.split(':').nth(1).is_some_and(|name| name.starts_with(|c: char| c.is_ascii_uppercase())))
        .filter(|text| text.chars().all(|c| c.is_ascii_alphanumeric() || c == ':'))
        .map(str::to_owned)
        .collect();
    assert_eq!(called, granted, "the agent's calls (left) against runner.tf's grants (right)");
}

/// `aws autoscaling --region r set-instance-protection ...` → `autoscaling:SetInstanceProtection`.
fn iam_action(call: &str) -> Option<String> {
    let mut words = call.strip_prefix("aws ")?.split_whitespace();
    let service = words.next()?;
    let mut operation = None;
    while let Some(word) = words.next() {
        if word == "--region" {
            words.next();
        } else if !word.starts_with("--") {
            operation = Some(word);
            break;
        }
    }
    let pascal: String = operation?.split('-').map(|part| part[..1].to_uppercase() + &part[1..]).collect();
    Some(format!("{service}:{pascal}"))
}
