//! `accelctl metrics`: the daemon's Prometheus metrics, as text or (`--json`) as samples.

use hyper::Method;

use crate::client::{Client, CtlError};
use crate::output;

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (_, body) = client.request(Method::GET, "/metrics", None).await?;
    let text = String::from_utf8_lossy(&body);
    if json {
        println!("{}", output::json(&samples(&text)));
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Parses exposition text into `[{"name", "labels", "value"}]`; comments are skipped.
fn samples(text: &str) -> serde_json::Value {
    let parsed: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some(serde_json::json!({
                "name": name,
                "labels": labels,
                "value": value.parse::<f64>().ok(),
            }))
        })
        .collect();
    serde_json::Value::Array(parsed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_split_name_labels_value() {
        let v = super::samples("# HELP x y\nx_total{a=\"b\"} 3\nup 1\n");
        assert_eq!(v[0]["name"], "x_total");
        assert_eq!(v[0]["labels"], "a=\"b\"");
        assert_eq!(v[0]["value"], 3.0);
        assert_eq!(v[1]["name"], "up");
        assert_eq!(v.as_array().map(Vec::len), Some(2));
    }
}
