//! The workload objects: the namespace, the checkpoint volume, the router
//! and, per expert unit, its Deployment, headless Service, disruption
//! budget and autoscaler.

use serde_json::{Value, json};

use super::sizing::{self, Requests};
use super::{
    Autoscaler, Dtype, EXPERT_GRPC_PORT, EXPERT_METRICS_PORT, ExpertUnit, MODELS_MOUNT, Plan,
    ROUTER_GRPC_PORT, ROUTER_HTTP_PORT,
};

/// The PVC the pods mount at /models.
pub const MODELS_CLAIM: &str = "moe-models";
/// What each service waits for its work in flight after SIGTERM (the
/// services' own defaults, passed explicitly so the relation to the pod's
/// grace period is visible in the manifest).
const ROUTER_SHUTDOWN_GRACE_SECS: u64 = 30;
const EXPERT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// Kubernetes SIGKILLs after this; it must exceed the drain, with room
/// for the flush of telemetry and the process's exit.
const TERMINATION_MARGIN_SECS: u64 = 20;
/// Loading weights may take long (tens of GB from a network volume): the
/// startup probe allows 30 minutes before liveness takes over.
const STARTUP_PERIOD_SECS: u64 = 10;
const STARTUP_FAILURES: u64 = 180;
/// Scale up within half a minute of the desired count rising; scale down
/// only on what the last five minutes agree on (a replica is a GPU that
/// takes minutes to load, so flapping costs more than a spare).
const SCALE_UP_WINDOW_SECS: u64 = 30;
const SCALE_DOWN_WINDOW_SECS: u64 = 300;
/// The non-root user of the images (deploy/Dockerfile*).
const RUN_AS_USER: u64 = 10001;

pub fn namespace(plan: &Plan) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": plan.namespace, "labels": common_labels()},
    })
}

pub fn models_volume(plan: &Plan) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODELS_CLAIM, "labels": common_labels()},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {
                "storage": sizing::volume_size(&plan.config, plan.checkpoint_dtype.bytes()),
            }},
        },
    })
}

fn common_labels() -> Value {
    json!({"app.kubernetes.io/name": "moe-serve"})
}

fn router_labels() -> Value {
    json!({"app.kubernetes.io/name": "moe-serve", "app.kubernetes.io/component": "router"})
}

/// An expert unit's pod labels (also its selector): unique per unit.
pub fn expert_labels(unit: &ExpertUnit) -> Value {
    let mut labels = json!({
        "app.kubernetes.io/name": "moe-serve",
        "app.kubernetes.io/component": "expert",
        "moe-serve/expert": unit.expert.to_string(),
    });
    if let Some(layers) = &unit.layers {
        labels["moe-serve/layers"] = json!(format!("{}-{}", layers.start, layers.end));
    }
    labels
}

/// The router's Deployment and Service.
pub fn router(plan: &Plan) -> Vec<Value> {
    let mut args = vec![
        "--model".to_owned(),
        plan.model_path(),
        "--listen".into(),
        format!("0.0.0.0:{ROUTER_GRPC_PORT}"),
        "--http-listen".into(),
        format!("0.0.0.0:{ROUTER_HTTP_PORT}"),
        "--dtype".into(),
        plan.dtype.to_string(),
    ];
    if plan.dtype != Dtype::F32 {
        // The router runs attention on the CPU here, whose fast kernels are f32 only.
        args.extend(["--kernels".into(), "generic".into()]);
    }
    args.extend([
        "--kv-cache-bytes".into(),
        sizing::router_kv_cache_bytes(&plan.config, plan.dtype).to_string(),
        "--shutdown-grace-secs".into(),
        ROUTER_SHUTDOWN_GRACE_SECS.to_string(),
        // The gauge asks for what the autoscalers may give, so that the
        // dashboard's desired count is the one they follow.
        "--autoscale-min-replicas".into(),
        plan.min_replicas.to_string(),
        "--autoscale-max-replicas".into(),
        plan.max_replicas.to_string(),
        "--log-format".into(),
        "json".into(),
    ]);
    for unit in &plan.units {
        let target = match &unit.layers {
            None => unit.expert.to_string(),
            Some(layers) => format!("{}@{}..{}", unit.expert, layers.start, layers.end),
        };
        args.push("--expert".into());
        args.push(format!(
            "{target}=dns:///{}:{EXPERT_GRPC_PORT}",
            plan.dns_name(unit)
        ));
    }
    let requests = sizing::router_requests(&plan.config, plan.dtype);
    let container = json!({
        "name": "router-svc",
        "image": plan.image,
        "command": ["router-svc"],
        "args": args,
        "ports": [
            {"name": "grpc", "containerPort": ROUTER_GRPC_PORT},
            {"name": "http", "containerPort": ROUTER_HTTP_PORT},
        ],
        "resources": {"requests": requests_json(&requests, None)},
        // Liveness must not follow readiness: the router is NOT_SERVING
        // whenever an expert has no ready replica, which a restart cannot fix.
        "startupProbe": startup_probe(json!({"httpGet": {"path": "/livez", "port": "http"}})),
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3,
        },
        "readinessProbe": {
            "grpc": {"port": ROUTER_GRPC_PORT, "service": "moe.v1.Inference"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
        },
        "volumeMounts": volume_mounts(),
        "securityContext": container_security(),
    });
    let labels = router_labels();
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "router", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": scrape_annotations(ROUTER_HTTP_PORT)},
                "spec": {
                    "terminationGracePeriodSeconds": ROUTER_SHUTDOWN_GRACE_SECS + TERMINATION_MARGIN_SECS,
                    "securityContext": pod_security(),
                    "containers": [container],
                    "volumes": volumes(),
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "router", "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [
                {"name": "grpc", "port": ROUTER_GRPC_PORT, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                {"name": "http", "port": ROUTER_HTTP_PORT, "targetPort": "http", "appProtocol": "http"},
            ],
        },
    });
    vec![deployment, service]
}

/// One expert unit: Deployment, headless Service, PDB, autoscaler.
pub fn expert(plan: &Plan, unit: &ExpertUnit) -> Vec<Value> {
    let layers = plan.layers_of(unit);
    let weight_bytes = sizing::expert_weight_bytes(&plan.config, &layers, plan.dtype);
    let requests = sizing::expert_requests(weight_bytes);
    let mut args = vec![
        "--model".to_owned(),
        plan.model_path(),
        "--expert".into(),
        unit.expert.to_string(),
    ];
    if let Some(layers) = &unit.layers {
        args.extend([
            "--layers".into(),
            format!("{}..{}", layers.start, layers.end),
        ]);
    }
    args.extend(
        [
            "--listen",
            &format!("0.0.0.0:{EXPERT_GRPC_PORT}"),
            "--metrics-listen",
            &format!("0.0.0.0:{EXPERT_METRICS_PORT}"),
            "--device",
            "cuda:0",
            "--dtype",
            &plan.dtype.to_string(),
            "--shutdown-grace-secs",
            &EXPERT_SHUTDOWN_GRACE_SECS.to_string(),
            "--log-format",
            "json",
        ]
        .map(str::to_owned),
    );
    let labels = expert_labels(unit);
    let mut annotations = scrape_annotations(EXPERT_METRICS_PORT);
    annotations["moe-serve/weight-bytes"] = json!(weight_bytes.to_string());
    let container = json!({
        "name": "expert-svc",
        "image": plan.image,
        "command": ["expert-svc"],
        "args": args,
        "env": [{"name": "CUDA_CACHE_PATH", "value": "/tmp/cuda-cache"}],
        "ports": [
            {"name": "grpc", "containerPort": EXPERT_GRPC_PORT},
            {"name": "metrics", "containerPort": EXPERT_METRICS_PORT},
        ],
        "resources": {
            "requests": requests_json(&requests, Some(&plan.gpu_resource)),
            "limits": {(plan.gpu_resource.as_str()): 1},
        },
        // gRPC is served once the weights are loaded (the port is bound
        // before), so the startup probe covers the load.
        "startupProbe": startup_probe(json!({"grpc": {"port": EXPERT_GRPC_PORT}})),
        "livenessProbe": {
            "grpc": {"port": EXPERT_GRPC_PORT},
            "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3,
        },
        "readinessProbe": {
            "grpc": {"port": EXPERT_GRPC_PORT, "service": "moe.v1.Expert"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
        },
        "volumeMounts": volume_mounts(),
        "securityContext": container_security(),
    });
    let mut pod_spec = json!({
        "terminationGracePeriodSeconds": EXPERT_SHUTDOWN_GRACE_SECS + TERMINATION_MARGIN_SECS,
        "securityContext": pod_security(),
        "tolerations": [{"key": plan.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
        "volumes": volumes(),
    });
    if !plan.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(plan.node_selector);
    }
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        // No `replicas`: the autoscaler owns the count, and an apply must
        // not reset it.
        "metadata": {"name": unit.name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": unit.name, "labels": labels},
        "spec": {
            // Headless: the router resolves every ready pod's address.
            "clusterIP": "None",
            "publishNotReadyAddresses": false,
            "selector": labels,
            "ports": [
                {"name": "grpc", "port": EXPERT_GRPC_PORT, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                {"name": "metrics", "port": EXPERT_METRICS_PORT, "targetPort": "metrics", "appProtocol": "http"},
            ],
        },
    });
    let budget = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": unit.name, "labels": labels},
        // maxUnavailable, not minAvailable 1: with one replica, minAvailable
        // would block every node drain; this lets a drain take one replica
        // at a time (the router re-sends its rows to the others, or waits
        // --no-replica-wait for the replacement).
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    });
    let autoscaler = match plan.autoscaler {
        Autoscaler::Hpa => hpa(plan, unit),
        Autoscaler::Keda => scaled_object(plan, unit),
    };
    vec![deployment, service, budget, autoscaler]
}

fn behavior() -> Value {
    json!({
        "scaleUp": {
            "stabilizationWindowSeconds": SCALE_UP_WINDOW_SECS,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": SCALE_DOWN_WINDOW_SECS,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
        },
    })
}

fn hpa(plan: &Plan, unit: &ExpertUnit) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": unit.name, "labels": expert_labels(unit)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": unit.name},
            "minReplicas": plan.min_replicas,
            "maxReplicas": plan.max_replicas,
            // The router's gauge has only the `expert` label: every layer
            // shard of an expert follows the same count. AverageValue 1:
            // replicas = ceil(desired / 1).
            "metrics": [{
                "type": "External",
                "external": {
                    "metric": {
                        "name": super::monitoring::DESIRED_METRIC,
                        "selector": {"matchLabels": {"expert": unit.expert.to_string()}},
                    },
                    "target": {"type": "AverageValue", "averageValue": "1"},
                },
            }],
            "behavior": behavior(),
        },
    })
}

fn scaled_object(plan: &Plan, unit: &ExpertUnit) -> Value {
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": unit.name, "labels": expert_labels(unit)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": unit.name},
            "minReplicaCount": plan.min_replicas,
            "maxReplicaCount": plan.max_replicas,
            "pollingInterval": 15,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior()}},
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": plan.prometheus_url,
                    "query": format!(
                        "max({}{{namespace=\"{}\",expert=\"{}\"}})",
                        super::monitoring::DESIRED_METRIC, plan.namespace, unit.expert
                    ),
                    "threshold": "1",
                },
            }],
        },
    })
}

fn requests_json(requests: &Requests, gpu: Option<&str>) -> Value {
    let mut value = json!({"cpu": requests.cpu(), "memory": requests.memory()});
    if let Some(gpu) = gpu {
        value[gpu] = json!(1);
    }
    value
}

fn startup_probe(handler: Value) -> Value {
    let mut probe = handler;
    probe["periodSeconds"] = json!(STARTUP_PERIOD_SECS);
    probe["timeoutSeconds"] = json!(5);
    probe["failureThreshold"] = json!(STARTUP_FAILURES);
    probe
}

fn scrape_annotations(port: u16) -> Value {
    json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": port.to_string(),
        "prometheus.io/path": "/metrics",
    })
}

fn volume_mounts() -> Value {
    json!([
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": true},
        {"name": "tmp", "mountPath": "/tmp"},
    ])
}

fn volumes() -> Value {
    json!([
        {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_CLAIM, "readOnly": true}},
        {"name": "tmp", "emptyDir": {}},
    ])
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}
