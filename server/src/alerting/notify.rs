//! The notifier, in Alertmanager's model: alerts are routed down the route tree into
//! aggregation groups (route × `group_by` labels); each group is its own task that flushes after
//! `group_wait` and then every `group_interval`; a flush drops silenced and inhibited alerts,
//! asks the notification log whether anything changed (or `repeat_interval` passed), delivers,
//! and logs what it delivered. The log is persisted, so a restart re-sends nothing already
//! sent and forgets nothing due.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::matchers::go_quote;
use super::receivers::retry::{self, Breaker, Target};
use super::receivers::Notification;
use super::route::{NotifierConfig, Route};
use super::silences::Silences;
use super::{fingerprint, fingerprint_hex, rfc3339, Alert, Labels, Sink};
use crate::clock::Clock;
use crate::store::{Store, StoreError};
use crate::telemetry::{Metrics, ReceiverLabel};

const NFLOG_PREFIX: &[u8] = b"nflog\0";
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
}

/// One notification log entry: what a webhook was last told about a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct LogEntry {
    firing: BTreeSet<u64>,
    resolved: BTreeSet<u64>,
    /// When (ms).
    timestamp: i64,
}

impl LogEntry {
    /// Alertmanager's `needsUpdate`.
    fn needs_update(
        entry: Option<&LogEntry>,
        firing: &BTreeSet<u64>,
        resolved: &BTreeSet<u64>,
        send_resolved: bool,
        repeat: Duration,
        now: i64,
    ) -> bool {
        let Some(e) = entry else { return !firing.is_empty() };
        if !firing.is_subset(&e.firing) {
            return true;
        }
        if firing.is_empty() {
            // Everything resolved: tell the receiver only if it knew of a firing alert.
            return !e.firing.is_empty();
        }
        if send_resolved && !resolved.is_subset(&e.resolved) {
            return true;
        }
        e.timestamp + repeat.as_millis() as i64 <= now
    }
}

/// The notifier.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Vec<Alert>>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: RwLock<Arc<NotifierConfig>>,
    settings: Settings,
    /// Every alert the notifier knows, by fingerprint.
    alerts: Mutex<HashMap<u64, Alert>>,
    /// The inhibit rules' sources among `alerts`, indexed (rebuilt on reload and maintenance).
    inhibit: Mutex<super::inhibit::InhibitIndex>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    silences: Silences,
    log: Mutex<HashMap<Vec<u8>, LogEntry>>,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    store: Store,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    stop: watch::Receiver<bool>,
    /// One permit per webhook delivery in flight (`alerting.max_concurrent_deliveries`).
    deliveries: Arc<tokio::sync::Semaphore>,
}

/// An aggregation group.
#[derive(Debug)]
struct Group {
    /// Alertmanager's group key: `<route key>:<group labels>`.
    key: String,
    route: Route,
    labels: Labels,
    alerts: Mutex<BTreeMap<u64, Alert>>,
    wake: Notify,
    flushed: std::sync::atomic::AtomicBool,
}

impl Notifier {
    /// Starts the notifier's dispatcher; stops when `stop` fires.
    pub fn start(
        config: NotifierConfig,
        settings: Settings,
        store: Store,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Notifier, JoinHandle<()>), StoreError> {
        let silences = Silences::load(store.clone(), settings.silences)?;
        let mut log = HashMap::new();
        for (k, v) in store.alerting_records(NFLOG_PREFIX)? {
            match serde_json::from_slice::<LogEntry>(&v) {
                Ok(e) => {
                    log.insert(k, e);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring unreadable notification log entry"),
            }
        }
        let http = reqwest::Client::builder().build().unwrap_or_default();
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let deliveries = Arc::new(tokio::sync::Semaphore::new(settings.max_deliveries.max(1)));
        let shared = Arc::new(Shared {
            config: RwLock::new(Arc::new(config)),
            settings,
            alerts: Mutex::new(HashMap::new()),
            inhibit: Mutex::new(super::inhibit::InhibitIndex::default()),
            groups: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            silences,
            log: Mutex::new(log),
            breakers: Mutex::new(HashMap::new()),
            store,
            clock,
            metrics,
            http,
            stop,
            deliveries,
        });
        let task = tokio::spawn(dispatch(shared.clone(), rx));
        Ok((Notifier { tx, shared }, task))
    }

    /// Takes posted alerts all or none: all when the new ones among them fit under
    /// `alerting.max_alerts` (updates of known alerts always do), checked and admitted under
    /// one lock so that posts in quick succession cannot pass the cap together; none (`false`)
    /// otherwise. Admitted alerts are routed before this returns.
    pub fn post(&self, alerts: Vec<Alert>) -> bool {
        let shared = &self.shared;
        let now = shared.now();
        let admitted: Vec<Alert> = {
            let mut known = shared.alerts.lock();
            let new = alerts.iter().filter(|a| !known.contains_key(&fingerprint(&a.labels))).count();
            if known.len() + new > shared.settings.max_alerts {
                return false;
            }
            alerts.into_iter().map(|a| shared.merge(&mut known, a)).collect()
        };
        shared.metrics.alerts_received.inc_by(admitted.len() as u64);
        for a in admitted {
            shared.route(a, now);
        }
        true
    }

    /// Replaces the configuration: every group restarts under the new routes (the log keeps
    /// them from re-sending what they already sent).
    pub fn reload(&self, config: NotifierConfig) {
        *self.shared.config.write() = Arc::new(config);
        self.shared.reindex();
        for t in self.shared.tasks.lock().drain(..) {
            t.abort();
        }
        self.shared.groups.lock().clear();
        let now = self.shared.now();
        let alerts: Vec<Alert> = self.shared.alerts.lock().values().cloned().collect();
        for a in alerts {
            self.shared.route(a, now);
        }
    }

    /// The silences.
    pub fn silences(&self) -> &Silences {
        &self.shared.silences
    }

    /// Now, in ms.
    pub fn now(&self) -> i64 {
        self.shared.now()
    }

    /// How long an alert posted without an end stays firing.
    pub fn resolve_timeout(&self) -> Duration {
        self.shared.config.read().resolve_timeout
    }

    /// Every alert the notifier holds, in Alertmanager's API v2 form.
    pub fn alerts_json(&self) -> Vec<Value> {
        let now = self.shared.now();
        let config = self.shared.config.read().clone();
        let alerts: Vec<Alert> = self.shared.alerts.lock().values().cloned().collect();
        let mut out: Vec<(Labels, Value)> = alerts
            .iter()
            .filter(|a| !a.resolved(now))
            .map(|a| {
                let silenced = self.shared.silences.muting(fingerprint(&a.labels), &a.labels, now);
                let inhibited = self.shared.inhibitors(&config, a, now);
                let state = if silenced.is_empty() && inhibited.is_empty() { "active" } else { "suppressed" };
                let receivers: Vec<Value> =
                    config.route.matching(&a.labels).iter().map(|r| json!({"name": r.receiver})).collect();
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
                (a.labels.clone(), v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, v)| v).collect()
    }
}

impl Sink for Notifier {
    fn send(&self, alerts: Vec<Alert>) {
        let n = alerts.len() as u64;
        if self.tx.try_send(alerts).is_err() {
            // Rules resend every firing alert, so a dropped update is late, not lost.
            self.shared.metrics.alerts_dropped.inc_by(n);
        }
    }
}

impl Shared {
    fn now(&self) -> i64 {
        self.clock.now_nanos().div_euclid(1_000_000)
    }

    /// Merges an incoming alert into the known ones and hands it to its groups.
    fn ingest(self: &Arc<Self>, alert: Alert, now: i64) {
        self.metrics.alerts_received.inc();
        let fp = fingerprint(&alert.labels);
        let alert = {
            let mut alerts = self.alerts.lock();
            if !alerts.contains_key(&fp) && alerts.len() >= self.settings.max_alerts {
                self.metrics.alerts_dropped.inc();
                self.metrics.limit_hit("alerting.max_alerts");
                return;
            }
            self.merge(&mut alerts, alert)
        };
        self.route(alert, now);
    }

    /// Puts `alert` among the known `alerts` (the same alert still going on keeps its start)
    /// and the inhibit index; returns it as kept.
    fn merge(&self, alerts: &mut HashMap<u64, Alert>, mut alert: Alert) -> Alert {
        let fp = fingerprint(&alert.labels);
        if let Some(old) = alerts.get(&fp) {
            if !old.resolved(alert.starts_at) && old.starts_at < alert.starts_at {
                alert.starts_at = old.starts_at;
            }
        }
        let rules = &self.config.read().inhibit_rules;
        self.inhibit.lock().add(rules, fp, &alert);
        alerts.insert(fp, alert.clone());
        alert
    }

    fn route(self: &Arc<Self>, alert: Alert, now: i64) {
        let fp = fingerprint(&alert.labels);
        let config = self.config.read().clone();
        for route in config.route.matching(&alert.labels) {
            let labels = route.group_labels(&alert.labels);
            let key = format!("{}:{}", route.key, label_set_string(&labels));
            let map_key = format!("{}\0{key}", route.receiver);
            let (group, created) = {
                let mut groups = self.groups.lock();
                let group = match groups.get(&map_key) {
                    Some(g) => (g.clone(), false),
                    None => {
                        let g = Arc::new(Group {
                            key,
                            route: route.clone(),
                            labels,
                            alerts: Mutex::new(BTreeMap::new()),
                            wake: Notify::new(),
                            flushed: std::sync::atomic::AtomicBool::new(false),
                        });
                        groups.insert(map_key.clone(), g.clone());
                        (g, true)
                    }
                };
                // Inserted under the groups lock, so a group found empty and removed by its
                // task cannot take an alert after it is gone.
                group.0.alerts.lock().insert(fp, alert.clone());
                group
            };
            if created {
                let task = tokio::spawn(run_group(self.clone(), group.clone(), map_key));
                let mut tasks = self.tasks.lock();
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
            // An alert that started longer than group_wait ago is not held back again.
            let flushed = group.flushed.load(std::sync::atomic::Ordering::Acquire);
            if !flushed && alert.starts_at + route.group_wait.as_millis() as i64 <= now {
                group.wake.notify_one();
            }
        }
    }

    /// The fingerprints (hex) of firing alerts that inhibit `target`: one index lookup per
    /// inhibit rule whose target matchers `target` matches.
    fn inhibitors(&self, config: &NotifierConfig, target: &Alert, now: i64) -> Vec<String> {
        if config.inhibit_rules.is_empty() {
            return Vec::new();
        }
        let target_fp = fingerprint(&target.labels);
        self.inhibit
            .lock()
            .inhibitors(&config.inhibit_rules, target_fp, target, now)
            .into_iter()
            .map(|fp| format!("{fp:016x}"))
            .collect()
    }

    /// Rebuilds the inhibition index from the alerts held (after a reload or a clean-up).
    fn reindex(&self) {
        let rules = self.config.read().inhibit_rules.clone();
        let alerts = self.alerts.lock();
        *self.inhibit.lock() =
            super::inhibit::InhibitIndex::build(&rules, alerts.iter().map(|(fp, a)| (*fp, a)));
    }

    fn breaker(&self, receiver: &str, index: usize, group_interval: Duration) -> Arc<Breaker> {
        let key = format!("{receiver}\0{index}");
        let cool_down = group_interval.clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.breakers.lock().entry(key).or_insert_with(|| Arc::new(Breaker::new(cool_down))).clone()
    }

    /// Cleans up resolved alerts no longer needed and expired log entries.
    fn maintain(&self, now: i64) {
        self.alerts.lock().retain(|_, a| !(a.resolved(now) && a.ends_at + RESOLVED_RETENTION_MS < now));
        self.reindex();
        // Keeps the mute cache to the alerts still held.
        self.silences.invalidate();
        let expired: Vec<Vec<u8>> = self
            .log
            .lock()
            .iter()
            .filter(|(_, e)| e.timestamp + NFLOG_RETENTION_MS < now)
            .map(|(k, _)| k.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        let deletes: Vec<_> = expired.iter().map(|k| (k.clone(), None)).collect();
        match self.store.write_alerting(&deletes) {
            Ok(()) => {
                let mut log = self.log.lock();
                expired.iter().for_each(|k| {
                    log.remove(k);
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot expire notification log entries"),
        }
    }
}

/// Alertmanager's `model.LabelSet.String()`: `{a="b", c="d"}`.
fn label_set_string(labels: &Labels) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={}", go_quote(v))).collect();
    format!("{{{}}}", parts.join(", "))
}

async fn dispatch(shared: Arc<Shared>, mut rx: mpsc::Receiver<Vec<Alert>>) {
    let mut stop = shared.stop.clone();
    let mut maintenance = tokio::time::interval(MAINTENANCE);
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let now = shared.now();
                for a in batch {
                    shared.ingest(a, now);
                }
            }
            _ = maintenance.tick() => shared.maintain(shared.now()),
            _ = stop.wait_for(|&s| s) => break,
        }
    }
    for t in shared.tasks.lock().drain(..) {
        t.abort();
    }
}

async fn run_group(shared: Arc<Shared>, group: Arc<Group>, map_key: String) {
    let mut stop = shared.stop.clone();
    let mut next = tokio::time::Instant::now() + group.route.group_wait;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = group.wake.notified() => {}
            _ = stop.wait_for(|&s| s) => return,
        }
        // The next flush is one interval after this one started, as in Alertmanager, however
        // long delivery takes.
        next = tokio::time::Instant::now() + group.route.group_interval;
        flush(&shared, &group).await;
        group.flushed.store(true, std::sync::atomic::Ordering::Release);
        let mut groups = shared.groups.lock();
        if group.alerts.lock().is_empty() {
            if groups.get(&map_key).is_some_and(|g| Arc::ptr_eq(g, &group)) {
                groups.remove(&map_key);
            }
            return;
        }
    }
}

/// One flush of a group.
async fn flush(shared: &Arc<Shared>, group: &Arc<Group>) {
    let now = shared.now();
    let config = shared.config.read().clone();
    let snapshot: Vec<(u64, Alert)> = group.alerts.lock().iter().map(|(k, v)| (*k, v.clone())).collect();
    let mut alerts: Vec<Alert> = snapshot
        .iter()
        .map(|(_, a)| a.clone())
        .filter(|a| {
            // Muting applies to firing alerts; a resolve is never held back.
            a.resolved(now)
                || (shared.silences.muting(fingerprint(&a.labels), &a.labels, now).is_empty()
                    && shared.inhibitors(&config, a, now).is_empty())
        })
        .collect();
    alerts.sort_by(|a, b| {
        let key = |x: &Alert| (x.labels.get("job").cloned(), x.labels.get("instance").cloned());
        key(a).cmp(&key(b)).then_with(|| a.labels.cmp(&b.labels))
    });
    let firing: BTreeSet<u64> =
        alerts.iter().filter(|a| !a.resolved(now)).map(|a| fingerprint(&a.labels)).collect();
    let resolved: BTreeSet<u64> =
        alerts.iter().filter(|a| a.resolved(now)).map(|a| fingerprint(&a.labels)).collect();
    let receiver_name = group.route.receiver.clone();
    let Some(receiver) = config.receivers.get(&receiver_name).cloned() else { return };
    let notification = Notification {
        receiver: receiver_name.clone(),
        group_key: group.key.clone(),
        group_labels: group.labels.clone(),
        alerts,
        now,
        external_url: shared.settings.external_url.clone(),
    };
    let started = Instant::now();
    let deadline = started + group.route.group_interval.max(Duration::from_secs(1));
    let mut all_ok = true;
    for (i, integration) in receiver.integrations.iter().enumerate() {
        let mut key = NFLOG_PREFIX.to_vec();
        key.extend_from_slice(format!("{receiver_name}\0{}\0{i}", group.key).as_bytes());
        let entry = shared.log.lock().get(&key).cloned();
        let due = LogEntry::needs_update(
            entry.as_ref(),
            &firing,
            &resolved,
            integration.send_resolved(),
            group.route.repeat_interval,
            now,
        );
        if !due {
            continue;
        }
        if let Some(request) = integration.request(&notification) {
            let breaker = shared.breaker(&receiver_name, i, group.route.group_interval);
            let target = Target {
                client: &shared.http,
                receiver: &receiver_name,
                breaker: &breaker,
                timeout: shared.settings.webhook_timeout,
                metrics: &shared.metrics,
            };
            let label = ReceiverLabel { receiver: receiver_name.clone() };
            // A bounded pool: a burst of groups (5,000 services, each its own group) waits its
            // turn instead of opening a connection each.
            let Ok(_permit) = shared.deliveries.clone().acquire_owned().await else { return };
            let retryable = |status| integration.retryable(status);
            match retry::deliver(target, &request, &retryable, deadline).await {
                Ok(()) => {
                    shared.metrics.notifications.get_or_create(&label).inc();
                    shared.metrics.notification_latency.observe(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    shared.metrics.notifications_failed.get_or_create(&label).inc();
                    tracing::warn!(receiver = %receiver_name, integration = integration.kind(), group = %group.key, error = %e, "notification failed; retrying at the next group interval");
                    all_ok = false;
                    continue;
                }
            }
        }
        let entry = LogEntry { firing: firing.clone(), resolved: resolved.clone(), timestamp: now };
        let value = serde_json::to_vec(&entry).ok();
        let store = shared.store.clone();
        let record = vec![(key.clone(), value)];
        match tokio::task::spawn_blocking(move || store.write_alerting(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot persist the notification log"),
            Err(e) => tracing::error!(error = %e, "notification log task failed"),
        }
        shared.log.lock().insert(key, entry);
    }
    if all_ok {
        // Resolved alerts that were delivered (and not updated since) leave the group.
        let mut alerts = group.alerts.lock();
        for (fp, a) in &snapshot {
            if a.resolved(now) && alerts.get(fp) == Some(a) {
                alerts.remove(fp);
            }
        }
    }
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
        let e = LogEntry { firing: set(&[1, 2]), resolved: set(&[]), timestamp: 0 };
        // Nothing logged: only firing alerts make a first notification.
        assert!(LogEntry::needs_update(None, &set(&[1]), &set(&[]), true, hour, 0));
        assert!(!LogEntry::needs_update(None, &set(&[]), &set(&[1]), true, hour, 0));
        // A new firing alert.
        assert!(LogEntry::needs_update(Some(&e), &set(&[1, 3]), &set(&[]), true, hour, 1));
        // Same or fewer firing, nothing newly resolved: wait for the repeat interval.
        assert!(!LogEntry::needs_update(Some(&e), &set(&[1]), &set(&[]), true, hour, 1));
        assert!(LogEntry::needs_update(Some(&e), &set(&[1]), &set(&[]), true, hour, 3_600_000));
        // One resolved while another fires: only receivers that want resolves hear of it.
        assert!(LogEntry::needs_update(Some(&e), &set(&[1]), &set(&[2]), true, hour, 1));
        assert!(!LogEntry::needs_update(Some(&e), &set(&[1]), &set(&[2]), false, hour, 1));
        // All resolved: tell the receiver that knew they fired.
        assert!(LogEntry::needs_update(Some(&e), &set(&[]), &set(&[1, 2]), true, hour, 1));
        let quiet = LogEntry { firing: set(&[]), resolved: set(&[1, 2]), timestamp: 0 };
        assert!(!LogEntry::needs_update(Some(&quiet), &set(&[]), &set(&[1, 2]), true, hour, 1));
    }

    #[test]
    fn label_sets_print_as_alertmanager_does() {
        let l: Labels =
            [("service".to_string(), "a\"b".to_string()), ("alertname".to_string(), "X".to_string())].into();
        assert_eq!(label_set_string(&l), r#"{alertname="X", service="a\"b"}"#);
        assert_eq!(label_set_string(&Labels::new()), "{}");
    }
}
