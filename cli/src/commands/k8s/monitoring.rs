//! Observability and autoscaling plumbing: ServiceMonitors, the
//! PrometheusRule and Grafana dashboard from deploy/observability (embedded
//! at build time, so the binary needs no checkout), prometheus-adapter's
//! rule, and the kustomization that ties the files together.

use anyhow::Context;
use serde_json::{Value, json};

use super::{Autoscaler, Plan};

/// The router's autoscaling gauge, as Prometheus names it.
pub const DESIRED_METRIC: &str = "moe_expert_desired_replicas";
/// prometheus-adapter's config, turned into a ConfigMap by kustomize.
pub const ADAPTER_CONFIG_FILE: &str = "prometheus-adapter-config.yaml";
pub const ADAPTER_CONFIG_MAP: &str = "moe-prometheus-adapter";
/// The Grafana dashboard, copied as is.
pub const DASHBOARD_FILE: &str = "grafana-dashboard.json";
pub const DASHBOARD_CONFIG_MAP: &str = "moe-serve-grafana-dashboard";
pub const DASHBOARD: &str = include_str!("../../../../deploy/observability/grafana/moe-serve.json");
const RULES: &str = include_str!("../../../../deploy/observability/prometheus/rules.yml");

/// ServiceMonitors for the router and the experts, and the rules.
pub fn objects() -> anyhow::Result<Vec<Value>> {
    let rules: Value = serde_norway::from_str(RULES)
        .context("deploy/observability/prometheus/rules.yml is not valid YAML")?;
    let labels = json!({"app.kubernetes.io/name": "moe-serve"});
    let monitor = |name: &str, component: &str, port: &str| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {
                    "app.kubernetes.io/name": "moe-serve",
                    "app.kubernetes.io/component": component,
                }},
                "endpoints": [{"port": port, "path": "/metrics", "interval": "15s"}],
            },
        })
    };
    Ok(vec![
        monitor("router", "router", "http"),
        monitor("experts", "expert", "metrics"),
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "moe-serve", "labels": labels},
            "spec": rules,
        }),
    ])
}

/// prometheus-adapter's `externalRules`: the router's gauge as an external
/// metric of the same name, per namespace, selected by `expert`. `max`
/// folds the series of router restarts (or several routers) into one.
pub fn adapter_config() -> Value {
    json!({
        "externalRules": [{
            "seriesQuery": format!("{DESIRED_METRIC}{{namespace!=\"\",expert!=\"\"}}"),
            "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
            "name": {"matches": format!("^{DESIRED_METRIC}$"), "as": DESIRED_METRIC},
            "metricsQuery": "max by (expert) (<<.Series>>{<<.LabelMatchers>>})",
        }],
    })
}

pub fn kustomization(plan: &Plan, resources: &[String]) -> Value {
    let mut generators = vec![json!({
        "name": DASHBOARD_CONFIG_MAP,
        "files": [format!("moe-serve.json={DASHBOARD_FILE}")],
        // The Grafana sidecar loads every ConfigMap with this label.
        "options": {"disableNameSuffixHash": true, "labels": {"grafana_dashboard": "1"}},
    })];
    if plan.autoscaler == Autoscaler::Hpa {
        generators.push(json!({
            "name": ADAPTER_CONFIG_MAP,
            "files": [format!("config.yaml={ADAPTER_CONFIG_FILE}")],
            "options": {"disableNameSuffixHash": true},
        }));
    }
    json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": plan.namespace,
        "resources": resources,
        "configMapGenerator": generators,
    })
}
