//! Registers: streams that keep one message per subject, each expiring a while after it was
//! written — JetStream's key-value buckets without the key-value API (whose client does not
//! read 2.9's answers). The ruler lease and the member list are registers that a node writes
//! at a steady pace: [`Register::next`] paces it, opening the stream first.

use std::time::Duration;

use async_nats::jetstream::stream;
use tokio::sync::watch;

/// A register stream and the pace a node writes it at.
#[derive(Debug)]
pub struct Register {
    js: async_nats::jetstream::Context,
    config: stream::Config,
    tick: tokio::time::Interval,
    open: bool,
}

/// The stream of a register `stream` over `subjects`: one message per subject, each expiring
/// `ttl` after it was written, kept on `replicas` NATS servers.
pub fn config(stream: String, subjects: String, ttl: Duration, replicas: usize) -> stream::Config {
    stream::Config {
        name: stream,
        subjects: vec![subjects],
        max_messages_per_subject: 1,
        max_age: ttl,
        // JetStream wants it within max_age.
        duplicate_window: Duration::from_secs(1).min(ttl.max(Duration::from_millis(100))),
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

impl Register {
    /// The register `stream` over `subjects`, each message expiring `ttl` after it was
    /// written, kept on `replicas` NATS servers, written every `every`.
    pub fn new(
        js: async_nats::jetstream::Context,
        stream: String,
        subjects: String,
        ttl: Duration,
        replicas: usize,
        every: Duration,
    ) -> Register {
        let config = config(stream, subjects, ttl, replicas);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Register { js, config, tick, open: false }
    }

    /// Waits for the next write: `true` when it is due and the stream is there (created
    /// unless it exists), `false` once `stop` is set.
    pub async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            tokio::select! {
                _ = self.tick.tick() => {}
                _ = stop.wait_for(|&s| s) => return false,
            }
            if self.open {
                return true;
            }
            match self.js.get_or_create_stream(self.config.clone()).await {
                Ok(_) => {
                    self.open = true;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(stream = %self.config.name, error = %e, "cannot open a register stream yet")
                }
            }
        }
    }

    /// Makes the next write due at once.
    pub fn due_now(&mut self) {
        self.tick.reset_immediately();
    }

    /// Whether the stream was opened.
    pub fn is_open(&self) -> bool {
        self.open
    }
}
