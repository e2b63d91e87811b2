//! Which store nodes hold which partitions.
//!
//! Each partition is held by `cluster.replication_factor` of the live store nodes, chosen by
//! rendezvous hashing (highest random weight): every store scores `xxh3(node, partition)` and
//! the top scores own it. Every node computes the same owners from the same member list with
//! no coordinator, a joining store takes about `1/n` of the partitions' copies (each from the
//! node that scored lowest among the previous owners) and a leaving one hands only its own
//! copies on, each to the next in that partition's ranking.
//!
//! A store reads only the partitions it owns ([`super::consumer`]), and says of each whether
//! it has caught up: written everything its log held when it took the partition on
//! ([`Replicas`]). Queries read each partition from a caught-up owner ([`super::reads`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::config::Role;
use super::members;

/// How often a node reads the member list again.
const REFRESH: Duration = Duration::from_secs(3);

/// The owners of every partition, as one node sees the live stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    me: String,
    /// Live store nodes, sorted, distinct.
    stores: Vec<String>,
    /// Stores that are leaving (draining), sorted, distinct: they own nothing, but answer for
    /// what they held until its new owners have caught up.
    draining: Vec<String>,
    /// Copies of each partition; 0: every store holds every partition.
    replication: usize,
    partitions: u32,
    /// Live gateways (this node among them if it is one), which share the sampling budget.
    gateways: usize,
}

impl Assignment {
    /// The assignment of `partitions` among `stores` (this node `me` among them if it is a
    /// store), `replication` copies each (0: all).
    pub fn new(me: &str, mut stores: Vec<String>, replication: usize, partitions: u32) -> Assignment {
        stores.sort();
        stores.dedup();
        Assignment { me: me.to_owned(), stores, draining: Vec::new(), replication, partitions, gateways: 0 }
    }

    /// The same with `gateways` live gateways.
    pub fn with_gateways(mut self, gateways: usize) -> Assignment {
        self.gateways = gateways;
        self
    }

    /// How many live gateways there are (0: not counted).
    pub fn gateways(&self) -> usize {
        self.gateways
    }

    /// The same with `draining` stores leaving (taken out of the live ones).
    pub fn with_draining(mut self, mut draining: Vec<String>) -> Assignment {
        draining.sort();
        draining.dedup();
        self.stores.retain(|s| !draining.contains(s));
        self.draining = draining;
        self
    }

    /// Whether this node is a store that is leaving.
    pub fn draining_me(&self) -> bool {
        self.draining.contains(&self.me)
    }

    /// The live store nodes.
    pub fn stores(&self) -> &[String] {
        &self.stores
    }

    /// How many partitions there are.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// This node.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The owners of `partition`, best first (the order queries try them in).
    pub fn owners(&self, partition: u32) -> Vec<&str> {
        self.ranked(self.stores.iter(), partition)
    }

    /// The leaving stores that would own `partition` had they stayed, best first: read when
    /// no owner has caught up yet.
    pub fn leaving(&self, partition: u32) -> Vec<&str> {
        if self.draining.is_empty() {
            return Vec::new();
        }
        self.ranked(self.stores.iter().chain(&self.draining), partition)
            .into_iter()
            .filter(|s| self.draining.iter().any(|d| d == s))
            .collect()
    }

    /// The top `replication` of `nodes` for `partition`, best first.
    fn ranked<'a>(&self, nodes: impl Iterator<Item = &'a String>, partition: u32) -> Vec<&'a str> {
        let mut scored: Vec<(u64, &str)> = nodes.map(|s| (score(s, partition), s.as_str())).collect();
        // Highest score first; a tie (never seen with 64-bit scores) by name.
        scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let n = if self.replication == 0 { scored.len() } else { self.replication.min(scored.len()) };
        scored.into_iter().take(n).map(|(_, s)| s).collect()
    }

    /// Whether this node owns `partition` — or, while it drains, held it: it keeps reading
    /// what it held until it has left.
    pub fn owns(&self, partition: u32) -> bool {
        let me = self.me.as_str();
        if self.draining_me() {
            self.leaving(partition).contains(&me)
        } else {
            self.owners(partition).contains(&me)
        }
    }

    /// The partitions this node owns, in order.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.partitions).filter(|&p| self.owns(p)).collect()
    }
}

/// A store's weight for a partition.
fn score(node: &str, partition: u32) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(node.len() as u32).to_be_bytes());
    h.update(node.as_bytes());
    h.update(&partition.to_be_bytes());
    h.digest()
}

/// Per partition, whether this node's store owns it and has caught up with its log: written
/// every message the log held when it took the partition on. Queries read a partition only
/// from a caught-up owner.
#[derive(Debug)]
pub struct Replicas {
    caught_up: Vec<AtomicBool>,
}

impl Replicas {
    /// `partitions` partitions, none caught up.
    pub fn new(partitions: u32) -> Replicas {
        Replicas { caught_up: (0..partitions).map(|_| AtomicBool::new(false)).collect() }
    }

    /// Whether this node may answer reads of `partition`.
    pub fn caught_up(&self, partition: u32) -> bool {
        self.caught_up.get(partition as usize).is_some_and(|c| c.load(Ordering::Acquire))
    }

    /// Marks `partition` caught up, or not.
    pub fn set(&self, partition: u32, caught_up: bool) {
        if let Some(c) = self.caught_up.get(partition as usize) {
            c.store(caught_up, Ordering::Release);
        }
    }
}

/// Keeps `out` at the assignment of the live stores (read from the member list every few
/// seconds) until `stop`. It stays `None` until the list was read once; a list that cannot be
/// read keeps the last assignment.
pub async fn run(
    js: async_nats::jetstream::Context,
    config: super::ClusterConfig,
    out: watch::Sender<Option<Arc<Assignment>>>,
    mut draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let me_store = config.has(Role::Store);
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watching = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = draining.changed(), if watching => {
                watching = changed.is_ok();
                tick.reset_immediately();
                continue;
            }
            _ = stop.wait_for(|&s| s) => return,
        }
        let members = match members::list(&js, &config.name).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the member list; keeping the partitions' owners");
                // Soon again while there is no assignment at all.
                if out.borrow().is_none() {
                    tick.reset_after(Duration::from_millis(250));
                }
                continue;
            }
        };
        // This node as it knows itself, not as it last announced itself.
        let (mut stores, mut leaving) = (Vec::new(), Vec::new());
        let mut gateways = usize::from(config.has(Role::Gateway) && !*draining.borrow());
        for m in members {
            if m.roles.contains(&Role::Gateway) && !m.draining && m.node_id != config.node_id {
                gateways += 1;
            }
            if m.roles.contains(&Role::Store) && m.node_id != config.node_id {
                if m.draining {
                    leaving.push(m.node_id)
                } else {
                    stores.push(m.node_id)
                }
            }
        }
        if me_store {
            if *draining.borrow() {
                leaving.push(config.node_id.clone())
            } else {
                stores.push(config.node_id.clone())
            }
        }
        let next = Assignment::new(&config.node_id, stores, config.replication_factor, config.partitions)
            .with_draining(leaving)
            .with_gateways(gateways);
        out.send_if_modified(|current| {
            if current.as_deref() == Some(&next) {
                return false;
            }
            let before = current.as_ref().map(|a| a.owned());
            let after = next.owned();
            if before.as_ref() != Some(&after) {
                tracing::info!(stores = ?next.stores(), owned = ?after, "partition owners changed");
            }
            *current = Some(Arc::new(next.clone()));
            true
        });
    }
}

#[cfg(test)]
mod tests;
