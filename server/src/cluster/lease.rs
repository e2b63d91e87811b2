//! The ruler lease: one node at a time sends alert notifications.
//!
//! A JetStream stream (`<name>_leases`, as many copies as the partitions' streams) keeping one
//! message per subject, each expiring `LEASE_TTL` after it was written: a compare-and-set
//! register, as JetStream's key-value buckets are built (used directly: the key-value API of
//! the client does not read 2.9's answers). A node takes the lease by publishing to the
//! subject expecting no message on it (only one such publish succeeds), keeps it by
//! publishing again expecting the sequence it last wrote (a stale one is refused: it was lost
//! meanwhile), and a holder that stops renewing — killed, cut off from NATS — loses it when
//! its message expires; the next take then succeeds on another node.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use tokio::sync::watch;

/// How long a lease outlives its holder's last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the holder renews, and others try to take it.
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// The subject of the ruler lease, under the cluster's name.
const RULER: &str = "lease.ruler";

/// Holds or waits for the ruler lease for node `node` until `stop`, telling `holding` whether
/// this node has it.
pub async fn run(
    js: async_nats::jetstream::Context,
    name: String,
    replicas: usize,
    node: String,
    holding: watch::Sender<bool>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let subject = format!("{name}.{RULER}");
    let mut revision: Option<u64> = None;
    let mut register = super::register::Register::new(
        js.clone(),
        format!("{name}_leases"),
        format!("{name}.lease.>"),
        LEASE_TTL,
        replicas,
        RENEW_EVERY,
    );
    while register.next(&mut stop).await {
        // Taking expects no message on the subject; renewing expects our own.
        let publish = PublishMessage::build()
            .payload(bytes::Bytes::from(node.clone()))
            .expected_last_subject_sequence(revision.unwrap_or(0));
        let written = match js.send_publish(subject.clone(), publish).await {
            Ok(ack) => ack.await.map(|a| a.sequence).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        revision = match (written, revision) {
            (Ok(seq), _) => Some(seq),
            (Err(e), Some(_)) => {
                tracing::warn!(error = %e, "lost the ruler lease");
                None
            }
            (Err(_), None) => None,
        };
        metrics.ruler_lease.set(i64::from(revision.is_some()));
        holding.send_if_modified(|h| {
            let now = revision.is_some();
            let changed = *h != now;
            *h = now;
            changed
        });
    }
    // Hand the lease over at once rather than after it expires.
    if let Some(rev) = revision {
        if let Ok(leases) = js.get_stream(format!("{name}_leases")).await {
            let _ = leases.delete_message(rev).await;
        }
    }
    metrics.ruler_lease.set(0);
    holding.send_replace(false);
}
