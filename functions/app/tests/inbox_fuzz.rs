//! Property tests over what reaches the S3 inbox: random object keys (well-formed, another
//! tenant's, malformed) holding random specs (job bodies with random fields and values, random
//! bytes). `Inbox::on_object` on the in-memory ports never fails or panics, a job is started only
//! for the tenant whose prefix the key names, and every spec it refuses gets `error.json` in that
//! upload's own outbox. `PROPTEST_CASES=1000000 cargo test -p kiln-app --test inbox_fuzz` is the
//! long run.

use bytes::Bytes;
use kiln_app::{
    JobsConfig, Tenant,
    inbox::{Inbox, InboxOutcome, Upload},
    memory::MemoryPorts,
    ports::{ArtifactStore, TenantDirectory},
};
use kiln_domain::{JobId, ModelSpec, TenantId};
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{Value, json};

fn spec() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(64u32), Just(512), Just(100_000), Just(0)].prop_map(Value::from),
        ".{0,30}".prop_map(Value::from),
        prop::sample::select(vec!["kiln-demo", "kiln-demo@9.9.9", "gif", "https://hooks.example.com/x"])
            .prop_map(Value::from),
    ];
    let fields =
        vec!["model", "prompt", "width", "height", "num_frames", "steps", "seed", "format", "webhook", "bogus"];
    prop_oneof![
        4 => prop::collection::vec((prop::sample::select(fields), value), 0..6).prop_map(|pairs| {
            let mut spec = json!({"model": "kiln-demo", "prompt": "from the inbox"});
            for (field, value) in pairs {
                spec[field] = value;
            }
            spec.to_string().into_bytes()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

fn key() -> impl Strategy<Value = String> {
    let tenant = prop_oneof![
        4 => prop::sample::select(vec!["tenant-a", "tenant-b"]),
        1 => prop::sample::select(vec!["nobody", "", "..", "TENANT"]),
    ];
    let name = prop_oneof![4 => "[a-z0-9._-]{1,12}", 1 => ".{0,20}"];
    let id = prop_oneof![4 => Just(JobId::generate(chrono::Utc::now()).to_string()), 1 => "[0-9A-Za-z]{0,30}"];
    let form = prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)];
    (tenant, name, id, form).prop_map(|(tenant, name, id, form)| match form {
        0 => format!("inbox/{tenant}/{name}/{id}.json"),
        1 => format!("inbox/{tenant}/{name}.json"),
        2 => format!("inbox/{tenant}/{name}/{id}/x.json"),
        _ => format!("{name}/{tenant}/{id}"),
    })
}

/// Cases against one world before a fresh one (the in-memory store counts a tenant's active
/// jobs by scanning).
const CASES_PER_WORLD: u32 = 10_000;

#[test]
fn no_inbox_object_fails_the_trigger_or_starts_a_job_for_another_tenant() {
    let total = ProptestConfig::default().cases.max(2_000);
    let counts = std::cell::RefCell::new([0usize; 3]);
    let mut done = 0;
    while done < total {
        let cases = (total - done).min(CASES_PER_WORLD);
        run_cases(cases, &counts);
        done += cases;
    }
    let [started, refused, ignored] = counts.into_inner();
    eprintln!("{done} cases: started {started}, refused {refused}, ignored {ignored}");
    assert!(started > 0 && refused > 0 && ignored > 0, "the cases do not reach every outcome");
}

fn run_cases(cases: u32, counts: &std::cell::RefCell<[usize; 3]>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gpu-runner/models");
    let models = ModelSpec::read_packages(&dir).unwrap().into_iter().map(|(_, model)| model).collect();
    let memory = MemoryPorts::with_models(models);
    runtime.block_on(async {
        for id in ["tenant-a", "tenant-b"] {
            let tenant = Tenant::new(TenantId::parse(id).unwrap(), id);
            memory.tenants.create_tenant(&tenant).await.unwrap();
        }
    });
    let config = JobsConfig {
        default_limits: kiln_app::TenantLimits {
            max_active_jobs: 1_000_000,
            jobs_per_minute: 1_000_000,
            units_per_day: u64::MAX,
        },
        ..JobsConfig::default()
    };
    let inbox = Inbox::new(&memory.ports(), config, 64 * 1024);
    let mut runner = TestRunner::new(ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() });
    let result = runner.run(&(key(), spec()), |(key, spec)| {
        runtime.block_on(async {
            memory.artifacts.put(&key, "application/json", Bytes::from(spec)).await.unwrap();
            let outcome = inbox.on_object(&key, None, Some("etag")).await;
            let outcome = outcome.map_err(|err| TestCaseError::fail(format!("{key}: {err}")))?;
            let upload = Upload::parse(&key);
            counts.borrow_mut()[match outcome {
                InboxOutcome::Started(_) => 0,
                InboxOutcome::Refused { .. } => 1,
                InboxOutcome::Ignored(_) => 2,
            }] += 1;
            match &outcome {
                InboxOutcome::Started(id) => {
                    let upload = upload.ok_or_else(|| TestCaseError::fail(format!("a job from {key}")))?;
                    let job = kiln_app::ports::JobStore::get(&*memory.store, &JobId::parse(id).unwrap()).await.unwrap();
                    let job = job.ok_or_else(|| TestCaseError::fail("the started job is missing"))?;
                    prop_assert_eq!(&job.tenant_id, &upload.tenant, "a job for another tenant than {}", key);
                    prop_assert!(job.outboxes.contains(&upload.outbox()), "{:?}", job.outboxes);
                }
                InboxOutcome::Refused { .. } => {
                    let upload = upload.ok_or_else(|| TestCaseError::fail(format!("refused {key}")))?;
                    let error = format!("{}error.json", upload.outbox());
                    prop_assert!(memory.artifacts.keys().contains(&error), "no {} for {}", error, key);
                }
                InboxOutcome::Ignored(_) => {
                    let active = upload.is_some_and(|u| ["tenant-a", "tenant-b"].contains(&u.tenant.as_str()));
                    prop_assert!(!active, "an upload of an active tenant was ignored: {}", key);
                }
            }
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
