//! The notifier, in Alertmanager's model: alerts are routed down the route tree into
//! aggregation groups (route × `group_by` labels); a group flushes after `group_wait` and then
//! every `group_interval`; a flush drops silenced and inhibited alerts, asks the notification
//! log whether anything changed for each integration (or `repeat_interval` passed), delivers,
//! and logs what it delivered. The log is persisted, so a restart re-sends nothing already
//! sent and forgets nothing due.
//!
//! One task, the dispatcher, owns all of it — alerts, groups and their timers, the inhibition
//! index, the log, the breakers — and is reached only by messages: alerts from the rules
//! (a bounded queue that never blocks them), posts, listings and reloads from the API. A
//! flush hands its deliveries to a task of their own, which reports back what it delivered;
//! the dispatcher never waits on a receiver.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::inhibit::InhibitIndex;
use super::matchers::go_quote;
use super::receivers::retry::{self, Breaker, Target};
use super::receivers::{Notification, Receiver, Request};
use super::route::{NotifierConfig, Route};
use super::silences::Silences;
use super::{fingerprint, fingerprint_hex, rfc3339, Alert, Labels, Sink};
use crate::clock::Clock;
use crate::store::{StateKind, StateStore, StoreError};
use crate::telemetry::{Metrics, ReceiverLabel};

/// How long a notification log entry is kept after its last notification (Alertmanager's
/// default data retention).
const NFLOG_RETENTION_MS: i64 = 120 * 3600 * 1000;
/// Resolved alerts no group holds any more are forgotten after this long.
const RESOLVED_RETENTION_MS: i64 = 15 * 60 * 1000;
/// How often resolved alerts and old log entries are cleaned up.
const MAINTENANCE: Duration = Duration::from_secs(60);

/// What the notifier needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Cluster mode: whether this node may send (it holds the ruler lease). While it may not,
    /// a flush logs what it would have sent without sending; on taking the lease every logged
    /// group counts as due again, so each firing group is told once more (at most one
    /// duplicate of what the previous holder sent) and a resolve the previous holder never
    /// sent is not lost. `None`: always sends.
    pub leader: Option<watch::Receiver<bool>>,
    /// `externalURL` in notifications.
    pub external_url: String,
    /// Per-request webhook timeout.
    pub webhook_timeout: Duration,
    /// Alert updates the notifier's queue holds.
    pub queue_capacity: usize,
    /// What silences may cost.
    pub silences: super::silences::Limits,
    /// Most alerts the notifier holds; new ones beyond it are dropped, counted.
    pub max_alerts: usize,
    /// Most webhook deliveries in flight at once; the rest wait their turn.
    pub max_deliveries: usize,
    /// Mutes alerts stamped `incident_role="symptom"` in every group of a route that does not
    /// group by `incident`: the incident's page tells of them, a per-team route does not page
    /// them again.
    pub inhibit_symptoms: bool,
}

/// One notification log entry: what a webhook was last told about a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct LogEntry {
    firing: BTreeSet<u64>,
    resolved: BTreeSet<u64>,
    /// When (ms).
    timestamp: i64,
    /// The incident root the group's firing alerts named (their common `root_service`), so a
    /// re-rooted incident is told once more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root: Option<String>,
}

impl LogEntry {
    /// Alertmanager's `needsUpdate` for the group as it is `now`, against what was logged — and
    /// also when the incident the group pages for was re-rooted while it fires.
    fn needs_update(entry: Option<&LogEntry>, now: &LogEntry, send_resolved: bool, repeat: Duration) -> bool {
        let Some(e) = entry else { return !now.firing.is_empty() };
        if !now.firing.is_subset(&e.firing) {
            return true;
        }
        if now.firing.is_empty() {
            // Everything resolved: tell the receiver only if it knew of a firing alert.
            return !e.firing.is_empty();
        }
        if send_resolved && !now.resolved.is_subset(&e.resolved) {
            return true;
        }
        if let (Some(told), Some(root)) = (&e.root, &now.root) {
            if told != root {
                return true;
            }
        }
        e.timestamp + repeat.as_millis() as i64 <= now.timestamp
    }
}

/// Waits until the lease `leader` watches changes; true when this node took it. Pends forever
/// without a lease (a single node), or once its holder is gone.
async fn took_lease(leader: &mut Option<watch::Receiver<bool>>) -> bool {
    let gone = match leader.as_mut() {
        None => return std::future::pending().await,
        Some(l) => l.changed().await.is_err(),
    };
    if gone {
        *leader = None;
        return false;
    }
    leader.as_mut().is_some_and(|l| *l.borrow_and_update())
}

/// Whether the incidents stage stamped `a` as a symptom of another service's incident.
fn is_symptom(a: &Alert) -> bool {
    a.labels.contains_key("incident") && a.annotations.get("incident_role").is_some_and(|r| r == "symptom")
}

/// The `root_service` annotation every firing alert of a group shares, if they share one.
fn common_root(alerts: &[Alert], now: i64) -> Option<String> {
    let mut roots = alerts.iter().filter(|a| !a.resolved(now)).map(|a| a.annotations.get("root_service"));
    let first = roots.next()??;
    roots.all(|r| r == Some(first)).then(|| first.clone())
}

/// Why the notifier did not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// Taking the alerts would pass `alerting.max_alerts`.
    #[error(
        "the notifier holds as many alerts as alerting.max_alerts allows; send again after resolved ones expire"
    )]
    Full,
    /// The notifier has stopped (the server is shutting down).
    #[error("the notifier has stopped")]
    Stopped,
}

/// The notifier: a handle to its dispatcher task.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Alerts from the rules: bounded, never waited on.
    alerts: mpsc::Sender<Vec<Alert>>,
    /// Requests from the API; each sender waits for its answer, so they are as many as the
    /// HTTP connections allow.
    control: mpsc::UnboundedSender<Control>,
    config: Arc<watch::Sender<Arc<NotifierConfig>>>,
    silences: Arc<Silences>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
enum Control {
    /// Posted alerts, all or none; answered once admitted and routed.
    Post(Vec<Alert>, oneshot::Sender<bool>),
    /// The configuration in `config` changed.
    Reload,
    /// The alerts held, in API v2 form.
    List(oneshot::Sender<Vec<Value>>),
}

impl Notifier {
    /// Starts the dispatcher; it stops when `stop` fires.
    pub fn start(
        config: NotifierConfig,
        settings: Settings,
        store: Arc<dyn StateStore>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Notifier, JoinHandle<()>), StoreError> {
        let silences = Arc::new(Silences::load(store.clone(), settings.silences)?);
        let mut log = HashMap::new();
        for (k, v) in store.state(StateKind::NotificationLog, b"")? {
            match serde_json::from_slice::<LogEntry>(&v) {
                Ok(e) => {
                    log.insert(k, e);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring unreadable notification log entry"),
            }
        }
        let config = Arc::new(config);
        let (config_tx, config_rx) = watch::channel(config.clone());
        let (alerts_tx, alerts_rx) = mpsc::channel(settings.queue_capacity.max(1));
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let dispatcher = Dispatcher {
            inhibit: InhibitIndex::build(&config.inhibit_rules, std::iter::empty()),
            config,
            config_rx,
            deliveries: Arc::new(tokio::sync::Semaphore::new(settings.max_deliveries.max(1))),
            settings,
            alerts: HashMap::new(),
            groups: HashMap::new(),
            timers: BinaryHeap::new(),
            seq: 0,
            generation: 0,
            log,
            breakers: HashMap::new(),
            silences: silences.clone(),
            store,
            clock: clock.clone(),
            metrics: metrics.clone(),
            in_flight: JoinSet::new(),
        };
        let task = tokio::spawn(dispatcher.run(alerts_rx, control_rx, stop));
        let notifier = Notifier {
            alerts: alerts_tx,
            control: control_tx,
            config: Arc::new(config_tx),
            silences,
            clock,
            metrics,
        };
        Ok((notifier, task))
    }

    /// Takes posted alerts all or none: all when the new ones among them fit under
    /// `alerting.max_alerts` (updates of known alerts always do). The dispatcher admits one
    /// post at a time, so posts in quick succession cannot pass the cap together. Admitted
    /// alerts are routed before this returns.
    pub async fn post(&self, alerts: Vec<Alert>) -> Result<(), NotifierError> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::Post(alerts, tx)).map_err(|_| NotifierError::Stopped)?;
        match rx.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(NotifierError::Full),
            Err(_) => Err(NotifierError::Stopped),
        }
    }

    /// Replaces the configuration: every group restarts under the new routes (the log keeps
    /// them from re-sending what they already sent).
    pub fn reload(&self, config: NotifierConfig) {
        self.config.send_replace(Arc::new(config));
        // A stopped dispatcher has nothing to reload.
        let _ = self.control.send(Control::Reload);
    }

    /// The silences.
    pub fn silences(&self) -> &Silences {
        &self.silences
    }

    /// Now, in ms.
    pub fn now(&self) -> i64 {
        self.clock.now_nanos().div_euclid(1_000_000)
    }

    /// How long an alert posted without an end stays firing.
    pub fn resolve_timeout(&self) -> Duration {
        self.config.borrow().resolve_timeout
    }

    /// Every alert the notifier holds, in Alertmanager's API v2 form.
    pub async fn alerts_json(&self) -> Result<Vec<Value>, NotifierError> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::List(tx)).map_err(|_| NotifierError::Stopped)?;
        rx.await.map_err(|_| NotifierError::Stopped)
    }
}

impl Sink for Notifier {
    fn send(&self, alerts: Vec<Alert>) {
        let n = alerts.len() as u64;
        if self.alerts.try_send(alerts).is_err() {
            // Rules resend every firing alert, so a dropped update is late, not lost.
            self.metrics.alerts_dropped.inc_by(n);
        }
    }
}

/// The dispatcher: owns every piece of the notifier's state.
#[derive(Debug)]
struct Dispatcher {
    config: Arc<NotifierConfig>,
    config_rx: watch::Receiver<Arc<NotifierConfig>>,
    settings: Settings,
    /// Every alert the notifier knows, by fingerprint.
    alerts: HashMap<u64, Alert>,
    /// The inhibit rules' sources among `alerts`, indexed.
    inhibit: InhibitIndex,
    /// By receiver and group key.
    groups: HashMap<String, Group>,
    /// Flush times: (when, sequence, group); an entry whose sequence is not its group's
    /// `next` any more is stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, u64, String)>>,
    seq: u64,
    /// Bumped by every reload: deliveries of an older generation log what they delivered but
    /// no longer touch the groups.
    generation: u64,
    log: HashMap<Vec<u8>, LogEntry>,
    /// By receiver and integration index.
    breakers: HashMap<String, Arc<Breaker>>,
    silences: Arc<Silences>,
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// One permit per delivery in flight (`alerting.max_concurrent_deliveries`).
    deliveries: Arc<tokio::sync::Semaphore>,
    /// Flushes being delivered, at most one per group.
    in_flight: JoinSet<Delivered>,
}

/// An aggregation group.
#[derive(Debug)]
struct Group {
    /// Alertmanager's group key: `<route key>:<group labels>`.
    key: String,
    route: Route,
    labels: Labels,
    alerts: BTreeMap<u64, Alert>,
    /// The pending flush: when, and its timer's sequence.
    next: Option<(Instant, u64)>,
    /// Whether it has flushed once (after that `group_wait` no longer applies).
    flushed: bool,
    /// Whether a flush is being delivered.
    delivering: bool,
    /// Whether a flush came due while one was being delivered.
    due_again: bool,
}

/// What a flush's delivery reports back.
#[derive(Debug)]
struct Delivered {
    group: String,
    generation: u64,
    /// The log entries it wrote (persisted already).
    logged: Vec<(Vec<u8>, LogEntry)>,
    all_ok: bool,
    /// When the flush happened (ms).
    now: i64,
    /// The group's alerts as the flush saw them.
    snapshot: Vec<(u64, Alert)>,
}

/// One integration a flush tells.
struct Due {
    index: usize,
    log_key: Vec<u8>,
    integration: Arc<dyn Receiver>,
    /// `None`: nothing to send to it (only resolves, unwanted), logged all the same.
    request: Option<Request>,
    breaker: Arc<Breaker>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut alerts: mpsc::Receiver<Vec<Alert>>,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut maintenance = tokio::time::interval(MAINTENANCE);
        let mut leader = self.settings.leader.clone();
        loop {
            let next = self.next_timer();
            tokio::select! {
                took = took_lease(&mut leader) => if took {
                    self.take_over();
                },
                batch = alerts.recv() => {
                    let Some(batch) = batch else { break };
                    let now = self.now();
                    for a in batch {
                        self.ingest(a, now);
                    }
                }
                Some(c) = control.recv() => self.control(c),
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => match done {
                    Ok(d) => self.delivered(d),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!(error = %e, "a notification delivery task failed"),
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    self.fire_due();
                }
                _ = maintenance.tick() => self.maintain(self.now()),
                _ = stop.wait_for(|&s| s) => break,
            }
        }
        self.in_flight.abort_all();
    }

    /// This node now sends: what the log holds was logged without sending (presumably sent by
    /// the previous holder, who may have died before it did), so every entry counts as due
    /// for its repeat and every alert it logged as resolved as not yet told, and every group
    /// flushes now: each firing group is told once more, each resolve once (again).
    fn take_over(&mut self) {
        tracing::info!(
            groups = self.groups.len(),
            "holding the ruler lease: sending notifications from here"
        );
        for entry in self.log.values_mut() {
            // Whatever resolved while another node held the lease may never have been told.
            let resolved = std::mem::take(&mut entry.resolved);
            entry.firing.extend(resolved);
            entry.timestamp = 0;
        }
        let groups: Vec<String> = self.groups.keys().cloned().collect();
        for key in groups {
            self.schedule(&key, Instant::now());
        }
    }

    /// Whether this node sends (cluster mode: it holds the ruler lease).
    fn leading(&self) -> bool {
        self.settings.leader.as_ref().is_none_or(|l| *l.borrow())
    }

    fn now(&self) -> i64 {
        self.clock.now_nanos().div_euclid(1_000_000)
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Post(alerts, reply) => {
                let _ = reply.send(self.post(alerts));
            }
            Control::Reload => self.reload(),
            Control::List(reply) => {
                let _ = reply.send(self.list());
            }
        }
    }

    /// Posted alerts: all when the new ones fit under `alerting.max_alerts`, else none.
    fn post(&mut self, alerts: Vec<Alert>) -> bool {
        let new = alerts.iter().filter(|a| !self.alerts.contains_key(&fingerprint(&a.labels))).count();
        if self.alerts.len() + new > self.settings.max_alerts {
            return false;
        }
        self.metrics.alerts_received.inc_by(alerts.len() as u64);
        let now = self.now();
        for a in alerts {
            let a = self.merge(a);
            self.route(a, now);
        }
        true
    }

    /// An alert from the rules: dropped, counted, when it is new and the notifier is full.
    fn ingest(&mut self, alert: Alert, now: i64) {
        self.metrics.alerts_received.inc();
        if !self.alerts.contains_key(&fingerprint(&alert.labels))
            && self.alerts.len() >= self.settings.max_alerts
        {
            self.metrics.alerts_dropped.inc();
            self.metrics.limit_hit("alerting.max_alerts");
            return;
        }
        let alert = self.merge(alert);
        self.route(alert, now);
    }

    /// Puts `alert` among the known alerts (the same alert still going on keeps its start)
    /// and the inhibit index; returns it as kept.
    fn merge(&mut self, mut alert: Alert) -> Alert {
        let fp = fingerprint(&alert.labels);
        if let Some(old) = self.alerts.get(&fp) {
            if !old.resolved(alert.starts_at) && old.starts_at < alert.starts_at {
                alert.starts_at = old.starts_at;
            }
        }
        self.inhibit.add(&self.config.inhibit_rules, fp, &alert);
        self.alerts.insert(fp, alert.clone());
        alert
    }

    /// Hands `alert` to the group of every route it takes, creating groups as needed.
    fn route(&mut self, alert: Alert, now: i64) {
        let fp = fingerprint(&alert.labels);
        let config = self.config.clone();
        for route in config.route.matching(&alert.labels) {
            let labels = route.group_labels(&alert.labels);
            let key = format!("{}:{}", route.key, label_set_string(&labels));
            let map_key = format!("{}\0{key}", route.receiver);
            let created = !self.groups.contains_key(&map_key);
            let group = self.groups.entry(map_key.clone()).or_insert_with(|| Group {
                key,
                route: route.clone(),
                labels,
                alerts: BTreeMap::new(),
                next: None,
                flushed: false,
                delivering: false,
                due_again: false,
            });
            group.alerts.insert(fp, alert.clone());
            // An alert that started longer than group_wait ago is not held back again.
            let overdue = !group.flushed && alert.starts_at + route.group_wait.as_millis() as i64 <= now;
            // Flushed from the timers, after the rest of this batch has joined the group.
            if overdue {
                self.schedule(&map_key, Instant::now());
            } else if created {
                self.schedule(&map_key, Instant::now() + route.group_wait);
            }
        }
    }

    /// Every group restarts under the new configuration.
    fn reload(&mut self) {
        self.config = self.config_rx.borrow_and_update().clone();
        self.reindex();
        self.groups.clear();
        self.timers.clear();
        self.generation += 1;
        let now = self.now();
        let alerts: Vec<Alert> = self.alerts.values().cloned().collect();
        for a in alerts {
            self.route(a, now);
        }
    }

    fn list(&self) -> Vec<Value> {
        let now = self.now();
        let mut out: Vec<(&Labels, Value)> = self
            .alerts
            .values()
            .filter(|a| !a.resolved(now))
            .map(|a| {
                let silenced = self.silences.muting(fingerprint(&a.labels), &a.labels, now);
                let inhibited = self.inhibitors(a, now);
                let state = if silenced.is_empty() && inhibited.is_empty() { "active" } else { "suppressed" };
                let receivers: Vec<Value> = self
                    .config
                    .route
                    .matching(&a.labels)
                    .iter()
                    .map(|r| json!({"name": r.receiver}))
                    .collect();
                let v = json!({
                    "labels": a.labels,
                    "annotations": a.annotations,
                    "startsAt": rfc3339(a.starts_at),
                    "endsAt": rfc3339(a.ends_at),
                    "updatedAt": rfc3339(now),
                    "generatorURL": a.generator_url,
                    "fingerprint": fingerprint_hex(&a.labels),
                    "receivers": receivers,
                    "status": {"state": state, "silencedBy": silenced, "inhibitedBy": inhibited},
                });
                (&a.labels, v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// The fingerprints (hex) of firing alerts that inhibit `target`: one index lookup per
    /// inhibit rule whose target matchers `target` matches.
    fn inhibitors(&self, target: &Alert, now: i64) -> Vec<String> {
        if self.config.inhibit_rules.is_empty() {
            return Vec::new();
        }
        self.inhibit
            .inhibitors(&self.config.inhibit_rules, fingerprint(&target.labels), target, now)
            .into_iter()
            .map(|fp| format!("{fp:016x}"))
            .collect()
    }

    /// Rebuilds the inhibition index from the alerts held (after a reload or a clean-up).
    fn reindex(&mut self) {
        self.inhibit =
            InhibitIndex::build(&self.config.inhibit_rules, self.alerts.iter().map(|(fp, a)| (*fp, a)));
    }

    fn schedule(&mut self, group: &str, at: Instant) {
        let Some(g) = self.groups.get_mut(group) else { return };
        self.seq += 1;
        g.next = Some((at, self.seq));
        self.timers.push(Reverse((at, self.seq, group.to_owned())));
    }

    /// The earliest pending flush, stale timers dropped.
    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, seq, group))) = self.timers.peek() {
            if self.groups.get(group).is_some_and(|g| g.next == Some((*at, *seq))) {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
    }

    /// Flushes every group whose time has come.
    fn fire_due(&mut self) {
        let now = Instant::now();
        while let Some(at) = self.next_timer() {
            if at > now {
                break;
            }
            let Some(Reverse((_, _, group))) = self.timers.pop() else { break };
            if let Some(g) = self.groups.get_mut(&group) {
                g.next = None;
            }
            self.flush(&group);
        }
    }

    /// One flush of a group: what to tell which integration, decided here; the telling, in a
    /// task of its own. The next flush is one interval after this one starts, as in
    /// Alertmanager, however long delivery takes.
    fn flush(&mut self, map_key: &str) {
        let now = self.now();
        let Some(group) = self.groups.get_mut(map_key) else { return };
        if group.delivering {
            group.due_again = true;
            return;
        }
        group.flushed = true;
        let snapshot: Vec<(u64, Alert)> = group.alerts.iter().map(|(k, v)| (*k, v.clone())).collect();
        // What the flush needs of the route (not its subtree).
        let (receiver, group_interval, repeat_interval) =
            (group.route.receiver.clone(), group.route.group_interval, group.route.repeat_interval);
        let mute_symptoms = self.settings.inhibit_symptoms && !group.route.group_by.names("incident");
        let (group_key, group_labels) = (group.key.clone(), group.labels.clone());
        self.schedule(map_key, Instant::now() + group_interval);
        let mut alerts: Vec<Alert> = snapshot
            .iter()
            .map(|(_, a)| a.clone())
            .filter(|a| {
                // Muting applies to firing alerts; a resolve is never held back.
                a.resolved(now)
                    || (self.silences.muting(fingerprint(&a.labels), &a.labels, now).is_empty()
                        && self.inhibitors(a, now).is_empty()
                        && !(mute_symptoms && is_symptom(a)))
            })
            .collect();
        alerts.sort_by(|a, b| {
            let key = |x: &Alert| (x.labels.get("job").cloned(), x.labels.get("instance").cloned());
            key(a).cmp(&key(b)).then_with(|| a.labels.cmp(&b.labels))
        });
        let entry = LogEntry {
            firing: alerts.iter().filter(|a| !a.resolved(now)).map(|a| fingerprint(&a.labels)).collect(),
            resolved: alerts.iter().filter(|a| a.resolved(now)).map(|a| fingerprint(&a.labels)).collect(),
            timestamp: now,
            root: common_root(&alerts, now),
        };
        let Some(config) = self.config.receivers.get(&receiver).cloned() else { return };
        let notification = Notification {
            receiver: receiver.clone(),
            group_key: group_key.clone(),
            group_labels,
            alerts,
            now,
            external_url: self.settings.external_url.clone(),
        };
        let mut due = Vec::new();
        for (index, integration) in config.integrations.iter().enumerate() {
            let log_key = format!("{receiver}\0{group_key}\0{index}").into_bytes();
            let needed = LogEntry::needs_update(
                self.log.get(&log_key),
                &entry,
                integration.send_resolved(),
                repeat_interval,
            );
            if needed {
                due.push(Due {
                    index,
                    log_key,
                    integration: integration.clone(),
                    request: integration.request(&notification),
                    breaker: self.breaker(&receiver, index, group_interval),
                });
            }
        }
        let mut done = Delivered {
            group: map_key.to_owned(),
            generation: self.generation,
            logged: Vec::new(),
            all_ok: true,
            now,
            snapshot,
        };
        if !self.leading() {
            // Another node sends: remember what it presumably sent, in memory only, and keep
            // resolved alerts in the group (for a while) in case its holder dies before telling
            // them.
            done.logged = due.into_iter().map(|d| (d.log_key, entry.clone())).collect();
            done.all_ok = false;
            if let Some(g) = self.groups.get_mut(map_key) {
                g.alerts.retain(|_, a| !(a.resolved(now) && a.ends_at + RESOLVED_RETENTION_MS < now));
            }
            self.delivered(done);
            return;
        }
        if due.is_empty() {
            self.delivered(done);
            return;
        }
        if let Some(g) = self.groups.get_mut(map_key) {
            g.delivering = true;
        }
        let deadline = std::time::Instant::now() + group_interval.max(Duration::from_secs(1));
        let ctx = DeliveryContext {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            deliveries: self.deliveries.clone(),
            timeout: self.settings.webhook_timeout,
        };
        self.in_flight.spawn(deliver(ctx, receiver, group_key, due, entry, deadline, done));
    }

    /// A flush's delivery is over: what it delivered is logged; resolved alerts it told every
    /// integration of leave the group; an empty group ends.
    fn delivered(&mut self, d: Delivered) {
        self.log.extend(d.logged);
        if d.generation != self.generation {
            return;
        }
        let Some(group) = self.groups.get_mut(&d.group) else { return };
        group.delivering = false;
        if d.all_ok {
            for (fp, a) in &d.snapshot {
                if a.resolved(d.now) && group.alerts.get(fp) == Some(a) {
                    group.alerts.remove(fp);
                }
            }
        }
        if group.alerts.is_empty() {
            self.groups.remove(&d.group);
        } else if std::mem::take(&mut group.due_again) {
            self.flush(&d.group);
        }
    }

    fn breaker(&mut self, receiver: &str, index: usize, group_interval: Duration) -> Arc<Breaker> {
        let key = format!("{receiver}\0{index}");
        let cool_down = group_interval.clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.breakers.entry(key).or_insert_with(|| Arc::new(Breaker::new(cool_down))).clone()
    }

    /// Cleans up resolved alerts no longer needed and expired log entries.
    fn maintain(&mut self, now: i64) {
        self.alerts.retain(|_, a| !(a.resolved(now) && a.ends_at + RESOLVED_RETENTION_MS < now));
        self.reindex();
        // Keeps the mute cache to the alerts still held.
        self.silences.invalidate();
        let expired: Vec<Vec<u8>> = self
            .log
            .iter()
            .filter(|(_, e)| e.timestamp + NFLOG_RETENTION_MS < now)
            .map(|(k, _)| k.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        let deletes: Vec<_> = expired.iter().map(|k| (k.clone(), None)).collect();
        match self.store.write_state(StateKind::NotificationLog, &deletes) {
            Ok(()) => expired.iter().for_each(|k| {
                self.log.remove(k);
            }),
            Err(e) => tracing::warn!(error = %e, "cannot expire notification log entries"),
        }
    }
}

/// What a delivery task needs of the dispatcher.
struct DeliveryContext {
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    deliveries: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

/// Tells each due integration, within the pool of deliveries, and persists a log entry for
/// each one told (or with nothing to tell).
async fn deliver(
    ctx: DeliveryContext,
    receiver: String,
    group_key: String,
    due: Vec<Due>,
    entry: LogEntry,
    deadline: std::time::Instant,
    mut done: Delivered,
) -> Delivered {
    let started = std::time::Instant::now();
    let label = ReceiverLabel { receiver: receiver.clone() };
    for d in due {
        if let Some(request) = &d.request {
            let target = Target {
                http: d.integration.http(),
                receiver: &receiver,
                breaker: &d.breaker,
                timeout: ctx.timeout,
                metrics: &ctx.metrics,
            };
            // A bounded pool: a burst of groups (5,000 services, each its own group) waits its
            // turn instead of opening a connection each.
            let Ok(_permit) = ctx.deliveries.clone().acquire_owned().await else { break };
            let retryable = |status| d.integration.retryable(status);
            match retry::deliver(target, request, &retryable, deadline).await {
                Ok(()) => {
                    ctx.metrics.notifications.get_or_create(&label).inc();
                    ctx.metrics.notification_latency.observe(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    ctx.metrics.notifications_failed.get_or_create(&label).inc();
                    tracing::warn!(%receiver, integration = d.integration.kind(), index = d.index, group = %group_key, error = %e, "notification failed; retrying at the next group interval");
                    done.all_ok = false;
                    continue;
                }
            }
        }
        let store = ctx.store.clone();
        let record = vec![(d.log_key.clone(), serde_json::to_vec(&entry).ok())];
        match tokio::task::spawn_blocking(move || store.write_state(StateKind::NotificationLog, &record))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot persist the notification log"),
            Err(e) => tracing::error!(error = %e, "notification log task failed"),
        }
        done.logged.push((d.log_key, entry.clone()));
    }
    done
}

/// Alertmanager's `model.LabelSet.String()`: `{a="b", c="d"}`.
fn label_set_string(labels: &Labels) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={}", go_quote(v))).collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn the_log_decides_like_alertmanagers_dedup_stage() {
        let hour = Duration::from_secs(3600);
        let at = |firing: &[u64], resolved: &[u64], timestamp: i64| LogEntry {
            firing: set(firing),
            resolved: set(resolved),
            timestamp,
            root: None,
        };
        let needs = |e: Option<&LogEntry>, now: &LogEntry, send_resolved| {
            LogEntry::needs_update(e, now, send_resolved, hour)
        };
        let e = at(&[1, 2], &[], 0);
        // Nothing logged: only firing alerts make a first notification.
        assert!(needs(None, &at(&[1], &[], 0), true));
        assert!(!needs(None, &at(&[], &[1], 0), true));
        // A new firing alert.
        assert!(needs(Some(&e), &at(&[1, 3], &[], 1), true));
        // Same or fewer firing, nothing newly resolved: wait for the repeat interval.
        assert!(!needs(Some(&e), &at(&[1], &[], 1), true));
        assert!(needs(Some(&e), &at(&[1], &[], 3_600_000), true));
        // One resolved while another fires: only receivers that want resolves hear of it.
        assert!(needs(Some(&e), &at(&[1], &[2], 1), true));
        assert!(!needs(Some(&e), &at(&[1], &[2], 1), false));
        // All resolved: tell the receiver that knew they fired.
        assert!(needs(Some(&e), &at(&[], &[1, 2], 1), true));
        let quiet = at(&[], &[1, 2], 0);
        assert!(!needs(Some(&quiet), &at(&[], &[1, 2], 1), true));
    }

    #[test]
    fn a_re_rooted_incident_is_told_once_more() {
        let hour = Duration::from_secs(3600);
        let entry = |root: Option<&str>, timestamp| LogEntry {
            firing: set(&[1, 2]),
            resolved: set(&[]),
            timestamp,
            root: root.map(str::to_owned),
        };
        let told = entry(Some("frontend"), 0);
        assert!(LogEntry::needs_update(Some(&told), &entry(Some("payments"), 1), true, hour));
        assert!(!LogEntry::needs_update(Some(&told), &entry(Some("frontend"), 1), true, hour));
        // A log written before roots were logged, or a group without one, waits as before.
        assert!(!LogEntry::needs_update(Some(&entry(None, 0)), &entry(Some("payments"), 1), true, hour));
        assert!(!LogEntry::needs_update(Some(&told), &entry(None, 1), true, hour));
        // An old entry without the field still reads.
        let old: LogEntry = serde_json::from_str(r#"{"firing":[1],"resolved":[],"timestamp":5}"#).unwrap();
        assert_eq!(old.root, None);
        // The root the group's firing alerts share, if they share one.
        let alert = |root: Option<&str>| Alert {
            labels: Labels::new(),
            annotations: root.map(|r| ("root_service".to_owned(), r.to_owned())).into_iter().collect(),
            starts_at: 0,
            ends_at: i64::MAX,
            generator_url: String::new(),
        };
        let (payments, search) = (alert(Some("payments")), alert(Some("search")));
        assert_eq!(common_root(&[payments.clone(), payments.clone()], 0), Some("payments".into()));
        assert_eq!(common_root(&[payments.clone(), search], 0), None);
        assert_eq!(common_root(&[alert(None)], 0), None);
        // A resolved alert's root does not count.
        let gone = Alert { ends_at: 0, ..alert(Some("frontend")) };
        assert_eq!(common_root(&[gone, payments], 1), Some("payments".into()));
    }

    #[test]
    fn label_sets_print_as_alertmanager_does() {
        let l: Labels =
            [("service".to_string(), "a\"b".to_string()), ("alertname".to_string(), "X".to_string())].into();
        assert_eq!(label_set_string(&l), r#"{alertname="X", service="a\"b"}"#);
        assert_eq!(label_set_string(&Labels::new()), "{}");
    }
}
