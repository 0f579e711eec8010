//! CloudWatch Embedded Metric Format: a JSON log line that CloudWatch Logs turns into metrics,
//! with no SDK and no call (a function only writes it to stdout).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// One measured value and its CloudWatch unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric<'a> {
    pub name: &'a str,
    pub value: f64,
    pub unit: &'static str,
}

impl<'a> Metric<'a> {
    pub fn count(name: &'a str, value: f64) -> Self {
        Self { name, value, unit: "Count" }
    }

    pub fn milliseconds(name: &'a str, value: f64) -> Self {
        Self { name, value, unit: "Milliseconds" }
    }
}

/// One EMF line: `metrics` (name, value) counted in `namespace` under `dimensions`, at `at`.
pub fn line(namespace: &str, dimensions: &[(&str, &str)], metrics: &[(&str, f64)], at: DateTime<Utc>) -> String {
    let metrics: Vec<Metric> = metrics.iter().map(|(name, value)| Metric::count(name, *value)).collect();
    line_of(namespace, dimensions, &metrics, at)
}

/// One EMF line of `metrics`, each with its unit.
pub fn line_of(namespace: &str, dimensions: &[(&str, &str)], metrics: &[Metric], at: DateTime<Utc>) -> String {
    let mut record = Map::new();
    record.insert(
        "_aws".into(),
        json!({
            "Timestamp": at.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [dimensions.iter().map(|(name, _)| *name).collect::<Vec<_>>()],
                "Metrics": metrics.iter().map(|m| json!({"Name": m.name, "Unit": m.unit})).collect::<Vec<_>>(),
            }],
        }),
    );
    for (name, value) in dimensions {
        record.insert((*name).into(), Value::from(*value));
    }
    for metric in metrics {
        record.insert(metric.name.into(), json!(metric.value));
    }
    Value::Object(record).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_its_metrics_and_dimensions() {
        let at = DateTime::from_timestamp_millis(1_796_000_000_000).unwrap();
        let line: Value =
            serde_json::from_str(&line("kiln", &[("QueueName", "kiln-jobs")], &[("SchedulableBacklog", 3.0)], at))
                .unwrap();
        assert_eq!(line["_aws"]["Timestamp"], 1_796_000_000_000i64);
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "kiln");
        assert_eq!(directive["Dimensions"], json!([["QueueName"]]));
        assert_eq!(directive["Metrics"], json!([{"Name": "SchedulableBacklog", "Unit": "Count"}]));
        assert_eq!((line["QueueName"].as_str(), line["SchedulableBacklog"].as_f64()), (Some("kiln-jobs"), Some(3.0)));
    }
}
