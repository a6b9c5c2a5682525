//! The router's live dashboard as a person sees it: a real browser
//! (headless Chromium) loads `/dashboard` from a distributed cluster under
//! load, runs the page's script, and what it renders shows every expert
//! busy; a screenshot of it is kept as a test artefact for a human to look
//! at.
//!
//! The JSON is polled until every expert's figures are known; then the
//! page is checked through its rendered DOM, which is what only a browser
//! can catch: the script failing to poll, parse or render.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use moe_e2e::http::{get, program};
use moe_e2e::load::Load;
use moe_e2e::{start_with, tiny_checkpoint, within};

/// Experts of the tiny checkpoint; the page must show a row for each.
const EXPERTS: usize = 16;

/// Generations in flight at once: enough for every expert to get rows
/// within the dashboard's ten-second rate window, few enough for two cores
/// that also run Chromium.
const CONCURRENCY: usize = 4;

/// How often a browser loads the page before the test gives up: the rates
/// are over a sliding window, so a load can catch one a moment short.
const PAGE_LOADS: usize = 3;

/// A screenshot of a rendered page is tens of kilobytes or more; a blank
/// or single-colour one of the same size compresses to a few.
const MIN_SCREENSHOT_BYTES: u64 = 20 * 1024;

/// How long one Chromium run may take: it starts cold, on two busy cores.
const BROWSER_PATIENCE: Duration = Duration::from_secs(90);

/// Under steady load, the dashboard a browser renders shows each of the 16
/// experts with a positive rows/s rate, its call latency p50 ≤ p99, a
/// desired count, one ready replica and its busy fraction, a heatmap with a cell per expert and
/// layer, the throughput tiles filled in, and a page that updated itself
/// more than once; its screenshot is not blank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shows_every_expert_busy_on_the_dashboard_under_load() {
    let started = Instant::now();
    let chromium = program("chromium", "chromium");
    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |_| {}).await;
    let http = cluster.router_http().expect("the router serves HTTP");
    let load = Load::start(&cluster.router_uri(), CONCURRENCY, 48);

    let layers = within(
        "every expert has rows in the dashboard's rate window",
        every_expert_has_rows(http),
    )
    .await;
    let url = format!("http://{http}/dashboard");

    let mut attempts = Vec::new();
    let page = loop {
        let dom = dump_dom(&chromium, &url).await;
        match Page::read(&dom, layers) {
            Ok(page) => break page,
            Err(problem) if attempts.len() + 1 < PAGE_LOADS => attempts.push(problem),
            Err(problem) => panic!(
                "the rendered dashboard is wrong after {PAGE_LOADS} loads \
                 ({attempts:?} before): {problem}\n--- DOM ---\n{dom}"
            ),
        }
    };
    println!(
        "dashboard: {} updates, rows/s from {:.1} to {:.1} across {EXPERTS} experts, \
         {} tokens/s, {} running",
        page.updated,
        page.rows_rates
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min),
        page.rows_rates.iter().copied().fold(0.0, f64::max),
        page.tokens_per_second,
        page.running,
    );

    let screenshot = artefact_dir().join("dashboard.png");
    take_screenshot(&chromium, &url, &screenshot).await;
    let bytes = std::fs::metadata(&screenshot)
        .unwrap_or_else(|err| panic!("no screenshot at {}: {err}", screenshot.display()))
        .len();
    assert!(
        bytes > MIN_SCREENSHOT_BYTES,
        "{} is {bytes} bytes: a blank page?",
        screenshot.display()
    );
    println!("dashboard screenshot: {}", screenshot.display());

    let generations = load.stop().await;
    println!("load: {generations} generations");
    cluster.shutdown(Duration::from_secs(5)).await;
    println!("took {:.1?}", started.elapsed());
}

/// Polls `/api/dashboard` until every expert's rows/s is at least 0.1 (the
/// page shows one decimal, so anything less reads "0.0") and its latency,
/// desired count and replicas' busy fractions are known; the model's
/// layer count. Polling, not waiting on an event: the rates are over a
/// window of the router's once-a-second samples.
async fn every_expert_has_rows(http: SocketAddr) -> usize {
    loop {
        let (status, body) = get(http, "/api/dashboard")
            .await
            .expect("/api/dashboard answers");
        assert_eq!(status, 200, "/api/dashboard: {body}");
        let view: serde_json::Value = serde_json::from_str(&body).expect("JSON from the dashboard");
        let experts = view["experts"].as_array().expect("an experts array");
        // Rows, call latency, the desired count (once capacity is
        // measured) and each replica's busy fraction, all known.
        let busy = experts
            .iter()
            .filter(|expert| expert["rows_per_second"].as_f64().is_some_and(|r| r >= 0.1))
            .filter(|expert| expert["latency_p50_ms"].as_f64().is_some_and(|ms| ms > 0.0))
            .filter(|expert| expert["desired"].as_u64().is_some_and(|d| d >= 1))
            .filter(|expert| {
                expert["replicas"].as_array().is_some_and(|replicas| {
                    replicas
                        .iter()
                        .all(|r| r["busy_fraction"].as_f64().is_some_and(|b| b > 0.0))
                })
            })
            .count();
        if experts.len() == EXPERTS && busy == EXPERTS {
            return view["num_layers"].as_u64().expect("num_layers") as usize;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the test reads off the rendered page.
struct Page {
    updated: u64,
    rows_rates: Vec<f64>,
    tokens_per_second: f64,
    running: f64,
}

impl Page {
    /// The page in `dom` (Chromium's serialisation after the script ran),
    /// or the first thing wrong with it.
    fn read(dom: &str, layers: usize) -> Result<Self, String> {
        let dom = &without_raw_text(dom);
        let (body, _) = elements(dom, "body").next().ok_or("no <body>")?;
        let updated: u64 = attribute(body, "data-updated")
            .ok_or("<body> has no data-updated")?
            .parse()
            .map_err(|err| format!("data-updated: {err}"))?;
        if updated < 2 {
            return Err(format!("the page updated {updated} times, not at least 2"));
        }

        let rows: Vec<(&str, &str)> = elements(dom, "tr")
            .filter_map(|(tag, rest)| Some((attribute(tag, "data-expert")?, rest)))
            .collect();
        let names: Vec<&str> = rows.iter().map(|(expert, _)| *expert).collect();
        let expected: Vec<String> = (0..EXPERTS).map(|e| e.to_string()).collect();
        if names != expected {
            return Err(format!(
                "expert rows {names:?}, expected 0..{EXPERTS} once each"
            ));
        }
        let mut rows_rates = Vec::new();
        for (expert, rest) in rows {
            let row = &rest[..rest.find("</tr>").unwrap_or(rest.len())];
            let cell = |class: &str| {
                let (_, cell) = elements(row, "td")
                    .find(|(tag, _)| has_class(tag, class))
                    .ok_or(format!("expert {expert}'s row has no td.{class}"))?;
                number(text(cell))
                    .ok_or(format!("expert {expert}'s {class} reads {:?}", text(cell)))
            };
            let rate = cell("rows-rate")?;
            if rate <= 0.0 {
                return Err(format!("expert {expert} shows {rate} rows/s under load"));
            }
            rows_rates.push(rate);
            let (p50, p99) = (cell("p50")?, cell("p99")?);
            if !(p50 > 0.0 && p50 <= p99) {
                return Err(format!(
                    "expert {expert}'s call latency p50 {p50} ms, p99 {p99} ms"
                ));
            }
            if cell("desired")? < 1.0 {
                return Err(format!("expert {expert} shows no desired replicas"));
            }
            cell("resends")?;
            let ready: Vec<&str> = elements(row, "b")
                .filter(|(tag, _)| has_class(tag, "r"))
                .map(|(_, rest)| text(rest))
                .collect();
            if ready != ["1"] {
                return Err(format!(
                    "expert {expert} shows {ready:?} ready replicas, not 1"
                ));
            }
            let busy: Vec<&str> = elements(row, "span")
                .filter(|(tag, _)| has_class(tag, "busy"))
                .map(|(_, rest)| text(rest))
                .collect();
            let percent = |shown: &&str| shown.strip_suffix('%').and_then(number).is_some();
            if busy.len() != 1 || !busy.iter().all(percent) {
                return Err(format!("expert {expert}'s replica busy reads {busy:?}"));
            }
        }

        let (_, heatmap) = elements(dom, "div")
            .find(|(tag, _)| attribute(tag, "id") == Some("heatmap"))
            .ok_or("no #heatmap")?;
        let heatmap = &heatmap[..heatmap.find("</div>").unwrap_or(heatmap.len())];
        let cells = elements(heatmap, "rect")
            .filter(|(tag, _)| has_class(tag, "c"))
            .count();
        if cells != EXPERTS * layers {
            return Err(format!(
                "the heatmap has {cells} cells, not {EXPERTS} experts × {layers} layers"
            ));
        }

        let tokens_per_second = tile(dom, "tokens_per_second")?;
        let tokens_per_second = number(tokens_per_second)
            .filter(|rate| *rate > 0.0)
            .ok_or(format!("the tokens/s tile reads {tokens_per_second:?}"))?;
        let running = tile(dom, "running")?;
        let running = number(running).ok_or(format!("the running tile reads {running:?}"))?;
        Ok(Self {
            updated,
            rows_rates,
            tokens_per_second,
            running,
        })
    }
}

/// `dom` without the contents of its `<script>` and `<style>` elements,
/// which are not markup but may look like it (the page's templates hold
/// `<tr data-expert="${x.expert}">`).
fn without_raw_text(dom: &str) -> String {
    let mut out = String::with_capacity(dom.len());
    let mut rest = dom;
    loop {
        let next = ["script", "style"]
            .into_iter()
            .filter_map(|name| Some((elements(rest, name).next()?, name)))
            .min_by_key(|((tag, _), _)| tag.as_ptr());
        let Some(((tag, after), name)) = next else {
            out.push_str(rest);
            return out;
        };
        let start = tag.as_ptr() as usize - rest.as_ptr() as usize;
        out.push_str(&rest[..start]);
        let close = format!("</{name}>");
        rest = after
            .find(&close)
            .map_or("", |end| &after[end + close.len()..]);
    }
}

/// The value shown by the tile `[data-stat="stat"]`.
fn tile<'a>(dom: &'a str, stat: &str) -> Result<&'a str, String> {
    let (_, rest) = elements(dom, "div")
        .find(|(tag, _)| attribute(tag, "data-stat") == Some(stat))
        .ok_or(format!("no [data-stat={stat:?}] tile"))?;
    let (_, value) = elements(rest, "span")
        .find(|(tag, _)| has_class(tag, "num"))
        .ok_or(format!("the {stat} tile has no value"))?;
    Ok(text(value))
}

/// A number as the page formats one (`toFixed`, or en-US grouping); the
/// page's "–" for no data is not one.
fn number(text: &str) -> Option<f64> {
    text.trim().replace(',', "").parse().ok()
}

/// Each `<name ...>` start tag in `html`, with what follows it.
fn elements<'a>(html: &'a str, name: &str) -> impl Iterator<Item = (&'a str, &'a str)> {
    let open = format!("<{name}");
    let mut from = 0;
    std::iter::from_fn(move || {
        loop {
            let start = from + html[from..].find(&open)?;
            let after = start + open.len();
            from = after;
            if !html[after..].starts_with(|c: char| c.is_ascii_whitespace() || c == '>') {
                continue; // <tbody> when looking for <tr>, and so on.
            }
            let end = tag_end(html, after)?;
            from = end;
            return Some((&html[start..end], &html[end..]));
        }
    })
}

/// The index just past the `>` that closes the start tag going on at
/// `from`, skipping quoted attribute values (which may hold a `>`).
fn tag_end(html: &str, from: usize) -> Option<usize> {
    let mut quote = None;
    for (i, c) in html[from..].char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(from + i + 1),
            _ => {}
        }
    }
    None
}

/// The value of attribute `name` in start tag `tag`, as serialised (with
/// double quotes).
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

fn has_class(tag: &str, class: &str) -> bool {
    attribute(tag, "class").is_some_and(|classes| classes.split_whitespace().any(|c| c == class))
}

/// The text that follows a start tag up to the next tag.
fn text(rest: &str) -> &str {
    rest[..rest.find('<').unwrap_or(rest.len())].trim()
}

/// Where test artefacts go: `test-artifacts` in the workspace's target
/// directory, which CI keeps and `cargo clean` removes.
fn artefact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
    dir.canonicalize().unwrap_or(dir)
}

/// The page's DOM after its script had five seconds of (virtual) time.
async fn dump_dom(chromium: &Path, url: &str) -> String {
    let output = browse(chromium, &["--dump-dom".into(), url.into()]).await;
    String::from_utf8(output.stdout).expect("Chromium's DOM is UTF-8")
}

async fn take_screenshot(chromium: &Path, url: &str, path: &Path) {
    let _ = std::fs::remove_file(path); // An old one must not pass for this one.
    let mut screenshot = OsString::from("--screenshot=");
    screenshot.push(path);
    browse(chromium, &[screenshot, url.into()]).await;
}

/// Runs headless Chromium on a fresh profile with `args`, as these machines
/// need it: as root (no sandbox), without a GPU or network beyond loopback.
/// The virtual-time budget lets the page's once-a-second polls run several
/// times without the test waiting that long for idle time.
async fn browse(chromium: &Path, args: &[OsString]) -> Output {
    let profile = tempfile::tempdir().expect("a temp dir for Chromium's profile");
    let mut user_data_dir = OsString::from("--user-data-dir=");
    user_data_dir.push(profile.path());
    let mut command = tokio::process::Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--window-size=1400,1100",
        ])
        .arg(user_data_dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(BROWSER_PATIENCE, command.output())
        .await
        .unwrap_or_else(|_| panic!("Chromium {args:?}: not done within {BROWSER_PATIENCE:?}"))
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", chromium.display()));
    assert!(
        output.status.success(),
        "Chromium {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
