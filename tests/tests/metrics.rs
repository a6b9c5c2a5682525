//! Every metric of the catalog (and so of the README's reference) is what
//! the services really export at `/metrics`, each from the process the
//! catalog says, with per-expert series for every expert from the start.

use std::collections::BTreeSet;
use std::time::Duration;

use moe_e2e::{generate, greedy, http, start_with, tiny_checkpoint, within};
use moe_telemetry::catalog::{self, Kind, Service};

/// The metric families a Prometheus text page declares (`# TYPE name`).
fn families(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Series (sample lines) on a page.
fn series(page: &str) -> usize {
    page.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_exports_every_catalog_metric_and_every_expert_has_its_series() {
    let checkpoint = tiny_checkpoint();
    let cluster = start_with(checkpoint.path(), |_| {}).await;
    generate(&cluster.router_uri(), greedy(&[3, 9, 27], 5))
        .await
        .expect("the request succeeds");
    let router_http = cluster.router_http().expect("the router serves HTTP");
    // The gauges computed from windows are set once the dashboard's loop
    // has run after the request.
    let router_page = within("the window gauges are set", async {
        loop {
            let (status, page) = http::get(router_http, "/metrics").await.unwrap();
            assert_eq!(status, 200);
            if page.contains("\nmoe_expert_imbalance_ratio ") {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Every expert covered: the router's probe endpoint says so too.
    assert_eq!(
        http::get(router_http, "/readyz").await.unwrap(),
        (200, "SERVING\n".to_owned())
    );
    let expert_http = cluster.experts[0].metrics.expect("experts serve /metrics");
    let (status, expert_page) = http::get(expert_http, "/metrics").await.unwrap();
    assert_eq!(status, 200);

    let (router_families, expert_families) = (families(&router_page), families(&expert_page));
    for spec in catalog::ALL {
        let (page, other) = match spec.service {
            Service::Router => (&router_families, &expert_families),
            Service::Expert => (&expert_families, &router_families),
        };
        let name = spec.prometheus_name();
        assert!(
            page.contains(&name),
            "{name} missing from {:?}'s /metrics",
            spec.service
        );
        assert!(
            !other.contains(&name),
            "{name} exported by the wrong service"
        );
    }
    assert_eq!(
        router_families.len() + expert_families.len(),
        catalog::ALL.len(),
        "no metric outside the catalog: {router_families:?} {expert_families:?}"
    );

    // Histogram buckets are the catalog's, per metric, not the SDK's.
    for spec in catalog::ALL
        .iter()
        .filter(|spec| spec.kind == Kind::Histogram)
    {
        let page = match spec.service {
            Service::Router => &router_page,
            Service::Expert => &expert_page,
        };
        let bucket_line = format!("{}_bucket{{", spec.prometheus_name());
        let mut bounds: Vec<f64> = page
            .lines()
            .filter(|line| line.starts_with(&bucket_line))
            .filter_map(|line| line.split("le=\"").nth(1)?.split('"').next())
            .filter(|le| *le != "+Inf")
            .map(|le| le.parse().unwrap())
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        assert_eq!(bounds, spec.buckets, "{}'s buckets", spec.name);
    }

    // Bound at start: all 16 experts × 4 layers have a rows series, even
    // those the one request did not reach.
    let rows_series = router_page
        .lines()
        .filter(|line| line.starts_with("moe_expert_rows_total{"))
        .count();
    assert_eq!(rows_series, 16 * 4);
    for expert in 0..16 {
        let ready = format!("moe_expert_replicas{{expert=\"{expert}\",state=\"ready\"}} 1");
        assert!(router_page.lines().any(|line| line == ready), "no {ready}");
    }
    assert!(expert_page.contains("moe_expert_replica_busy_seconds_total{expert=\"0\"}"));

    let expert_series: usize = {
        let mut total = 0;
        for expert in &cluster.experts {
            let (_, page) = http::get(expert.metrics.unwrap(), "/metrics")
                .await
                .unwrap();
            total += series(&page);
        }
        total
    };
    println!(
        "series: router {} + 16 experts {expert_series} = {}",
        series(&router_page),
        series(&router_page) + expert_series
    );
    cluster.shutdown(Duration::from_secs(5)).await;
}
