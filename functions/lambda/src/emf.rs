//! CloudWatch Embedded Metric Format: a JSON log line that CloudWatch Logs turns into metrics,
//! with no SDK and no call (a function only writes it to stdout).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// One EMF line: `metrics` (name, value) counted in `namespace` under `dimensions`, at `at`.
pub fn line(namespace: &str, dimensions: &[(&str, &str)], metrics: &[(&str, f64)], at: DateTime<Utc>) -> String {
    let mut record = Map::new();
    record.insert(
        "_aws".into(),
        json!({
            "Timestamp": at.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [dimensions.iter().map(|(name, _)| *name).collect::<Vec<_>>()],
                "Metrics": metrics.iter().map(|(name, _)| json!({"Name": name, "Unit": "Count"})).collect::<Vec<_>>(),
            }],
        }),
    );
    for (name, value) in dimensions {
        record.insert((*name).into(), Value::from(*value));
    }
    for (name, value) in metrics {
        record.insert((*name).into(), json!(value));
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
