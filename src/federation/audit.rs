//! The vendor's one audit stream (DESIGN §11): the hub's stream sources the
//! events of global codes from every Sovereign's own audit stream — only
//! those (`<prefix>.global.>`, see `relay::global_subject`), never a
//! Sovereign's own codes' — across JetStream domains. A source is
//! store-and-forward: a Sovereign cut off from the hub keeps its events in its
//! own stream, and they arrive when the link is back. `voucher-operator
//! events` against the hub reads them.

use async_nats::jetstream::{self, stream};

/// Where a Sovereign's events are delivered to the hub's stream:
/// `<prefix>.<sovereign>.…` (what a Sovereign's NATS account exports to the hub).
pub const DELIVER_PREFIX: &str = "voucher.audit.deliver";

/// What the hub gathers, and from whom.
#[derive(Clone, Debug)]
pub struct Gather {
    /// The hub's stream (in the hub's domain).
    pub stream: String,
    /// Each Sovereign's own audit stream (the same name on every one).
    pub sovereign_stream: String,
    /// The audit subject prefix, the same on every Sovereign.
    pub prefix: String,
    /// The Sovereigns, each its JetStream domain.
    pub sovereigns: Vec<String>,
    pub replicas: usize,
}

/// The hub's stream, as `gather` says it should be: one source per Sovereign.
pub fn stream_config(gather: &Gather) -> stream::Config {
    let sources = gather
        .sovereigns
        .iter()
        .map(|sovereign| stream::Source {
            name: gather.sovereign_stream.clone(),
            // A domain is reached through its API prefix (the server knows no "domain"
            // here), and each source is delivered on subjects of its own: sources of one
            // stream name would otherwise share them and mix their sequences (duplicates).
            external: Some(stream::External {
                api_prefix: format!("$JS.{sovereign}.API"),
                delivery_prefix: Some(format!("{DELIVER_PREFIX}.{sovereign}")),
            }),
            filter_subject: Some(format!("{}.global.>", gather.prefix)),
            ..Default::default()
        })
        .collect();
    stream::Config {
        name: gather.stream.clone(),
        sources: Some(sources),
        num_replicas: gather.replicas,
        description: Some(
            "voucher-operator: every Sovereign's audit events of global vouchers (CloudEvents 1.0)"
                .into(),
        ),
        ..Default::default()
    }
}

/// Creates the hub's stream, or brings its sources up to date (a Sovereign
/// added or removed).
pub async fn gather(js: &jetstream::Context, gather: &Gather) -> anyhow::Result<()> {
    let config = stream_config(gather);
    js.create_or_update_stream(config).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot create or update the hub's audit stream {}: {e}",
            gather.stream
        )
    })?;
    tracing::info!(stream = %gather.stream, sovereigns = ?gather.sovereigns,
        "gathering the audit events of global vouchers");
    Ok(())
}
