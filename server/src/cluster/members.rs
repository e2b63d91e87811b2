//! Membership: who is in the cluster now.
//!
//! Each node announces itself every few seconds on `<name>.member.<node_id>` in the stream
//! `<name>_members`, which keeps one message per subject and drops it `MEMBER_TTL` after it
//! was written: a node that stops announcing (killed, cut off from NATS) leaves the list by
//! itself, and one that stops cleanly removes its entry at once. The list is what
//! `GET /api/v1/status/cluster` shows: each member's roles, addresses and version.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::config::Role;
use crate::clock::{Clock, SystemClock};

/// How long a member stays listed after its last announcement.
pub const MEMBER_TTL: Duration = Duration::from_secs(15);
/// How often a node announces itself.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);
/// Members listed at most (a cluster is a handful of nodes; this bounds a status request).
const MAX_MEMBERS: usize = 1024;

/// What a node says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// `cluster.node_id`.
    pub node_id: String,
    /// What it does.
    pub roles: Vec<Role>,
    /// Its bound gRPC (native and OTLP) address.
    pub grpc: String,
    /// Its bound HTTP address (queries, alerts, metrics).
    pub http: String,
    /// Its bound OTLP/HTTP address.
    pub otlp_http: String,
    /// The tailscope version it runs.
    pub version: String,
    /// When it started (Unix seconds).
    pub started_unix_seconds: i64,
    /// When it last announced itself (Unix seconds).
    pub announced_unix_seconds: i64,
    /// A store that is leaving: it still answers for its partitions, but they have new
    /// owners, which read it until they have caught up.
    #[serde(default)]
    pub draining: bool,
}

impl Member {
    /// This node, as `config` and its bound listeners describe it, starting now.
    pub fn me(config: &super::ClusterConfig, bound: super::Bound) -> Member {
        Member {
            node_id: config.node_id.clone(),
            roles: config.roles.clone(),
            grpc: bound.grpc.to_string(),
            http: bound.http.to_string(),
            otlp_http: bound.otlp_http.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_unix_seconds: SystemClock.now_seconds(),
            announced_unix_seconds: 0,
            draining: false,
        }
    }
}

fn stream_name(name: &str) -> String {
    format!("{name}_members")
}

fn subject(name: &str, node: &str) -> String {
    format!("{name}.member.{node}")
}

/// Announces `me` every few seconds (and at once when `draining` is set) until `stop`, then
/// withdraws it.
pub async fn run(
    js: async_nats::jetstream::Context,
    name: String,
    replicas: usize,
    mut me: Member,
    mut draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let subject = subject(&name, &me.node_id);
    let mut register = super::register::Register::new(
        js.clone(),
        stream_name(&name),
        self::subject(&name, "*"),
        MEMBER_TTL,
        replicas,
        ANNOUNCE_EVERY,
    );
    let mut watching = true;
    loop {
        tokio::select! {
            due = register.next(&mut stop) => if !due { break },
            changed = draining.changed(), if watching => {
                watching = changed.is_ok();
                register.due_now();
                continue;
            }
        }
        me.draining = *draining.borrow();
        me.announced_unix_seconds = SystemClock.now_seconds();
        let Ok(payload) = serde_json::to_vec(&me) else { continue };
        let sent = match js.publish(subject.clone(), payload.into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "cannot announce this node to the cluster yet");
        }
    }
    // Leave the list now rather than when the entry expires.
    if register.is_open() {
        if let Ok(members) = js.get_stream(stream_name(&name)).await {
            let _ = members.purge().filter(subject).await;
        }
    }
}

/// The members listed now, by node id.
pub async fn list(js: &async_nats::jetstream::Context, name: &str) -> Result<Vec<Member>, String> {
    let members = js.get_stream(stream_name(name)).await.map_err(|e| format!("the members' stream: {e}"))?;
    let subjects: Vec<(String, usize)> = members
        .info_with_subjects(subject(name, "*"))
        .await
        .map_err(|e| format!("listing the members: {e}"))?
        .take(MAX_MEMBERS)
        .try_collect()
        .await
        .map_err(|e| format!("listing the members: {e}"))?;
    let mut out = Vec::with_capacity(subjects.len());
    for (subject, _) in subjects {
        // Gone between the two requests (expired, withdrawn): not a member any more.
        let Ok(message) = members.get_last_raw_message_by_subject(&subject).await else { continue };
        match serde_json::from_slice::<Member>(&message.payload) {
            Ok(m) => out.push(m),
            Err(e) => tracing::warn!(subject, error = %e, "a member entry that does not decode"),
        }
    }
    out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(out)
}
