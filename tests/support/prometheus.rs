//! A Prometheus of the test's own (`tools/prometheus/build.sh`, once per
//! machine) scraping one loopback target every second with the chart's alert
//! rules loaded; its HTTP API, for the expressions of the alerts and the
//! dashboard.

use std::time::Duration;

use serde_json::Value;
use voucher_testenv::prometheus::Prometheus;

use super::Signal;

pub struct Server {
    pub base: String,
    http: reqwest::Client,
}

/// Starts Prometheus scraping `target` (`host:port` serving `/metrics`).
pub fn start(target: &str) -> Server {
    let prometheus = Prometheus::find_or_build().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = super::scratch_dir("prometheus");
    let port = super::free_port();
    let mut cmd = prometheus
        .server_command(&dir, target, port)
        .expect("write prometheus.yml");
    cmd.stderr(super::log_file(dir.join("prometheus.log")));
    super::supervise(cmd, Signal::TERM, dir.clone());
    super::wait_for_port(port, "prometheus", &dir.join("prometheus.log"));
    Server {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    }
}

impl Server {
    /// `GET /api/v1/query?query=expr`: the whole answer (status, data,
    /// warnings, infos), whatever its HTTP status.
    pub async fn query(&self, expr: &str) -> Value {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", self.base)).unwrap();
        url.query_pairs_mut().append_pair("query", expr);
        let response = self
            .http
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("Prometheus answers");
        response.json().await.expect("a JSON answer")
    }

    /// The series `expr` returns now (none on an error).
    pub async fn series(&self, expr: &str) -> Vec<Value> {
        self.query(expr).await["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}
