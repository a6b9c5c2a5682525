//! The Grafana dashboard and the Prometheus rules shipped in
//! `deploy/observability` against a real Prometheus scraping a live
//! distributed cluster under load: every dashboard query and every rule
//! evaluates, without error, to series, and a per-expert one to a series
//! for each of the 16 experts.
//!
//! Nothing else reads those files: a renamed metric, a label that is not
//! exported, or a series that only exists once something goes wrong would
//! otherwise show up as an empty panel or a silent alert in production.
//! `promtool` checks the rules' syntax; only evaluation against the
//! metrics the processes really export checks their meaning.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use moe_e2e::http::{encode, get, program};
use moe_e2e::load::Load;
use moe_e2e::{start_with, tiny_checkpoint, within};
use serde_json::Value;

/// Experts of the tiny checkpoint: a per-expert query must give each one.
const EXPERTS: usize = 16;

/// Generations in flight at once: enough for every metric to move, few
/// enough for two cores that also run 17 services and Prometheus.
const CONCURRENCY: usize = 3;

/// What the test gives Grafana's `$__rate_interval`: several of its
/// one-second scrapes, so that a rate has the two samples it needs soon
/// after the first scrapes.
const RATE_INTERVAL: &str = "15s";

/// How long the queries may keep failing before the test reports them:
/// rates need two scrapes, recorded series an evaluation after those.
const POLL_LIMIT: Duration = Duration::from_secs(40);

/// How long the rules must have been evaluating before their health
/// counts: a few of their one-second evaluations.
const EVALUATIONS_WINDOW: Duration = Duration::from_secs(5);

const DASHBOARD: &str = "deploy/observability/grafana/moe-serve.json";
const RULES: &str = "deploy/observability/prometheus/rules.yml";

/// Under steady load, Prometheus scrapes the router and all 16 experts,
/// evaluates every rule healthily, and answers every dashboard query and
/// every rule's expression with series, per-expert ones for each expert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_dashboard_query_and_rule_from_a_live_cluster() {
    let started = Instant::now();
    let rules = repository_file(RULES);
    promtool_checks(&rules).await;
    let dashboard = dashboard_queries(&repository_file(DASHBOARD));

    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |_| {}).await;
    let router = cluster.router_http().expect("the router serves /metrics");
    let experts: Vec<SocketAddr> = (cluster.experts.iter())
        .map(|slot| slot.metrics.expect("each expert serves /metrics"))
        .collect();
    assert_eq!(experts.len(), EXPERTS, "one process per expert");
    let load = Load::start(&cluster.router_uri(), CONCURRENCY, 32);

    let prometheus = Prometheus::start(router, &experts, &rules).await;
    let rule_queries = rule_queries(&prometheus).await;
    let expressions = dashboard.len() + rule_queries.len();
    let mut pending: Vec<Check> = dashboard.into_iter().chain(rule_queries).collect();
    let ready = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let mut failures = prometheus.targets_down(1 + EXPERTS).await;
        failures.extend(prometheus.unhealthy_rules().await);
        let mut still_failing = Vec::new();
        for mut check in pending {
            match prometheus.query(&check.query).await.and_then(judge) {
                Ok(()) => {}
                Err(why) => {
                    check.why = why;
                    still_failing.push(check);
                }
            }
        }
        pending = still_failing;
        failures.extend(pending.iter().map(Check::to_string));
        if failures.is_empty() && ready.elapsed() >= EVALUATIONS_WINDOW {
            break;
        }
        if ready.elapsed() >= POLL_LIMIT {
            panic!(
                "after {POLL_LIMIT:?} of scrapes under load, {} problem(s):\n\n{}\n\n\
                 Prometheus's log:\n{}",
                failures.len(),
                failures.join("\n\n"),
                prometheus.log()
            );
        }
    }
    println!(
        "{expressions} expressions answered in {:?} after Prometheus was ready",
        ready.elapsed()
    );

    load.stop().await;
    cluster.shutdown(Duration::from_secs(5)).await;
    println!("whole test: {:?}", started.elapsed());
}

/// A PromQL expression to evaluate, where it came from, and why it failed
/// the last time it was asked.
struct Check {
    origin: String,
    query: String,
    why: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n  query: {}\n  {}",
            self.origin, self.query, self.why
        )
    }
}

fn repository_file(relative: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    root.join(relative)
}

async fn promtool_checks(rules: &Path) {
    let output = tokio::process::Command::new(program("promtool", "prometheus"))
        .args(["check", "rules"])
        .arg(rules)
        .kill_on_drop(true)
        .output();
    let output = within("promtool check rules", output)
        .await
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check rules {} failed:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `targets[].expr` of the dashboard's panels, rows' nested panels
/// included, with Grafana's interval variable filled in.
fn dashboard_queries(path: &Path) -> Vec<Check> {
    let text = std::fs::read_to_string(path).expect("the Grafana dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut checks = Vec::new();
    collect_targets(&dashboard["panels"], &mut checks);
    assert!(!checks.is_empty(), "{} has no queries", path.display());
    checks
}

fn collect_targets(panels: &Value, checks: &mut Vec<Check>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("untitled");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            checks.push(Check {
                origin: format!(
                    "dashboard panel {title:?}, target {}",
                    target["refId"].as_str().unwrap_or("?")
                ),
                query: expr.replace("$__rate_interval", RATE_INTERVAL),
                why: String::new(),
            });
        }
        collect_targets(&panel["panels"], checks);
    }
}

/// Every rule as Prometheus loaded it: a recording rule's expression, and
/// an alert's without its final comparison (the rules file keeps the
/// interesting series on the left of a single `<op> <number>`).
async fn rule_queries(prometheus: &Prometheus) -> Vec<Check> {
    let data = (prometheus.api("/api/v1/rules").await).expect("Prometheus lists its rules");
    let mut checks = Vec::new();
    for group in data["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["name"].as_str().unwrap_or("?");
            let query = rule["query"].as_str().unwrap_or_default();
            let (origin, query) = match rule["type"].as_str() {
                Some("alerting") => (
                    format!("alert {name}"),
                    without_comparison(query).unwrap_or_else(|| {
                        panic!("alert {name}'s expression does not end in `<op> <number>`: {query}")
                    }),
                ),
                _ => (format!("recording rule {name}"), query.to_owned()),
            };
            checks.push(Check {
                origin,
                query,
                why: String::new(),
            });
        }
    }
    assert!(
        !checks.is_empty(),
        "Prometheus loaded no rules from {RULES}"
    );
    checks
}

/// `expr` without a trailing ` <op> [bool] <number>`, or None when it has
/// none.
fn without_comparison(expr: &str) -> Option<String> {
    let (rest, number) = expr.trim_end().rsplit_once(' ')?;
    number.parse::<f64>().ok()?;
    let rest = rest.trim_end();
    let rest = rest.strip_suffix(" bool").unwrap_or(rest);
    let (left, op) = rest.rsplit_once(' ')?;
    ["==", "!=", ">", "<", ">=", "<="]
        .contains(&op)
        .then(|| left.trim().to_owned())
}

/// Whether a query's `data` is what a dashboard or rule needs: series,
/// and for per-expert series, exactly one set for every expert.
fn judge(data: Value) -> Result<(), String> {
    let series = match data["resultType"].as_str() {
        Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
        Some("scalar") => return Ok(()),
        other => return Err(format!("unexpected result type {other:?}: {data}")),
    };
    if series.is_empty() {
        return Err("no series came back".into());
    }
    let experts: BTreeSet<u64> = (series.iter())
        .filter_map(|series| series["metric"]["expert"].as_str())
        .map(|expert| expert.parse().unwrap_or(u64::MAX))
        .collect();
    let all: BTreeSet<u64> = (0..EXPERTS as u64).collect();
    if experts.is_empty() || experts == all {
        return Ok(());
    }
    Err(format!(
        "per-expert series for experts {experts:?}, missing {:?}, unexpected {:?}; came back: {}",
        all.difference(&experts).collect::<Vec<_>>(),
        experts.difference(&all).collect::<Vec<_>>(),
        clip(&Value::Array(series).to_string())
    ))
}

fn clip(text: &str) -> String {
    const LIMIT: usize = 600;
    match text.char_indices().nth(LIMIT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// A Prometheus server on a free loopback port with its own storage,
/// scraping the cluster and evaluating the rules every second; killed
/// with its handle.
struct Prometheus {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    _process: tokio::process::Child,
}

impl Prometheus {
    async fn start(router: SocketAddr, experts: &[SocketAddr], rules: &Path) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for Prometheus");
        let rules_copy = dir.path().join("rules.yml");
        let rules_text = std::fs::read_to_string(rules).expect("the rules file");
        std::fs::write(&rules_copy, every_second(&rules_text)).expect("write the rules");
        let targets = |addrs: &[SocketAddr]| {
            (addrs.iter())
                .map(|addr| format!("'{addr}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n\
             \x20 - job_name: router\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: expert\n    static_configs:\n      - targets: [{}]\n",
            rules_copy.display(),
            targets(&[router]),
            targets(experts),
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write Prometheus's config");
        let addr = free_loopback_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
        let mut process = tokio::process::Command::new(program("prometheus", "prometheus"))
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("Prometheus starts");
        let ready = async {
            loop {
                if let Ok(Some(status)) = process.try_wait() {
                    return Err(status);
                }
                if let Ok((200, _)) = get(addr, "/-/ready").await {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let prometheus_log = || std::fs::read_to_string(dir.path().join("prometheus.log"));
        if let Err(status) = within("Prometheus is ready", ready).await {
            panic!("Prometheus exited ({status}):\n{:?}", prometheus_log());
        }
        Self {
            addr,
            dir,
            _process: process,
        }
    }

    /// The `data` of an API answer, or what came back instead.
    async fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let (status, body) = (get(self.addr, path_and_query).await)
            .map_err(|err| format!("no answer from Prometheus: {err:#}"))?;
        let answer: Value = serde_json::from_str(&body)
            .map_err(|_| format!("HTTP {status}, not JSON: {}", clip(&body)))?;
        if answer["status"] != "success" {
            return Err(format!(
                "HTTP {status}: {} {}",
                answer["errorType"], answer["error"]
            ));
        }
        Ok(answer["data"].clone())
    }

    async fn query(&self, promql: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", encode(promql)))
            .await
    }

    /// What is wrong with the scrape targets, unless exactly `expected`
    /// are all up.
    async fn targets_down(&self, expected: usize) -> Vec<String> {
        let data = match self.api("/api/v1/targets?state=active").await {
            Ok(data) => data,
            Err(why) => return vec![format!("/api/v1/targets: {why}")],
        };
        let targets = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut problems: Vec<String> = (targets.iter())
            .filter(|target| target["health"] != "up")
            .map(|target| {
                format!(
                    "target {} is {}: {}",
                    target["scrapeUrl"], target["health"], target["lastError"]
                )
            })
            .collect();
        if targets.len() != expected {
            problems.push(format!(
                "{} scrape targets, expected {expected} (the router and each expert)",
                targets.len()
            ));
        }
        problems
    }

    /// Every rule whose last evaluation was not healthy (or has not run).
    async fn unhealthy_rules(&self) -> Vec<String> {
        let data = match self.api("/api/v1/rules").await {
            Ok(data) => data,
            Err(why) => return vec![format!("/api/v1/rules: {why}")],
        };
        (data["groups"].as_array().into_iter().flatten())
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .filter(|rule| rule["health"] != "ok")
            .map(|rule| {
                format!(
                    "rule {} has health {}: {}",
                    rule["name"], rule["health"], rule["lastError"]
                )
            })
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// The rules with each group's `interval` at one second. The file's own
/// intervals suit production; here they would make the test wait tens of
/// seconds for the recorded series the alerts read, and a group's
/// interval overrides the global `evaluation_interval`.
fn every_second(rules: &str) -> String {
    (rules.lines())
        .map(|line| match line.trim_start().strip_prefix("interval:") {
            Some(_) => format!(
                "{}interval: 1s",
                &line[..line.len() - line.trim_start().len()]
            ),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A loopback address no one listened on a moment ago. Prometheus takes
/// no port 0 and prints no address, so the test picks one for it.
fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("its address")
}
