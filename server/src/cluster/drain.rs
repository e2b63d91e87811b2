//! Draining: a store told to stop leaves its partitions' ownership first.
//!
//! On SIGTERM a store announces itself draining. Every node then computes the owners without
//! it (so the next stores in each partition's ranking take its copies on and read them from
//! the log), while it keeps reading its partitions and answering for them: queries read a
//! partition from a leaving store when none of its new owners has caught up yet
//! ([`super::assign::Assignment::leaving`]). It stops once, for every partition it held
//! caught up, every owner answers caught up — or after `cluster.drain_timeout`. So a store
//! that leaves on purpose leaves no partition with fewer caught-up copies than the
//! replication factor asks, even with `replication_factor = 1`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::assign::{Assignment, Replicas};
use super::reads::{ask_pages, next_select, subject, Op, ReadRequest, SelectOp};

/// How long a drain waits for one owner's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a drain asks again.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// What a store needs to drain.
#[derive(Debug)]
pub struct Drain {
    pub(super) client: async_nats::Client,
    pub(super) name: String,
    pub(super) timeout: Duration,
    pub(super) draining: watch::Sender<bool>,
    pub(super) owners: watch::Receiver<Option<Arc<Assignment>>>,
    pub(super) replicas: Arc<Replicas>,
    pub(super) partitions: u32,
}

impl Drain {
    /// Announces this store leaving and waits until every partition it holds caught up is
    /// caught up on another owner, or `cluster.drain_timeout`; then the node may stop.
    pub async fn run(&self) {
        let held: Vec<u32> = (0..self.partitions).filter(|&p| self.replicas.caught_up(p)).collect();
        if self.timeout.is_zero() || held.is_empty() {
            return;
        }
        let _ = self.draining.send(true);
        tracing::info!(partitions = ?held, timeout = ?self.timeout, "draining: handing the partitions on before stopping");
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut waiting = held;
        loop {
            let assignment = self.owners.borrow().clone();
            if let Some(a) = assignment.filter(|a| a.draining_me()) {
                if a.stores().is_empty() {
                    tracing::warn!("draining: no other store takes the partitions on; stopping");
                    return;
                }
                waiting = not_caught_up(&self.client, &self.name, &a, &waiting).await;
                if waiting.is_empty() {
                    tracing::info!("drained: every owner holds every partition caught up");
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    partitions = ?waiting,
                    "draining timed out (cluster.drain_timeout): stopping before another owner caught up with these"
                );
                return;
            }
            tokio::time::sleep(ASK_EVERY).await;
        }
    }
}

/// Which of `partitions` not every one of their owners in `assignment` answers caught up
/// for.
async fn not_caught_up(
    client: &async_nats::Client,
    name: &str,
    assignment: &Assignment,
    partitions: &[u32],
) -> Vec<u32> {
    let mut by_node: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for &p in partitions {
        for owner in assignment.owners(p) {
            by_node.entry(owner.to_owned()).or_default().push(p);
        }
    }
    let mut confirmed: BTreeMap<u32, usize> = BTreeMap::new();
    for (node, asked) in by_node {
        // Selecting none: the answer only names the partitions it does not hold caught up.
        let op = Op::Select(SelectOp { matchers: Vec::new(), at_most: 0, resume: false, after: 0 });
        let request = ReadRequest { partitions: asked.clone(), op: Some(op) };
        let sent = ask_pages(client.clone(), subject(name, &node), request, next_select);
        let Ok(Ok(replies)) = tokio::time::timeout(ASK_TIMEOUT, sent).await else { continue };
        let behind: Vec<u32> = replies.into_iter().flat_map(|r| r.not_caught_up).collect();
        for p in asked.into_iter().filter(|p| !behind.contains(p)) {
            *confirmed.entry(p).or_default() += 1;
        }
    }
    let done = |p: &u32| confirmed.get(p).copied().unwrap_or(0) == assignment.owners(*p).len();
    partitions.iter().copied().filter(|p| !done(p)).collect()
}
