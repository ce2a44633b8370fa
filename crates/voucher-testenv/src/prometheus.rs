//! Prometheus and promtool, for the alert and dashboard tests and `voucher-dev
//! local --prometheus`: built from the upstream module (`tools/prometheus`),
//! a server scraping one loopback target every second with the chart's alert
//! rules loaded, its HTTP API on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::supervisor::{self, Signal};

/// `tools/prometheus/build.sh` of this checkout.
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tools/prometheus/build.sh"
);

/// The chart's alert rules, as Prometheus loads them.
pub const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../charts/voucher-operator/rules/voucher-operator.yaml"
);

/// The chart's Grafana dashboard.
pub const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../charts/voucher-operator/dashboards/voucher-operator.json"
);

/// The directory holding `prometheus` and `promtool`.
#[derive(Clone, Debug)]
pub struct Prometheus {
    pub dir: PathBuf,
}

impl Prometheus {
    /// `$VOUCHER_PROMETHEUS_BIN` when set (CI builds once before the tests),
    /// else the build script's cache under `target/`, building what is missing.
    pub fn find_or_build() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("VOUCHER_PROMETHEUS_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => crate::built::run_build_script(BUILD_SCRIPT, "Prometheus and promtool")?,
        };
        let prometheus = Self { dir };
        for binary in [prometheus.server(), prometheus.promtool()] {
            if !binary.is_file() {
                anyhow::bail!(
                    "{} is missing: build it with `bash tools/prometheus/build.sh`",
                    binary.display()
                );
            }
        }
        Ok(prometheus)
    }

    fn server(&self) -> PathBuf {
        self.dir.join("prometheus")
    }

    pub fn promtool(&self) -> PathBuf {
        self.dir.join("promtool")
    }

    /// The server: `dir` holds its configuration (scraping `target`, a
    /// `host:port` serving `/metrics`, every second, the chart's rules
    /// evaluated every second) and its data; its API on 127.0.0.1:`port`.
    pub fn server_command(&self, dir: &Path, target: &str, port: u16) -> anyhow::Result<Command> {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{RULES:?}]\n\
                 scrape_configs:\n\
                 \x20 - job_name: voucher-operator\n\
                 \x20   static_configs: [{{targets: [{target:?}]}}]\n"
            ),
        )?;
        let mut cmd = supervisor::command(self.server(), Signal::TERM);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            // It reads its (absent) web UI relative to the working directory.
            .current_dir(dir)
            .stdout(Stdio::null());
        Ok(cmd)
    }
}

/// Every query of the dashboard's panels (rows' own panels included), with
/// Grafana's `$__rate_interval` and `$__range` given: (panel title, query).
pub fn panel_queries(rate_interval: &str, range: &str) -> anyhow::Result<Vec<(String, String)>> {
    fn walk(
        panels: &serde_json::Value,
        rate: &str,
        range: &str,
        found: &mut Vec<(String, String)>,
    ) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let expr = expr
                        .replace("$__rate_interval", rate)
                        .replace("$__range", range);
                    let title = panel["title"].as_str().unwrap_or_default().to_owned();
                    found.push((title, expr));
                }
            }
            walk(&panel["panels"], rate, range, found);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD)?)?;
    let mut found = Vec::new();
    walk(&dashboard["panels"], rate_interval, range, &mut found);
    Ok(found)
}

/// Every rule of the chart: (alert name, expression).
pub fn rule_expressions() -> anyhow::Result<Vec<(String, String)>> {
    let rules: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(RULES)?)?;
    Ok(rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .map(|r| {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap_or_default();
            (
                name.to_owned(),
                r["expr"].as_str().unwrap_or_default().trim().to_owned(),
            )
        })
        .collect())
}
