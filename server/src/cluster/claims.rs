//! Which credential a client id belongs to, agreed by every gateway of a cluster.
//!
//! With authentication on, a client id belongs to the credential that first used it (a
//! batch naming another's id could otherwise move its watermark and have the owner's next
//! batches taken for resends). One node keeps the owner with the client's watermark; a
//! cluster's gateways keep it in a register stream, `<name>_clients`: one message per client
//! id (subject `<name>.client.<id>`) holding the owner's digest. The first gateway to publish
//! it expecting no message on the subject claims the id for its batch's credential (only one
//! such publish succeeds); every other reads the claim and compares. A claim expires
//! `ingest.client_idle_timeout` after it was written, as one node forgets an idle client, and
//! a gateway still seeing the client renews it halfway there. What a gateway learned it keeps
//! while the client sends (forgotten after [`CACHE_IDLE`] of silence).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use dashmap::DashMap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ClusterConfig, ClusterError};
use crate::ingest::{OwnerRefused, SharedOwners};

/// How long a gateway remembers a client's owner after the client's last batch.
pub const CACHE_IDLE: Duration = Duration::from_secs(600);
/// The most the claims' stream holds; past it the oldest claims (of the clients idle the
/// longest: a live claim is renewed) are dropped. About a million clients.
const CLAIMS_BYTES: i64 = 256 << 20;

/// A claim as this gateway last read or wrote it.
#[derive(Debug, Clone, Copy)]
struct Claim {
    owner: u64,
    /// Its sequence in the stream (what a renewal expects).
    seq: u64,
    written: Instant,
    used: Instant,
}

/// A gateway's side of the claims' register.
#[derive(Debug)]
pub struct Claims {
    js: async_nats::jetstream::Context,
    stream: async_nats::jetstream::stream::Stream,
    name: String,
    ttl: Duration,
    known: DashMap<u64, Claim>,
}

impl Claims {
    /// Opens (creates when missing) the claims' stream, claims expiring `ttl` after they were
    /// written; forgets what it learned of idle clients until `stop`.
    pub async fn start(
        js: async_nats::jetstream::Context,
        config: &ClusterConfig,
        ttl: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Claims>, JoinHandle<()>), ClusterError> {
        let wanted = async_nats::jetstream::stream::Config {
            max_bytes: CLAIMS_BYTES,
            discard: async_nats::jetstream::stream::DiscardPolicy::Old,
            ..super::register::config(
                format!("{}_clients", config.name),
                format!("{}.client.*", config.name),
                ttl,
                config.stream_replicas,
            )
        };
        let stream = super::open_stream(&js, wanted).await?;
        let claims = Arc::new(Claims { js, stream, name: config.name.clone(), ttl, known: DashMap::new() });
        let pruned = claims.clone();
        let task = tokio::spawn(async move {
            let mut prune = tokio::time::interval(CACHE_IDLE / 10);
            loop {
                tokio::select! {
                    _ = prune.tick() => pruned.known.retain(|_, c| c.used.elapsed() < CACHE_IDLE),
                    _ = stop.wait_for(|&s| s) => return,
                }
            }
        });
        Ok((claims, task))
    }

    /// The owner of `client`: claimed for `owner` when nobody holds it (or renewed when this
    /// gateway's claim is half way to expiring), else as the register says.
    async fn owner_of(&self, client: u64, owner: u64) -> Result<u64, String> {
        let now = Instant::now();
        let cached = self.known.get_mut(&client).map(|mut c| {
            c.used = now;
            *c
        });
        let mut expect = match cached {
            Some(c) if c.owner != owner || c.written.elapsed() < self.ttl / 2 => return Ok(c.owner),
            // Ours and due for renewal: rewrite it, expecting it unchanged.
            Some(c) => c.seq,
            None => 0,
        };
        let subject = format!("{}.client.{client:016x}", self.name);
        let claim = loop {
            let publish = PublishMessage::build()
                .payload(bytes::Bytes::copy_from_slice(&owner.to_be_bytes()))
                .expected_last_subject_sequence(expect);
            let written = match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => return Err(format!("claiming client {client:016x}: {e}")),
            };
            match written {
                Ok(ack) => break Claim { owner, seq: ack.sequence, written: now, used: now },
                // Someone holds it, or it changed since this gateway read it: whose is it?
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(format!("claiming client {client:016x}: {e}")),
            }
            match self.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => {
                    let bytes: [u8; 8] = message.payload.as_ref().try_into().map_err(|_| {
                        format!("client {client:016x}'s claim holds {} bytes, not 8", message.payload.len())
                    })?;
                    // Its age is unknown here: renewed once ours and half a TTL older.
                    let owner = u64::from_be_bytes(bytes);
                    break Claim { owner, seq: message.sequence, written: now, used: now };
                }
                // The renewed claim expired meanwhile: claim it as new, once.
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound && expect != 0 => expect = 0,
                Err(e) => return Err(format!("reading client {client:016x}'s claim: {e}")),
            }
        };
        self.known.insert(client, claim);
        Ok(claim.owner)
    }
}

impl SharedOwners for Claims {
    fn claim(
        &self,
        client: u64,
        owner: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), OwnerRefused>> + Send + '_>> {
        Box::pin(async move {
            match self.owner_of(client, owner).await {
                Ok(o) if o == owner => Ok(()),
                Ok(_) => Err(OwnerRefused::Another),
                Err(e) => Err(OwnerRefused::Unavailable(e)),
            }
        })
    }
}
