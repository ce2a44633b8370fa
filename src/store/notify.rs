//! Postgres LISTEN/NOTIFY: the changes other writers make to `promo_codes`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::Stream;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use super::Store;

/// The channel the `promo_codes` trigger notifies, with the code as payload.
pub(crate) const CODES_CHANNEL: &str = "voucher_operator_codes";
/// The payload of a campaign's bulk change on [`CODES_CHANNEL`]: any code
/// may have changed (never a code: codes hold no '*').
pub(crate) const ALL_CODES: &str = "*";
/// The prefix of a payload on [`CODES_CHANNEL`] that names a campaign (its
/// switch or its suspension changed: every code of it, at once) by its uid.
pub(crate) const CAMPAIGN_PREFIX: &str = "campaign:";
/// The prefix of a payload on [`CODES_CHANNEL`] that names a Voucher,
/// `voucher:<namespace>/<name>`: its code's binding was released without the
/// Voucher (the admin revoke of a Voucher GitOps keeps), so no row names it.
pub(crate) const VOUCHER_PREFIX: &str = "voucher:";

/// What a notification on [`CODES_CHANNEL`] says changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// One code (its row, or its suspension).
    Code(crate::domain::Code),
    /// Every code of the campaign with this uid.
    Campaign(String),
    /// The Voucher `namespace`/`name`, whose code is no longer bound to it.
    Voucher { namespace: String, name: String },
    /// Any code (a campaign's bulk statement), or a payload that names none.
    Any,
}

impl Changed {
    pub fn of(payload: &str) -> Self {
        if let Some(uid) = payload.strip_prefix(CAMPAIGN_PREFIX) {
            return Self::Campaign(uid.to_owned());
        }
        if let Some((namespace, name)) = payload
            .strip_prefix(VOUCHER_PREFIX)
            .and_then(|voucher| voucher.split_once('/'))
        {
            return Self::Voucher {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
        }
        match crate::domain::Code::parse(payload) {
            Ok(code) if payload != ALL_CODES => Self::Code(code),
            _ => Self::Any,
        }
    }
}
/// Wakes the Voucher `owner` once the transaction commits.
pub(crate) async fn wake_voucher(
    tx: &mut sqlx::PgConnection,
    owner: &crate::domain::Owner,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CODES_CHANNEL)
        .bind(format!("{VOUCHER_PREFIX}{owner}"))
        .execute(tx)
        .await
        .map(drop)
}

/// The channel the outbox trigger notifies.
pub(crate) const OUTBOX_CHANNEL: &str = "voucher_operator_outbox";

/// What a listener hears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// A notification with its payload.
    Payload(String),
    /// The connection was (re-)established: notifications sent while it was
    /// down are lost, so listeners should catch up by a full pass.
    Connected,
    /// The connection was lost: until `Connected`, changes go unheard.
    Disconnected,
}

impl Store {
    /// Listens on `channel` for as long as the stream is polled, reconnecting
    /// with backoff when the connection drops.
    pub fn listen(
        &self,
        channel: &'static str,
    ) -> impl Stream<Item = Notification> + Send + 'static {
        let pool = self.pool().clone();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            // 200 ms, 400 ms … at most 10 s, with jitter; from the start once connected.
            let policy = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times();
            let mut backoff = policy.build();
            loop {
                let connected = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(channel).await?;
                    Ok::<_, sqlx::Error>(listener)
                }
                .await;
                let mut listener = match connected {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::warn!(%error, channel, "cannot listen for database notifications; retrying");
                        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                };
                backoff = policy.build();
                if tx.send(Notification::Connected).await.is_err() {
                    return;
                }
                loop {
                    // `try_recv` reports a lost connection as `None` instead of
                    // silently reconnecting, so the gap is never hidden.
                    let received = tokio::select! {
                        // Nobody listens any more: stop quietly.
                        _ = tx.closed() => return,
                        received = listener.try_recv() => received,
                    };
                    match received {
                        Ok(Some(notification)) => {
                            let payload = Notification::Payload(notification.payload().to_owned());
                            if tx.send(payload).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::warn!(%error, channel, "database notification stream failed; reconnecting");
                        }
                    }
                    if tx.send(Notification::Disconnected).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        });
        tokio_stream_from(rx)
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_names_a_code_a_campaign_a_voucher_or_anything() {
        assert_eq!(
            Changed::of("LAUNCH-50"),
            Changed::Code(crate::domain::Code::parse("LAUNCH-50").unwrap())
        );
        assert_eq!(
            Changed::of("campaign:3f2a-uid"),
            Changed::Campaign("3f2a-uid".into())
        );
        assert_eq!(
            Changed::of("voucher:billing/launch-50"),
            Changed::Voucher {
                namespace: "billing".into(),
                name: "launch-50".into()
            }
        );
        assert_eq!(Changed::of(ALL_CODES), Changed::Any);
        assert_eq!(Changed::of("not a code"), Changed::Any);
    }
}
