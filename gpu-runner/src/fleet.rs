//! What this runner tells the fleet board of its capacity per model, for the API's queue
//! estimates (`kiln-app::eta`): its slots, how many are taken, its render time per GPU-work
//! unit (from every job it renders, the warm-up's first), and the units per second it finishes
//! while every slot is taken (measured over report windows that began and ended saturated).

use chrono::Utc;
use kiln_app::ports::{FleetBoard, RunnerReport};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Weight of the newest sample in the moving averages.
const SMOOTHING: f64 = 0.3;
/// A report older than this is someone else's to forget: its runner stopped reporting.
const FORGET_AFTER: chrono::Duration = chrono::Duration::minutes(10);

/// Least saturated time one throughput sample spans: shorter windows would mostly count a
/// job's end or none (a window with none is no sample, so short ones would overstate).
const SAMPLE_SPAN: Duration = Duration::from_secs(10);

/// Per model: what it has rendered since the last report, and the averages so far.
#[derive(Debug, Default)]
struct ModelSpeed {
    ms_per_unit: Option<f64>,
    units_per_sec: Option<f64>,
    units_since_report: u64,
    /// Saturated time and the units finished in it, gathered toward a sample.
    gathered: (Duration, u64),
}

fn smooth(average: Option<f64>, sample: f64) -> f64 {
    average.map_or(sample, |average| average + SMOOTHING * (sample - average))
}

/// This runner's render speed per model, fed by its jobs.
#[derive(Debug, Default)]
pub struct Speeds {
    models: Mutex<HashMap<String, ModelSpeed>>,
}

impl Speeds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ModelSpeed>> {
        self.models.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A job of `model` costing `units` rendered in `render_time`.
    pub fn rendered(&self, model: &str, units: u64, render_time: Duration) {
        let mut models = self.lock();
        let speed = models.entry(model.to_owned()).or_default();
        let sample = render_time.as_secs_f64() * 1000.0 / units.max(1) as f64;
        speed.ms_per_unit = Some(smooth(speed.ms_per_unit, sample));
        speed.units_since_report += units;
    }

    /// Closes a report window of `elapsed` for every model: when the runner was saturated all
    /// along, the window counts toward a throughput sample, taken once [`SAMPLE_SPAN`] of such
    /// windows have gathered (what they finished over how long they lasted).
    fn close_window(&self, elapsed: Duration, saturated: bool) -> Vec<(String, Option<f64>, Option<f64>)> {
        let mut models = self.lock();
        models
            .iter_mut()
            .map(|(model, speed)| {
                let done = std::mem::take(&mut speed.units_since_report);
                if saturated {
                    speed.gathered = (speed.gathered.0 + elapsed, speed.gathered.1 + done);
                    let (span, units) = speed.gathered;
                    if span >= SAMPLE_SPAN && units > 0 {
                        speed.units_per_sec = Some(smooth(speed.units_per_sec, units as f64 / span.as_secs_f64()));
                        speed.gathered = (Duration::ZERO, 0);
                    }
                }
                (model.clone(), speed.ms_per_unit, speed.units_per_sec)
            })
            .collect()
    }
}

/// A model version's place on the fleet board.
pub fn board_key(model: &str, version: &str) -> String {
    kiln_app::eta::board_key(model, version)
}

/// Who this runner is on the board: its host, its process and when it asked (a restarted
/// runner is a new one; the old entry ages out).
pub fn runner_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|host| host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect())
        .filter(|host: &String| !host.is_empty())
        .unwrap_or_else(|| "runner".to_owned());
    static ASKED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let nth = ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{host}-{:x}-{:x}", std::process::id(), nanos ^ nth)
}

/// Reports every `every` until `shutdown` for each of `models` (those it serves, each from the
/// start, so a runner that has not rendered yet is known to exist), forgetting runners whose
/// reports have gone stale.
pub async fn report(
    board: Arc<dyn FleetBoard>,
    speeds: Arc<Speeds>,
    metrics: Arc<Metrics>,
    models: Vec<String>,
    slots: usize,
    every: Duration,
    shutdown: CancellationToken,
) {
    let runner = runner_id();
    let mut stale: HashMap<String, Vec<String>> = HashMap::new();
    let mut window = Instant::now();
    let saturated = |metrics: &Metrics| metrics.held.get() > 0 || metrics.in_flight.get() as usize >= slots;
    let mut was_saturated = saturated(&metrics);
    let mut first = true;
    loop {
        // The first report at once (the runner is known before it renders), then every `every`.
        if !std::mem::take(&mut first) {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
        let now_saturated = saturated(&metrics);
        let closed = speeds.close_window(window.elapsed(), was_saturated && now_saturated);
        (window, was_saturated) = (Instant::now(), now_saturated);
        let speed_of: HashMap<String, (Option<f64>, Option<f64>)> =
            closed.into_iter().map(|(model, ms, units)| (model, (ms, units))).collect();
        let busy = (metrics.in_flight.get().max(0) + metrics.held.get().max(0)) as u32;
        for model in &models {
            let (ms_per_unit, units_per_sec) = speed_of.get(model).copied().unwrap_or_default();
            let entry = RunnerReport {
                runner: runner.clone(),
                slots: slots as u32,
                busy,
                units_per_sec,
                ms_per_unit,
                at: Utc::now(),
            };
            let forget = stale.remove(model).unwrap_or_default();
            match board.report(model, &entry, &forget).await {
                Ok(board) => {
                    let old: Vec<String> =
                        board.into_iter().filter(|r| Utc::now() - r.at > FORGET_AFTER).map(|r| r.runner).collect();
                    stale.insert(model.clone(), old);
                    debug!(model, busy, ?units_per_sec, ?ms_per_unit, "capacity reported");
                }
                Err(err) => warn!(model, error = %err, "reporting capacity failed; estimates go on without it"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_sampled_only_over_saturated_windows() {
        let speeds = Speeds::default();
        speeds.rendered("m", 10, Duration::from_millis(500));
        speeds.rendered("m", 10, Duration::from_millis(1000));
        // 50 ms per unit, then 100: the average moves 30% of the way.
        let closed = speeds.close_window(Duration::from_secs(2), false);
        assert_eq!(closed, [("m".to_owned(), Some(65.0), None)], "not saturated: no throughput sample");
        // Saturated windows gather until they span 10 s, those that finished nothing included.
        speeds.rendered("m", 30, Duration::from_millis(3000));
        assert_eq!(speeds.close_window(Duration::from_secs(4), true)[0].2, None, "4 s gathered");
        assert_eq!(speeds.close_window(Duration::from_secs(4), true)[0].2, None, "8 s, nothing more finished");
        speeds.rendered("m", 20, Duration::from_millis(2000));
        assert_eq!(speeds.close_window(Duration::from_secs(2), true)[0].2, Some(5.0), "50 units in 10 s");
        speeds.rendered("m", 10, Duration::from_millis(1000));
        speeds.close_window(Duration::from_secs(5), false);
        assert_eq!(
            speeds.close_window(Duration::from_secs(10), true)[0].2,
            Some(5.0),
            "an unsaturated window's units are not counted"
        );
    }

    #[test]
    fn a_runner_id_is_its_host_and_a_suffix() {
        let (a, b) = (runner_id(), runner_id());
        assert_ne!(a, b);
        assert!(a.len() > 7 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'), "{a}");
    }
}
