//! `voucher-dev local --prometheus`: Prometheus (built from its upstream
//! module) scraping the stack's `/metrics` every second with the chart's
//! alert rules loaded; the banner prints its URL and the dashboard's queries
//! ready to paste.

use voucher_testenv::prometheus::{Prometheus, panel_queries};
use voucher_testenv::supervisor::Signal;

use crate::stack::{self, Process, StackSettings};

/// Starts Prometheus on `--prometheus-port`, scraping the HTTP port's `/metrics`.
pub(crate) async fn start(settings: &StackSettings) -> anyhow::Result<Process> {
    let prometheus = Prometheus::find_or_build()?;
    let dir = settings.state_dir.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let target = format!("127.0.0.1:{}", settings.http_port);
    let log = dir.join("prometheus.log");
    let cmd = prometheus.server_command(&dir, &target, settings.prometheus_port)?;
    let mut process = stack::spawn(cmd, &log, "prometheus", Signal::TERM)?;
    stack::wait_for_port(&mut process, settings.prometheus_port, &log).await?;
    Ok(process)
}

/// The banner's part: where Prometheus is and each panel's query.
pub(crate) fn print_try(settings: &StackSettings) -> anyhow::Result<()> {
    let port = settings.prometheus_port;
    println!(
        "\nPrometheus scrapes the operator every second (http://127.0.0.1:{port}, its API; the \
         alert rules of charts/voucher-operator/rules are loaded). The dashboard's queries:\n"
    );
    for (title, expr) in panel_queries("1m", "1h")? {
        println!("# {title}\n{expr}");
    }
    println!(
        "\ncurl -s http://127.0.0.1:{port}/api/v1/query --data-urlencode 'query=sum by (outcome) (rate(voucher_operator_http_redemptions_total[1m]))'\n\
         curl -s http://127.0.0.1:{port}/api/v1/alerts      # the alerts firing now"
    );
    Ok(())
}

/// `--smoke --prometheus`: the smoke run's redemption reached Prometheus, and every panel's
/// query answers.
pub(crate) async fn smoke(settings: &StackSettings) -> anyhow::Result<()> {
    let base = format!("http://127.0.0.1:{}", settings.prometheus_port);
    let query = |expr: String| {
        let base = base.clone();
        async move {
            let mut url = reqwest::Url::parse(&format!("{base}/api/v1/query"))?;
            url.query_pairs_mut().append_pair("query", &expr);
            let answer: serde_json::Value = reqwest::get(url).await?.json().await?;
            anyhow::Ok(answer)
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let granted = "voucher_operator_http_redemptions_total{outcome=\"granted\"}";
    while query(granted.into()).await?["data"]["result"]
        .as_array()
        .is_none_or(|r| r.is_empty())
    {
        stack::wait_until(deadline, "the redemption in Prometheus").await?;
    }
    println!("smoke: Prometheus scraped the redemption ({granted})");
    for (title, expr) in panel_queries("1m", "1h")? {
        let answer = query(expr.clone()).await?;
        if answer["status"] != "success" {
            anyhow::bail!("smoke: the panel {title:?} does not evaluate: {expr}: {answer}");
        }
    }
    println!("smoke: every panel of the dashboard evaluates");
    Ok(())
}
