//! Alerting on percentiles: Prometheus rule files evaluated through the query engine
//! ([`eval`]), and a notifier in Alertmanager's model ([`notify`]) that groups, deduplicates,
//! inhibits and silences before telling each receiver's integrations ([`receivers`]: the
//! webhook's Alertmanager body, and forwarding to existing Alertmanagers).
//!
//! Evaluation and delivery never wait on each other: rules hand alerts to a bounded queue
//! ([`Sink::send`] never blocks), and every aggregation group delivers from its own task.

pub mod eval;
pub mod incidents;
pub mod inhibit;
pub mod matchers;
pub mod notify;
pub mod receivers;
pub mod route;
pub mod rules;
pub mod silences;
pub mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::store::RetentionConfig;
use crate::store::Store;
use crate::telemetry::{Metrics, StateLabel};

/// A label set.
pub type Labels = BTreeMap<String, String>;

/// Go's zero time, which Alertmanager shows as the end of a firing alert.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// An alert as the notifier sees it (Alertmanager's model). Times are ms since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Identity.
    pub labels: Labels,
    /// Descriptions.
    pub annotations: Labels,
    /// When it started firing.
    pub starts_at: i64,
    /// When it resolved, or until when it is valid unless renewed.
    pub ends_at: i64,
    /// Link to the expression that produced it.
    pub generator_url: String,
}

impl Alert {
    /// Whether it is resolved at `now`.
    pub fn resolved(&self, now: i64) -> bool {
        self.ends_at <= now
    }
}

/// Why alerting could not start or reload; nothing changes on an error.
#[derive(Debug, thiserror::Error)]
pub enum AlertingError {
    /// A rule file is missing or invalid (the message names the file, group and rule).
    #[error("{0}")]
    Rules(String),
    /// The Alertmanager-style configuration is missing or invalid (the message names the key).
    #[error("{0}")]
    Receivers(String),
    /// The stored alerting state cannot be read.
    #[error("alerting state: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Where evaluated alerts go; `send` never blocks.
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// Hands over alerts to be notified.
    fn send(&self, alerts: Vec<Alert>);
}

/// Alertmanager's fingerprint of a label set: FNV-1a 64 over the sorted names and values,
/// each followed by the byte 0xff.
pub fn fingerprint(labels: &Labels) -> u64 {
    const OFFSET: u64 = 14_695_981_039_346_656_037;
    const PRIME: u64 = 1_099_511_628_211;
    let mut h = OFFSET;
    let mut add = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for (k, v) in labels {
        add(k.as_bytes());
        add(&[0xff]);
        add(v.as_bytes());
        add(&[0xff]);
    }
    h
}

/// The fingerprint as Alertmanager prints it: 16 hex digits.
pub fn fingerprint_hex(labels: &Labels) -> String {
    format!("{:016x}", fingerprint(labels))
}

/// RFC 3339 in UTC with the fraction's trailing zeros dropped, as Go prints times.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    if frac != 0 {
        out.push_str(format!(".{frac:03}").trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Parses an RFC 3339 time (`Z` or a numeric offset) to ms since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.len() < 20 || !s.is_ascii() {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let sep = |i: usize, c: &[u8]| c.contains(&s.as_bytes()[i]);
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut ms = 0;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &f[..digits.min(3)]);
        ms = padded.parse::<i64>().ok()?;
        rest = &f[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = (rest.get(1..3)?.parse::<i64>().ok()?, rest.get(4..6)?.parse::<i64>().ok()?);
            if rest.len() != 6 || &rest[3..4] != ":" {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset) * 1000 + ms)
}

/// Howard Hinnant's civil-from-days.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `[alerting]`: rule files, the notifier's Alertmanager-style configuration, delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertingConfig {
    /// Prometheus rule files (a directory means every `*.yml`/`*.yaml` in it).
    pub rule_files: Vec<PathBuf>,
    /// Evaluation interval of groups that set none.
    #[serde(with = "humantime_serde")]
    pub evaluation_interval: Duration,
    /// Alertmanager-style YAML (`route`, `receivers`, `inhibit_rules`); empty: no receivers.
    pub alertmanager_config: PathBuf,
    /// Alertmanagers to forward alerts to as well (`http://host:9093`, `https://…`).
    pub alertmanager_urls: Vec<String>,
    /// How to reach them: a YAML file in Alertmanager's `http_config` format (`tls_config`
    /// with a CA or client certificate, `basic_auth`, `authorization`, `proxy_url`); empty:
    /// the system's roots and no credentials.
    pub alertmanager_http_config: PathBuf,
    /// This server's URL as users reach it (links in notifications); empty: the HTTP address.
    pub external_url: String,
    /// Least time between two sends of an unchanged firing alert.
    #[serde(with = "humantime_serde")]
    pub resend_delay: Duration,
    /// Alert updates the notifier's queue holds before it drops (rules resend them).
    pub queue_capacity: usize,
    /// Per-request webhook timeout.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Most silences kept, expired ones still listed included (Alertmanager's
    /// `--silences.max-silences`).
    pub max_silences: usize,
    /// Largest silence accepted, as its JSON (matchers, comment, author), in bytes (Alertmanager's
    /// `--silences.max-silence-size-bytes`).
    pub max_silence_size_bytes: usize,
    /// Most alerts the notifier holds (posted and from rules); beyond it new alerts are
    /// refused (429 for a POST) or dropped, counted.
    pub max_alerts: usize,
    /// Most webhook deliveries in flight at once; the rest wait their turn.
    pub max_concurrent_deliveries: usize,
    /// Topology-aware grouping: alerts stamped with the incident their service's tail
    /// belongs to (`[alerting.incidents]`).
    pub incidents: incidents::IncidentsConfig,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            rule_files: Vec::new(),
            evaluation_interval: Duration::from_secs(60),
            alertmanager_config: PathBuf::new(),
            alertmanager_urls: Vec::new(),
            alertmanager_http_config: PathBuf::new(),
            external_url: String::new(),
            resend_delay: Duration::from_secs(60),
            queue_capacity: 10_000,
            webhook_timeout: Duration::from_secs(10),
            max_silences: 1_000,
            max_silence_size_bytes: 16 * 1024,
            max_alerts: 50_000,
            max_concurrent_deliveries: 32,
            incidents: incidents::IncidentsConfig::default(),
        }
    }
}

impl AlertingConfig {
    /// Checks what the types alone do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.evaluation_interval < Duration::from_millis(100) {
            return Err("evaluation_interval must be at least 100ms".into());
        }
        if self.queue_capacity == 0 {
            return Err("queue_capacity must be at least 1".into());
        }
        if self.max_alerts == 0 || self.max_concurrent_deliveries == 0 {
            return Err("max_alerts and max_concurrent_deliveries must be at least 1".into());
        }
        if self.max_silences == 0 || self.max_silence_size_bytes < 256 {
            return Err("max_silences must be at least 1 and max_silence_size_bytes at least 256".into());
        }
        if self.webhook_timeout.is_zero() {
            return Err("webhook_timeout must be positive".into());
        }
        self.incidents.validate()?;
        for u in &self.alertmanager_urls {
            match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                Ok(_) => return Err(format!("alertmanager_urls: {u:?}: the scheme must be http or https")),
                Err(e) => return Err(format!("alertmanager_urls: {u:?}: {e}")),
            }
        }
        Ok(())
    }

    /// Every rule file named, directories expanded (sorted).
    pub fn rule_paths(&self) -> Result<Vec<PathBuf>, String> {
        expand_rule_paths(&self.rule_files)
    }
}

/// Expands directories into their `*.yml`/`*.yaml` files, sorted.
pub fn expand_rule_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let entries = std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yml" || x == "yaml"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Loads and validates every group of `paths`.
pub fn load_rules(paths: &[PathBuf], default_interval: Duration) -> Result<Vec<rules::RuleGroup>, String> {
    let mut groups = Vec::new();
    for p in paths {
        let mut g = rules::RuleGroup::load_file(p).map_err(|e| e.to_string())?;
        for group in &mut g {
            if !group.interval_set {
                group.interval = default_interval;
            }
        }
        groups.extend(g);
    }
    Ok(groups)
}

fn load_notifier_config(path: &Path) -> Result<route::NotifierConfig, String> {
    if path.as_os_str().is_empty() {
        // No receivers: alerts are evaluated and listed, and go nowhere.
        return route::NotifierConfig::parse("route: {receiver: none}\nreceivers: [{name: none}]\n");
    }
    route::NotifierConfig::load(path)
}

/// Rules, their evaluation tasks, and the notifier.
#[derive(Debug)]
pub struct Alerting {
    config: AlertingConfig,
    ctx: eval::Context,
    groups: RwLock<Vec<Arc<eval::GroupRuntime>>>,
    generation: Mutex<(watch::Sender<bool>, Vec<JoinHandle<()>>)>,
    notifier: notify::Notifier,
    incidents: Option<Arc<incidents::Correlator>>,
    server_stop: watch::Receiver<bool>,
}

/// Sends to the notifier and to every forwarder.
#[derive(Debug)]
struct Fanout(Vec<Arc<dyn Sink>>);

impl Sink for Fanout {
    fn send(&self, alerts: Vec<Alert>) {
        if let Some((last, rest)) = self.0.split_last() {
            for s in rest {
                s.send(alerts.clone());
            }
            last.send(alerts);
        }
    }
}

/// Where this node's notifications come from.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `externalURL` in notifications (links back to this server).
    pub external_url: String,
    /// Cluster mode: whether this node holds the ruler lease. Every node evaluates the rules
    /// (they read the same data, so they hold the same alert states and `for` clocks); only
    /// the holder sends. `None`: a single node, which always sends.
    pub leader: Option<watch::Receiver<bool>>,
}

impl Alerting {
    /// Loads the rules and the notifier configuration and starts evaluating. Fails, naming the
    /// file and the problem, if any of them is invalid.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &AlertingConfig,
        delivery: Delivery,
        store: Store,
        sources: Arc<dyn crate::query::Sources>,
        clock: Arc<dyn Clock>,
        retention: RetentionConfig,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Alerting>, Vec<JoinHandle<()>>), AlertingError> {
        let groups =
            load_rules(&config.rule_paths().map_err(AlertingError::Rules)?, config.evaluation_interval)
                .map_err(AlertingError::Rules)?;
        let notifier_config =
            load_notifier_config(&config.alertmanager_config).map_err(AlertingError::Receivers)?;
        let Delivery { external_url, leader } = delivery;
        let settings = notify::Settings {
            leader,
            external_url: external_url.clone(),
            webhook_timeout: config.webhook_timeout,
            queue_capacity: config.queue_capacity,
            max_alerts: config.max_alerts,
            max_deliveries: config.max_concurrent_deliveries,
            inhibit_symptoms: config.incidents.enabled && config.incidents.inhibit_symptoms,
            silences: silences::Limits {
                max_silences: config.max_silences,
                max_size_bytes: config.max_silence_size_bytes,
            },
        };
        let (notifier, notifier_task) = notify::Notifier::start(
            notifier_config,
            settings,
            Arc::new(store.clone()),
            clock.clone(),
            metrics.clone(),
            stop.clone(),
        )?;
        let mut sinks: Vec<Arc<dyn Sink>> = vec![Arc::new(notifier.clone())];
        let mut tasks = vec![notifier_task];
        if !config.alertmanager_urls.is_empty() {
            let http = receivers::http_config::HttpConfig::load(&config.alertmanager_http_config)
                .map_err(AlertingError::Receivers)?;
            let (forwarder, task) = receivers::alertmanager::Forwarder::start(
                config.alertmanager_urls.clone(),
                http,
                config.queue_capacity,
                config.webhook_timeout,
                metrics.clone(),
                stop.clone(),
            );
            sinks.push(Arc::new(forwarder));
            tasks.push(task);
        }
        let mut sink: Arc<dyn Sink> = Arc::new(Fanout(sinks));
        let mut correlator = None;
        if config.incidents.enabled {
            let env = incidents::Environment {
                sources: sources.clone(),
                state: Arc::new(store.clone()),
                retention: retention.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
            };
            let (c, task) = incidents::Correlator::start(
                config.incidents.clone(),
                env,
                sink,
                config.queue_capacity,
                stop.clone(),
            );
            sink = c.clone();
            correlator = Some(c);
            tasks.push(task);
        }
        let ctx = eval::Context {
            state: Arc::new(store.clone()),
            sources,
            clock,
            retention,
            metrics,
            sink,
            external_url,
            resend_delay: config.resend_delay,
        };
        let (gen_stop, _) = watch::channel(false);
        let alerting = Arc::new(Alerting {
            config: config.clone(),
            ctx,
            groups: RwLock::new(Vec::new()),
            generation: Mutex::new((gen_stop, Vec::new())),
            notifier,
            incidents: correlator,
            server_stop: stop.clone(),
        });
        alerting.install(groups);
        let watcher = alerting.clone();
        let mut stop = stop;
        tasks.push(tokio::spawn(async move {
            let _ = stop.wait_for(|&s| s).await;
            watcher.stop_groups();
        }));
        Ok((alerting, tasks))
    }

    /// Re-reads the rule files and the notifier configuration (SIGHUP, `POST /-/reload`).
    /// Nothing changes unless everything is valid.
    pub fn reload(&self) -> Result<(), AlertingError> {
        let paths = self.config.rule_paths().map_err(AlertingError::Rules)?;
        let groups = load_rules(&paths, self.config.evaluation_interval).map_err(AlertingError::Rules)?;
        let notifier_config =
            load_notifier_config(&self.config.alertmanager_config).map_err(AlertingError::Receivers)?;
        self.notifier.reload(notifier_config);
        self.install(groups);
        tracing::info!(groups = self.groups.read().len(), "alerting configuration reloaded");
        Ok(())
    }

    fn install(&self, groups: Vec<rules::RuleGroup>) {
        let previous = self.groups.read().clone();
        let runtimes: Vec<Arc<eval::GroupRuntime>> = groups
            .into_iter()
            .map(|g| {
                let prev = previous.iter().find(|p| p.group.file == g.file && p.group.name == g.name);
                Arc::new(eval::GroupRuntime::new(g, prev.map(|p| &**p), &*self.ctx.state))
            })
            .collect();
        self.stop_groups();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if !*self.server_stop.borrow() {
            for rt in &runtimes {
                tasks.push(tokio::spawn(rt.clone().run(self.ctx.clone(), stop_rx.clone())));
            }
        }
        *self.groups.write() = runtimes;
        *self.generation.lock() = (stop_tx, tasks);
    }

    fn stop_groups(&self) {
        let mut generation = self.generation.lock();
        let _ = generation.0.send(true);
        for t in generation.1.drain(..) {
            t.abort();
        }
    }

    /// The loaded groups with their state.
    pub fn groups(&self) -> Vec<Arc<eval::GroupRuntime>> {
        self.groups.read().clone()
    }

    /// The notifier.
    pub fn notifier(&self) -> &notify::Notifier {
        &self.notifier
    }

    /// The incidents, when `[alerting.incidents]` is enabled.
    pub fn incidents(&self) -> Option<Vec<incidents::Incident>> {
        self.incidents.as_ref().map(|c| c.incidents())
    }

    /// Refreshes the `tailscope_alerts{state}` gauges.
    pub fn refresh_metrics(&self) {
        let (mut pending, mut firing) = (0, 0);
        for g in self.groups.read().iter() {
            let (p, f) = g.alert_counts();
            pending += p;
            firing += f;
        }
        self.ctx.metrics.alerts.get_or_create(&StateLabel { state: "pending" }).set(pending as i64);
        self.ctx.metrics.alerts.get_or_create(&StateLabel { state: "firing" }).set(firing as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_alertmanagers() {
        // FNV-1a 64 of the empty input is the offset basis.
        assert_eq!(fingerprint(&Labels::new()), 0xcbf2_9ce4_8422_2325);
        let a: Labels = [("a".to_string(), "b".to_string())].into();
        let b: Labels = [("a".to_string(), "bc".to_string())].into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint_hex(&a).len(), 16);
    }

    #[test]
    fn times_print_and_parse_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_744_302_120), "2026-11-27T01:51:42.12Z");
        for ms in [0, 1_795_744_302_120, 951_782_400_000, 4_102_444_800_001] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339("2026-11-27T01:00:00+01:00"), parse_rfc3339("2026-11-27T00:00:00Z"));
        assert_eq!(
            parse_rfc3339("2026-11-27T00:00:00.123456789Z"),
            parse_rfc3339("2026-11-27T00:00:00.123Z")
        );
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-27 00:00",
            "2026-11-27T00:00:00",
            "2026-11-27T00:00:00+0100",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
