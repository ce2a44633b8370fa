//! What each subcommand does, once its flags are parsed.

use super::{
    AuditOptions, CampaignCodesOptions, ControllerOptions, DatabaseOptions, EventsOptions,
    ExportOptions, JoinOptions, ReportOptions, ServerOptions,
};
use crate::api;
use crate::store::{DatabaseSettings, Store};

/// Connects and, unless told not to, brings the schema up to date.
pub(super) async fn open_store(database: &DatabaseOptions) -> anyhow::Result<Store> {
    let store = Store::connect(&database.settings()).await?;
    if !database.skip_migrations {
        store.migrate().await?;
    }
    Ok(store)
}

/// A Sovereign's controller joined to the vendor's hub over NATS, when
/// `--sovereign` names it.
async fn join_hub(
    options: &ControllerOptions,
    join: &JoinOptions,
    audit: &AuditOptions,
) -> anyhow::Result<Option<crate::federation::Joined>> {
    use crate::federation::{Joined, allotment, sovereign::Refill};
    let federation = &options.federation;
    let Some(sovereign) = join.sovereign.clone() else {
        return Ok(None);
    };
    let client = connect_nats(&audit.stream).await?;
    let refill = Refill {
        sovereign,
        prefix: allotment::SUBJECT_PREFIX.to_owned(),
        low_water: federation.allotment_low_water,
        step: federation.allotment_step,
        timeout: std::time::Duration::from_secs(2),
    };
    Ok(Some(Joined {
        client,
        refill,
        every: federation.allotment_interval,
    }))
}

/// A Sovereign's server joined to the vendor's hub for once-per-customer-
/// anywhere redemptions, when `--sovereign` and `--claim-key-file` say so.
pub(super) async fn join_claims(
    join: &JoinOptions,
    stream: &super::StreamOptions,
) -> anyhow::Result<Option<crate::federation::claimer::Claimer>> {
    use crate::federation::claims;
    let (Some(sovereign), Some(path)) = (&join.sovereign, &join.claim_key_file) else {
        return Ok(None);
    };
    let key = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read --claim-key-file {}: {e}", path.display()))?;
    if key.len() < 32 {
        anyhow::bail!(
            "--claim-key-file {} holds {} bytes: the vendor's claim key needs at least 32 (e.g. \
             head -c 32 /dev/urandom), the same file on every Sovereign",
            path.display(),
            key.len()
        );
    }
    Ok(Some(crate::federation::claimer::Claimer {
        client: connect_nats(stream).await?,
        sovereign: sovereign.clone(),
        prefix: claims::SUBJECT_PREFIX.to_owned(),
        key,
        timeout: std::time::Duration::from_secs(2),
        recover_after: join.claim_recovery_after,
    }))
}

async fn connect_nats(stream: &super::StreamOptions) -> anyhow::Result<async_nats::Client> {
    let connect = crate::relay::connect_options(&stream.auth()).await?;
    connect
        .connect(stream.nats_url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {}: {e}", stream.nats_url))
}

/// `hub`: the vendor's hub, until a signal.
pub(super) async fn run_hub(
    options: &super::HubOptions,
    stream: &super::StreamOptions,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot configure the Kubernetes client: {e}: set KUBECONFIG, or run in a cluster"
        )
    })?;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let metrics_listener = crate::telemetry::bind(options.metrics_address).await?;
    let nats = connect_nats(stream).await?;
    let shutdown = crate::telemetry::shutdown_signal();
    // Ready once connected: the hub answers from the bucket it opens at start.
    let telemetry = tokio::spawn(crate::telemetry::serve(
        metrics_listener,
        Arc::new(prometheus_client::registry::Registry::default()),
        Arc::new(AtomicBool::new(true)),
        shutdown.clone(),
    ));
    let ran =
        crate::federation::hub::run(client, nats, options.settings(stream), shutdown.clone()).await;
    shutdown.cancel();
    telemetry.await??;
    Ok(ran?)
}

pub(super) async fn run_controller(
    store: Store,
    mut settings: crate::controller::Settings,
    options: &ControllerOptions,
    join: &JoinOptions,
    audit: AuditOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::controller::{self, Role};

    let metrics_listener = crate::telemetry::bind(options.metrics_address).await?;

    let config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot configure the Kubernetes client ({}): set KUBECONFIG, or run in a cluster",
            crate::telemetry::root_cause(&e)
        )
    })?;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .map_err(|e| anyhow::anyhow!("cannot configure the Kubernetes client for {server}: {e}"))?;
    controller::check_api(&client, &server, options.watch_namespace.as_deref()).await?;

    settings.joined = join_hub(options, join, &audit).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let identity = options.identity();
    let config = controller::Config {
        settings,
        relay: audit.audit_relay.then(|| audit.settings()),
        lease: options.lease(),
    };
    let role = Role::new(client, store, config, &mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let telemetry = tokio::spawn(crate::telemetry::serve(
        metrics_listener,
        Arc::new(registry),
        ready.clone(),
        shutdown.clone(),
    ));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "controller started");
    role.run(shutdown.clone()).await?;
    shutdown.cancel();
    telemetry.await??;
    Ok(())
}

pub(super) async fn run_server(
    store: Store,
    settings: crate::server::ServerSettings,
    options: &ServerOptions,
    claimer: Option<crate::federation::claimer::Claimer>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use crate::server::{self, Role};

    // The admin endpoints need the Kubernetes API; without it they answer 503.
    let kube = match kube::Client::try_default().await {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::warn!(%error, "no Kubernetes API: the admin issue and revoke endpoints will answer 503");
            None
        }
    };
    let config = server::Config {
        settings,
        auth: options.auth(),
        listen: options.listen_address,
        admin: options.admin_address,
        metrics: options.server_metrics_address,
        claimer,
    };
    let registry = prometheus_client::registry::Registry::default();
    let role = Role::new(store, kube, config, registry).await?;
    let served = role.run(shutdown.clone()).await;
    shutdown.cancel();
    served
}

pub(super) async fn print_events(options: EventsOptions) -> anyhow::Result<()> {
    // Checked before any connection, and before any output.
    let code = options
        .code
        .as_deref()
        .map(super::events::subject_of)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--code: {e}"))?;
    let query = crate::events::EventQuery {
        code,
        kind: options.kind.clone(),
        since: options.since,
        follow: options.follow,
    };
    let mut table = super::events::EventTable::new(
        std::io::stdout().lock(),
        options.json,
        options.utc,
        options.tail,
    );
    let followed = crate::events::follow_events(
        &options.stream.nats_url,
        &options.stream.auth(),
        &options.stream.audit_stream,
        &options.stream.audit_subject_prefix,
        &query,
        &mut table,
    )
    .await;
    match followed {
        // The reader went away (`| head`): done, quietly.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        Err(error) => Err(error),
        Ok(()) => {
            if table.printed == 0 {
                note!("no audit events match");
            }
            Ok(())
        }
    }
}

/// The finance report of `options`' period, as CSV on standard output.
pub(super) async fn report(options: ReportOptions) -> anyhow::Result<()> {
    if options.to <= options.from {
        anyhow::bail!("--to must be later than --from");
    }
    let store = Store::connect(&DatabaseSettings {
        url: options.database_url.clone(),
        max_connections: 1,
        ..Default::default()
    })
    .await?;
    let rows = store
        .report((options.from, options.to), options.namespace.as_deref())
        .await?;
    let mut out =
        String::from("code,namespace,redemptions,credit_omr,discount,currency,reversals\n");
    for row in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            row.code,
            row.namespace,
            row.redemptions,
            row.credit_omr,
            row.discount,
            options.currency.as_str(),
            row.reversals
        ));
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Who downloads codes, for the audit record: the Kubernetes user the API server
/// authenticated (it read the key), else the local account.
async fn who_reads(client: &kube::Client) -> String {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = kube::Api::<SelfSubjectReview>::all(client.clone())
        .create(&Default::default(), &SelfSubjectReview::default())
        .await;
    match review.ok().and_then(|r| r.status?.user_info?.username) {
        Some(user) => format!("Kubernetes user {user}"),
        None => match std::env::var("USER") {
            Ok(user) if !user.is_empty() => format!("local user {user}"),
            // The owner of this process's /proc entry is its user id (no libc call needed).
            _ => {
                use std::os::unix::fs::MetadataExt;
                let uid = std::fs::metadata("/proc/self").map(|m| m.uid());
                uid.map_or_else(
                    |_| "local user unknown".into(),
                    |uid| format!("local uid {uid}"),
                )
            }
        },
    }
}

pub(super) async fn export(options: ExportOptions) -> anyhow::Result<()> {
    let store = Store::connect(&DatabaseSettings {
        url: options.database_url.clone(),
        max_connections: 1,
        ..Default::default()
    })
    .await?;
    let rows = store.export_rows(options.include_deleted).await?;
    // A code a Voucher owns already is managed: exporting it again would make
    // a second Voucher that can only conflict with the first.
    let owners = store.export_owners().await?;
    let mut out = String::from(
        "# Exported by `voucher-operator export` from the billing database's promo_codes.\n\
         # Applying these adopts each code: times_redeemed and created_at stay as they are.\n",
    );
    let mut names = std::collections::BTreeMap::new();
    let (mut written, mut skipped) = (0, 0);
    for row in &rows {
        if let Some(bound) = owners.bound.get(&row.code) {
            let owner = &bound.owner;
            out.push_str(&format!(
                "# {} is owned by Voucher {}/{} (deletionPolicy {}): not exported\n",
                row.code,
                owner.namespace,
                owner.name,
                bound.deletion_policy.as_str()
            ));
            note!(
                "skipped {:?}: owned by Voucher {}/{}",
                row.code,
                owner.namespace,
                owner.name
            );
            skipped += 1;
            continue;
        }
        let mut voucher = match api::voucher_for(row, &options.namespace) {
            Ok(voucher) => voucher,
            Err(reason) => {
                note!("skipped {:?}: {reason}", row.code);
                skipped += 1;
                continue;
            }
        };
        let name = voucher.metadata.name.clone().unwrap_or_default();
        if let Some(first) = names.insert(name.clone(), row.code.clone()) {
            note!(
                "skipped {:?}: it names the same Voucher ({name}) as {first:?}",
                row.code
            );
            skipped += 1;
            continue;
        }
        out.push_str("---\n");
        if row.is_tombstoned() {
            out.push_str("# soft-deleted in the billing database: exported inactive\n");
        }
        let orphaned = owners.orphaned.get(&row.code);
        // A row soft-deleted since was revoked: that is the last word, not the release.
        if let Some(release) = orphaned.filter(|_| !row.is_tombstoned()) {
            // As its last owner chose: deleting the adopting Voucher leaves the code too.
            out.push_str(&format!(
                "# released by Voucher {}/{} with deletionPolicy Orphan at {}: exported with Orphan\n",
                release.namespace,
                release.name,
                release.released_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
            voucher.spec.deletion_policy = api::DeletionPolicy::Orphan;
        }
        out.push_str(&serde_yaml::to_string(&voucher)?);
        written += 1;
    }
    match &options.output {
        Some(path) => std::fs::write(path, out)?,
        None => print!("{out}"),
    }
    note!("exported {written} code(s), skipped {skipped}");
    Ok(())
}

pub(super) async fn campaign_codes(options: CampaignCodesOptions) -> anyhow::Result<()> {
    use crate::domain::campaign::CodeRange;

    let (client, campaign) = find_campaign(&options).await?;
    let (namespace, name) = (&campaign.namespace, &campaign.name);
    let found = campaign.resource;
    let owner = crate::controller::owner(&found)?;
    let count = u32::try_from(found.spec.count).unwrap_or_default();
    let generator = crate::controller::campaign::generator(
        &client,
        &options.key_namespace,
        &found,
        &owner,
        count,
    )
    .await
    .map_err(|why| anyhow::anyhow!(why))?;
    let store = Store::connect(&DatabaseSettings {
        url: options.database_url.clone(),
        max_connections: 1,
        ..Default::default()
    })
    .await?;
    if options.from > count {
        anyhow::bail!(
            "--from is {}, but the campaign has {count} code(s)",
            options.from
        );
    }
    // Another key would derive other codes, none of them the campaign's: say so at once.
    let recorded = store.find_campaign(namespace, name).await?;
    if let Some(recorded) = recorded.filter(|r| r.owner.uid == owner.uid)
        && recorded
            .key_fingerprint
            .is_some_and(|f| f != generator.fingerprint())
    {
        anyhow::bail!(
            "the key in the Secret {}/{} is not the one that generated the codes of \
             VoucherCampaign {namespace}/{name}; put that key back (or download the codes from \
             the admin endpoint, which needs no key)",
            options.key_namespace,
            found.spec.key_secret_ref.name
        );
    }
    let to = options
        .from
        .saturating_add(options.limit.unwrap_or(u32::MAX))
        .min(count);
    let range = CodeRange::new(options.from, to);
    let subject = format!(
        "voucher-operator campaign codes ({})",
        who_reads(&client).await
    );
    store
        .audit_campaign_download(&owner, &subject, range)
        .await?;
    let Some((printed, missing)) = print_codes(&store, &owner, &generator, range).await? else {
        // The reader went away (`| head`): done, quietly.
        return Ok(());
    };
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(10).map(u32::to_string).collect();
        anyhow::bail!(
            "{} of {} code(s) are not live codes of VoucherCampaign {namespace}/{name} in the \
             billing database (not generated yet, revoked, or issued by another) and were not \
             printed; their indices: {}{}",
            missing.len(),
            range.count,
            shown.join(", "),
            if missing.len() > 10 { ", …" } else { "" }
        );
    }
    note!("printed {printed} code(s) of VoucherCampaign {namespace}/{name}");
    Ok(())
}

/// A VoucherCampaign found by `campaign codes`.
struct FoundCampaign {
    namespace: String,
    name: String,
    resource: crate::api::campaign::VoucherCampaign,
}

/// The campaign `options` names, from the Kubernetes API.
async fn find_campaign(
    options: &CampaignCodesOptions,
) -> anyhow::Result<(kube::Client, FoundCampaign)> {
    use crate::api::campaign::VoucherCampaign;

    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot configure the Kubernetes client ({}): set KUBECONFIG",
            crate::telemetry::root_cause(&e)
        )
    })?;
    let namespace = options
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let name = options.name.clone();
    let found = kube::Api::<VoucherCampaign>::namespaced(client.clone(), &namespace)
        .get_opt(&name)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read VoucherCampaign {namespace}/{name}: {e}"))?;
    let Some(resource) = found else {
        anyhow::bail!(
            "there is no VoucherCampaign {namespace}/{name} (kubectl get vouchercampaigns -n {namespace})"
        );
    };
    Ok((
        client,
        FoundCampaign {
            namespace,
            name,
            resource,
        },
    ))
}

/// Prints the codes of `range` that are live codes of the campaign, chunk by
/// chunk: how many were printed and the indices of those that are not;
/// `None` when the reader went away.
async fn print_codes(
    store: &Store,
    owner: &crate::domain::Owner,
    generator: &crate::domain::campaign::Generator,
    range: crate::domain::campaign::CodeRange,
) -> anyhow::Result<Option<(u32, Vec<u32>)>> {
    use std::io::Write as _;

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut missing = Vec::new();
    let mut printed = 0u32;
    let mut written: std::io::Result<()> = writeln!(out, "code");
    let mut from = range.from;
    while written.is_ok() && from < range.to {
        let end = range.to.min(from + crate::store::campaigns::CHUNK as u32);
        let codes: Vec<_> = (from..end).map(|i| generator.code(i)).collect();
        let held = store.campaign_holds(owner, &codes).await?;
        for (i, (code, live)) in (from..end).zip(codes.iter().zip(held)) {
            if !live {
                missing.push(i);
                continue;
            }
            written = writeln!(out, "{code}");
            if written.is_err() {
                break;
            }
            printed += 1;
        }
        from = end;
    }
    match written.and_then(|()| out.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(None),
        Err(error) => Err(error.into()),
        Ok(()) => Ok(Some((printed, missing))),
    }
}
