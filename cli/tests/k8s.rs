//! `moe k8s`: the committed examples in deploy/ are exactly what the
//! generator writes; every generated directory renders with `kubectl
//! kustomize` and passes strict schema validation (Kubernetes' own schemas
//! through `kubernetes-validate`, the CRDs' schemas vendored under
//! tests/schemas/); and the objects are wired to each other (autoscalers to
//! Deployments and the adapter's metric, Services to pods, the router's
//! `--expert` names to Services, one GPU per expert pod).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};

const IMAGE: &str = "moe-serve:cuda";
/// The Kubernetes version the built-in objects are validated against
/// (one that the pinned kubernetes-validate ships schemas for).
const KUBERNETES_VERSION: &str = "1.33.0";

/// The committed examples: output directory, checkpoint, extra flags.
const EXAMPLES: [(&str, &str, &[&str]); 2] = [
    ("deploy/small", "deploy/models/small", &[]),
    (
        "deploy/gpt4-shape",
        "deploy/models/gpt4-shape",
        &["--layers-per-shard", "30"],
    ),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn regenerate_command(out: &str, model: &str, extra: &[&str]) -> String {
    format!(
        "cargo run -p moe -- k8s --model {model} --image {IMAGE} --out {out} {}",
        extra.join(" ")
    )
    .trim_end()
    .to_owned()
}

/// Runs `moe k8s`, panicking with its stderr on failure.
fn moe_k8s(model: &Path, out: &Path, extra: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_moe"))
        .arg("k8s")
        .arg("--model")
        .arg(model)
        .args(["--image", IMAGE, "--out"])
        .arg(out)
        .args(extra)
        .output()
        .expect("moe runs");
    assert!(
        output.status.success(),
        "moe k8s {extra:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every file under `dir`, by relative path.
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, files);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(root).unwrap().to_owned(), bytes);
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

/// A checkpoint directory holding only a config.json: the small preset's
/// with `edit` applied.
fn checkpoint(parent: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("deploy/models/small/config.json")).unwrap();
    let mut config: Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn kubectl_kustomize(dir: &Path) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|err| {
            panic!("kubectl (with kustomize) is needed for this test and could not run: {err}")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The objects `kubectl kustomize DIR` renders.
fn render(dir: &Path) -> Vec<Value> {
    let text = kubectl_kustomize(dir);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("kubectl kustomize prints YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn args(deployment: &Value) -> Vec<&str> {
    container(deployment)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// The value after `flag` in a container's args.
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .map(|index| args[index + 1])
}

fn is_router(deployment: &Value) -> bool {
    container(deployment)["command"][0] == "router-svc"
}

/// Whether every pair of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn the_deploy_examples_are_what_the_generator_writes() {
    let temp = tempfile::tempdir().unwrap();
    for (out, model, extra) in EXAMPLES {
        let fresh = temp.path().join(out.replace('/', "_"));
        moe_k8s(&repo().join(model), &fresh, extra);
        let committed = files_under(&repo().join(out));
        let generated = files_under(&fresh);
        let names = |files: &BTreeMap<PathBuf, Vec<u8>>| files.keys().cloned().collect::<Vec<_>>();
        let stale: Vec<_> = generated
            .iter()
            .filter(|(path, bytes)| committed.get(*path) != Some(*bytes))
            .map(|(path, _)| path.display().to_string())
            .collect();
        assert!(
            names(&committed) == names(&generated) && stale.is_empty(),
            "{out} differs from what the generator writes now (files {stale:?}; or the file sets \
             differ); regenerate it with:\n  rm -r {out} && {}",
            regenerate_command(out, model, extra)
        );
    }
}

/// `python3 -m kubernetes_validate`, or a clear failure.
fn kubernetes_validate() -> Command {
    let found = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "kubernetes-validate is not installed for python3: \
         `python3 -m pip install kubernetes-validate==1.33.1` (.ci/run installs it)"
    );
    let mut command = Command::new("python3");
    command.args(["-m", "kubernetes_validate"]);
    command
}

/// Strict validation of every object of `objects`: the built-in kinds
/// against Kubernetes' schemas, the CRDs' against their vendored schemas.
fn validate(label: &str, objects: &[Value], scratch: &Path) {
    let crd_schemas = BTreeMap::from([
        (
            "ServiceMonitor",
            "monitoring.coreos.com_servicemonitor_v1.json",
        ),
        (
            "PrometheusRule",
            "monitoring.coreos.com_prometheusrule_v1.json",
        ),
        ("ScaledObject", "keda.sh_scaledobject_v1alpha1.json"),
        ("Certificate", "cert-manager.io_certificate_v1.json"),
    ]);
    let (custom, builtin): (Vec<&Value>, Vec<&Value>) = objects
        .iter()
        .partition(|o| crd_schemas.contains_key(o["kind"].as_str().unwrap()));
    let builtin_file = scratch.join(format!("{label}-builtin.yaml"));
    let text: Vec<String> = builtin
        .iter()
        .map(|o| serde_norway::to_string(o).unwrap())
        .collect();
    std::fs::write(&builtin_file, text.join("---\n")).unwrap();
    let output = kubernetes_validate()
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(&builtin_file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{label}: kubernetes-validate --strict failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // The CRDs: Draft 7 JSON Schema through Python's jsonschema (which
    // kubernetes-validate brings), each object against its kind's schema.
    let jobs: Vec<Value> = custom
        .iter()
        .map(|o| {
            let schema = repo()
                .join("cli/tests/schemas")
                .join(crd_schemas[o["kind"].as_str().unwrap()]);
            json!({"schema": schema, "object": o})
        })
        .collect();
    let jobs_file = scratch.join(format!("{label}-crds.json"));
    std::fs::write(&jobs_file, Value::from(jobs).to_string()).unwrap();
    const SCRIPT: &str = r#"
import json, sys, jsonschema
failed = 0
for job in json.load(open(sys.argv[1])):
    schema = json.load(open(job["schema"]))
    obj = job["object"]
    for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
        failed += 1
        print(obj["kind"], obj["metadata"]["name"], list(error.path), error.message)
sys.exit(1 if failed else 0)
"#;
    let output = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&jobs_file)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{label}: custom resources fail their CRD schemas:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_generated_directory_renders_and_validates_strictly() {
    let temp = tempfile::tempdir().unwrap();
    let keda = temp.path().join("keda");
    let eight = checkpoint(temp.path(), "eight", |c| c["num_local_experts"] = json!(8));
    moe_k8s(
        &eight,
        &keda,
        &[
            "--autoscaler",
            "keda",
            "--layers-per-shard",
            "3",
            "--node-selector",
            "gpu=h100",
        ],
    );
    let dirs = [
        ("small", repo().join("deploy/small")),
        ("gpt4-shape", repo().join("deploy/gpt4-shape")),
        ("keda", keda),
    ];
    for (label, dir) in dirs {
        let objects = render(&dir);
        assert!(objects.len() > 10, "{label}: {} objects", objects.len());
        validate(label, &objects, temp.path());
    }
}

/// Checks that hold for every generated directory.
fn check_wiring(label: &str, objects: &[Value]) {
    let deployments = of_kind(objects, "Deployment");
    let services = of_kind(objects, "Service");
    let names = |list: &[&Value]| {
        list.iter()
            .map(|o| name(o).to_owned())
            .collect::<BTreeSet<_>>()
    };
    let deployment_names = names(&deployments);
    let pod_labels = |d: &Value| d["spec"]["template"]["metadata"]["labels"].clone();

    // The metric prometheus-adapter's rules produce.
    let adapter_metrics: BTreeSet<String> = of_kind(objects, "ConfigMap")
        .iter()
        .filter(|c| name(c) == "moe-prometheus-adapter")
        .flat_map(|c| {
            let config: Value =
                serde_norway::from_str(c["data"]["config.yaml"].as_str().unwrap()).unwrap();
            config["externalRules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|rule| rule["name"]["as"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for hpa in of_kind(objects, "HorizontalPodAutoscaler") {
        let target = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(target["kind"], "Deployment", "{label}");
        let target_name = target["name"].as_str().unwrap();
        let deployment = deployments
            .iter()
            .find(|d| name(d) == target_name)
            .unwrap_or_else(|| panic!("{label}: HPA {} targets no Deployment", name(hpa)));
        let external = &hpa["spec"]["metrics"][0]["external"];
        let metric = external["metric"]["name"].as_str().unwrap();
        assert!(
            adapter_metrics.contains(metric),
            "{label}: HPA {} uses {metric}, which the adapter's rules {adapter_metrics:?} do not make",
            name(hpa)
        );
        let expert = &external["metric"]["selector"]["matchLabels"]["expert"];
        assert_eq!(
            expert,
            &pod_labels(deployment)["moe-serve/expert"],
            "{label}"
        );
        assert_eq!(
            flag(&args(deployment), "--expert"),
            expert.as_str(),
            "{label}"
        );
        assert_eq!(
            external["target"],
            json!({"type": "AverageValue", "averageValue": "1"})
        );
    }
    for scaled in of_kind(objects, "ScaledObject") {
        let target = scaled["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        assert!(
            deployment_names.contains(target),
            "{label}: ScaledObject targets {target}"
        );
        let deployment = deployments.iter().find(|d| name(d) == target).unwrap();
        let expert = flag(&args(deployment), "--expert").unwrap();
        let query = scaled["spec"]["triggers"][0]["metadata"]["query"]
            .as_str()
            .unwrap();
        assert!(
            query.contains(&format!("expert=\"{expert}\"")),
            "{label}: {query}"
        );
    }
    for service in &services {
        let selector = &service["spec"]["selector"];
        let matching = deployments
            .iter()
            .filter(|d| selects(selector, &pod_labels(d)))
            .count();
        assert_eq!(
            matching,
            1,
            "{label}: Service {} selects {matching} Deployments",
            name(service)
        );
    }
    for monitor in of_kind(objects, "ServiceMonitor") {
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        let port = &monitor["spec"]["endpoints"][0]["port"];
        let selected: Vec<_> = services
            .iter()
            .filter(|s| selects(selector, &s["metadata"]["labels"]))
            .collect();
        assert!(
            !selected.is_empty(),
            "{label}: ServiceMonitor {} selects nothing",
            name(monitor)
        );
        for service in selected {
            let ports = service["spec"]["ports"].as_array().unwrap();
            assert!(
                ports.iter().any(|p| &p["name"] == port),
                "{label}: {}",
                name(service)
            );
        }
    }

    // The router: no GPU, and each --expert names a headless Service.
    let routers: Vec<_> = deployments.iter().filter(|d| is_router(d)).collect();
    assert_eq!(routers.len(), 1, "{label}");
    let router = routers[0];
    assert!(
        !container(router)["resources"].to_string().contains("gpu"),
        "{label}: the router asks for a GPU"
    );
    let router_args = args(router);
    for (index, arg) in router_args.iter().enumerate() {
        if *arg != "--expert" {
            continue;
        }
        let value = router_args[index + 1];
        let (_, uri) = value.split_once('=').unwrap();
        let host_port = uri
            .strip_prefix("dns:///")
            .unwrap_or_else(|| panic!("{value}"));
        let (host, port) = host_port.rsplit_once(':').unwrap();
        let (service_name, rest) = host.split_once('.').unwrap();
        let service = services
            .iter()
            .find(|s| name(s) == service_name)
            .unwrap_or_else(|| panic!("{label}: --expert {value} names no Service"));
        let namespace = service["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(rest, format!("{namespace}.svc.cluster.local"), "{label}");
        assert_eq!(service["spec"]["clusterIP"], "None", "{label}");
        assert_eq!(
            service["spec"]["ports"][0]["port"].to_string(),
            port,
            "{label}"
        );
    }
    let grace = |d: &Value| d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64();
    let drain = |d: &Value| {
        flag(&args(d), "--shutdown-grace-secs")
            .unwrap()
            .parse::<u64>()
            .ok()
    };
    assert!(grace(router) > drain(router), "{label}: router grace");

    // The experts: one GPU each, probes on their port, grace over drain.
    for deployment in deployments.iter().filter(|d| !is_router(d)) {
        let resources = &container(deployment)["resources"];
        for side in ["requests", "limits"] {
            let gpus: Vec<_> = resources[side]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.contains("gpu"))
                .collect();
            assert_eq!(gpus.len(), 1, "{label}: {} {side}", name(deployment));
            assert_eq!(gpus[0].1, &json!(1), "{label}: {} {side}", name(deployment));
        }
        assert!(
            grace(deployment) > drain(deployment),
            "{label}: {}",
            name(deployment)
        );
        let probe = &container(deployment)["readinessProbe"];
        // With --tls, the same health through HTTP on the metrics port
        // (kubelet speaks no TLS).
        match probe.get("grpc") {
            Some(grpc) => {
                assert_eq!(grpc["service"], "moe.v1.Expert");
                assert_eq!(
                    grpc["port"],
                    container(deployment)["ports"][0]["containerPort"],
                    "{label}: {}",
                    name(deployment)
                );
            }
            None => {
                assert_eq!(probe["httpGet"]["path"], "/readyz", "{label}");
                assert_eq!(probe["httpGet"]["port"], "metrics", "{label}");
            }
        }
    }
}

/// The layers each expert's Deployments serve: contiguous, covering
/// `0..layers`, and what the router's `--expert` flags say.
fn check_layers(label: &str, objects: &[Value], experts: usize, layers: usize) {
    let deployments = of_kind(objects, "Deployment");
    let router = deployments.iter().find(|d| is_router(d)).unwrap();
    let mut served: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for deployment in deployments.iter().filter(|d| !is_router(d)) {
        let args = args(deployment);
        let expert: usize = flag(&args, "--expert").unwrap().parse().unwrap();
        let range = match flag(&args, "--layers") {
            None => (0, layers),
            Some(text) => {
                let (a, b) = text.split_once("..").unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            }
        };
        served.entry(expert).or_default().push(range);
    }
    assert_eq!(served.len(), experts, "{label}");
    let router_args = args(router);
    for (expert, ranges) in &mut served {
        ranges.sort();
        let mut next = 0;
        for (start, end) in ranges.iter() {
            assert_eq!(*start, next, "{label}: expert {expert} layers {ranges:?}");
            assert!(end > start);
            next = *end;
            let target = if ranges.len() == 1 {
                format!("{expert}=")
            } else {
                format!("{expert}@{start}..{end}=")
            };
            assert!(
                router_args.iter().any(|a| a.starts_with(&target)),
                "{label}: the router has no --expert {target}"
            );
        }
        assert_eq!(next, layers, "{label}: expert {expert} layers {ranges:?}");
    }
}

fn count(objects: &[Value], kind: &str) -> usize {
    of_kind(objects, kind).len()
}

#[test]
fn the_objects_are_wired_to_each_other() {
    let temp = tempfile::tempdir().unwrap();

    let small = render(&repo().join("deploy/small"));
    check_wiring("small", &small);
    check_layers("small", &small, 16, 8);
    assert_eq!(count(&small, "HorizontalPodAutoscaler"), 16);

    let gpt4 = render(&repo().join("deploy/gpt4-shape"));
    check_wiring("gpt4-shape", &gpt4);
    check_layers("gpt4-shape", &gpt4, 16, 120);
    assert_eq!(count(&gpt4, "Deployment"), 1 + 16 * 4);

    // 8 experts: 8 of each per-expert object.
    let eight = checkpoint(temp.path(), "eight", |c| c["num_local_experts"] = json!(8));
    let out = temp.path().join("eight-out");
    moe_k8s(&eight, &out, &["--namespace", "moe-eight"]);
    let objects = render(&out);
    check_wiring("eight", &objects);
    check_layers("eight", &objects, 8, 8);
    assert_eq!(count(&objects, "Deployment"), 8 + 1);
    assert_eq!(count(&objects, "Service"), 8 + 1);
    assert_eq!(count(&objects, "HorizontalPodAutoscaler"), 8);
    assert_eq!(count(&objects, "PodDisruptionBudget"), 8);
    assert_eq!(count(&objects, "ScaledObject"), 0);
    assert!(
        objects
            .iter()
            .all(|o| o["kind"] == "Namespace" || o["metadata"]["namespace"] == "moe-eight")
    );

    // KEDA instead of HPAs, and layer shards: 8 experts × 3 shards of 8 layers.
    let keda = temp.path().join("keda-out");
    moe_k8s(
        &eight,
        &keda,
        &["--autoscaler", "keda", "--layers-per-shard", "3"],
    );
    let objects = render(&keda);
    check_wiring("keda", &objects);
    check_layers("keda", &objects, 8, 8);
    assert_eq!(count(&objects, "Deployment"), 8 * 3 + 1);
    assert_eq!(count(&objects, "ScaledObject"), 8 * 3);
    assert_eq!(count(&objects, "HorizontalPodAutoscaler"), 0);
    assert_eq!(count(&objects, "PodDisruptionBudget"), 8 * 3);
    assert!(
        !files_under(&keda).contains_key(Path::new("prometheus-adapter-config.yaml")),
        "KEDA needs no adapter rules"
    );

    // Regenerating into the same directory with fewer units leaves none behind.
    moe_k8s(&eight, &keda, &["--autoscaler", "keda"]);
    assert_eq!(count(&render(&keda), "Deployment"), 8 + 1);
    assert_eq!(files_under(&keda.join("experts")).len(), 8);
}

/// The placement and scaling flags reach every object they should:
/// replica bounds in each HPA and in the router's signal, another GPU
/// resource in each expert's requests, limits and toleration, node
/// labels in each expert's selector; and the HPAs stabilise over the
/// windows `moe up --autoscale` uses by default.
#[test]
fn placement_and_scaling_flags_reach_every_object() {
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("placed");
    moe_k8s(
        &repo().join("deploy/models/small"),
        &out,
        &[
            "--min-replicas",
            "2",
            "--max-replicas",
            "6",
            "--gpu-resource",
            "amd.com/gpu",
            "--node-selector",
            "gpu=mi300x",
            "--node-selector",
            "zone=a",
        ],
    );
    let objects = render(&out);
    validate("placed", &objects, temp.path());
    check_wiring("placed", &objects);

    let local = moe::launcher::ScalePolicy::default();
    let hpas = of_kind(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 16);
    for hpa in hpas {
        let spec = &hpa["spec"];
        assert_eq!(
            (&spec["minReplicas"], &spec["maxReplicas"]),
            (&json!(2), &json!(6))
        );
        let window = |side: &str| spec["behavior"][side]["stabilizationWindowSeconds"].as_u64();
        assert_eq!(window("scaleUp"), Some(local.up_window.as_secs()));
        assert_eq!(window("scaleDown"), Some(local.down_window.as_secs()));
    }
    for deployment in of_kind(&objects, "Deployment") {
        let args = args(deployment);
        let pod = &deployment["spec"]["template"]["spec"];
        let resources = &container(deployment)["resources"];
        if is_router(deployment) {
            assert_eq!(flag(&args, "--autoscale-min-replicas"), Some("2"));
            assert_eq!(flag(&args, "--autoscale-max-replicas"), Some("6"));
            assert!(resources["requests"].get("amd.com/gpu").is_none());
            continue;
        }
        assert_eq!(
            flag(&args, "--device"),
            Some("cuda:0"),
            "{}",
            name(deployment)
        );
        for side in ["requests", "limits"] {
            assert_eq!(
                resources[side]["amd.com/gpu"],
                json!(1),
                "{}",
                name(deployment)
            );
            assert!(resources[side].get("nvidia.com/gpu").is_none());
        }
        assert_eq!(pod["tolerations"][0]["key"], "amd.com/gpu");
        assert_eq!(pod["nodeSelector"], json!({"gpu": "mi300x", "zone": "a"}));
    }
}

/// `--tls --cert-manager`: every pod mounts the Secret its TLS flags
/// name, the Certificates make exactly those Secrets, and the experts'
/// certificate carries every name the router dials.
#[test]
fn tls_mounts_certificates_from_secrets_that_cert_manager_makes() {
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("tls");
    moe_k8s(
        &repo().join("deploy/models/small"),
        &out,
        &["--tls", "--cert-manager", "ClusterIssuer/moe-ca"],
    );
    let objects = render(&out);
    validate("tls", &objects, temp.path());
    check_wiring("tls", &objects);
    let certificates = of_kind(&objects, "Certificate");
    let secrets: BTreeSet<&str> = certificates
        .iter()
        .map(|c| c["spec"]["secretName"].as_str().unwrap())
        .collect();
    assert_eq!(
        secrets,
        BTreeSet::from(["router-tls", "router-expert-client-tls", "expert-tls"])
    );
    assert!(
        certificates
            .iter()
            .all(|c| c["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
                && c["spec"]["issuerRef"]["name"] == "moe-ca")
    );
    let expert_names: BTreeSet<&str> = certificates
        .iter()
        .find(|c| c["spec"]["secretName"] == "expert-tls")
        .unwrap()["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for deployment in of_kind(&objects, "Deployment") {
        let args = args(deployment);
        let flags: &[&str] = if is_router(deployment) {
            &[
                "--tls-cert",
                "--tls-key",
                "--expert-tls-ca",
                "--expert-tls-cert",
                "--expert-tls-key",
            ]
        } else {
            &["--tls-cert", "--tls-key", "--tls-ca"]
        };
        let mounts: Vec<&str> = container(deployment)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
        for flag_name in flags {
            let path = flag(&args, flag_name)
                .unwrap_or_else(|| panic!("{}: no {flag_name}", name(deployment)));
            let mount = mounts
                .iter()
                .find(|m| path.starts_with(&format!("{m}/")))
                .unwrap_or_else(|| panic!("{}: {path} is not mounted", name(deployment)));
            let secret = mount.rsplit('/').next().unwrap();
            assert!(secrets.contains(secret), "{mount}");
            assert!(
                volumes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["secret"]["secretName"] == secret),
                "{}: no volume of {secret}",
                name(deployment)
            );
        }
        let ports: Vec<&Value> = container(deployment)["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|port| &port["name"])
            .collect();
        // The router is started once it answers at all; an expert once it
        // has loaded its weights and is SERVING.
        let started = if is_router(deployment) {
            "/livez"
        } else {
            "/readyz"
        };
        for (probe, path) in [
            ("startupProbe", started),
            ("livenessProbe", "/livez"),
            ("readinessProbe", "/readyz"),
        ] {
            let probe = &container(deployment)[probe];
            assert!(
                probe.get("grpc").is_none(),
                "{}: a gRPC probe cannot speak TLS",
                name(deployment)
            );
            assert_eq!(probe["httpGet"]["path"], path, "{}", name(deployment));
            assert!(
                ports.contains(&&probe["httpGet"]["port"]),
                "{}: probes a port it does not have",
                name(deployment)
            );
        }
        if is_router(deployment) {
            for (index, arg) in args.iter().enumerate() {
                if *arg == "--expert" {
                    let host = args[index + 1]
                        .split_once("dns:///")
                        .unwrap()
                        .1
                        .rsplit_once(':')
                        .unwrap()
                        .0;
                    assert!(
                        expert_names.contains(host),
                        "{host} is not in the certificate"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_flags_are_refused_by_name() {
    let temp = tempfile::tempdir().unwrap();
    let model = repo().join("deploy/models/small");
    for (extra, expected) in [
        (
            &["--min-replicas", "3", "--max-replicas", "2"][..],
            "--min-replicas",
        ),
        (&["--layers-per-shard", "0"][..], "--layers-per-shard"),
        (&["--namespace", "Not_A_Label"][..], "--namespace"),
        (&["--node-selector", "novalue"][..], "KEY=VALUE"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_moe"))
            .arg("k8s")
            .arg("--model")
            .arg(&model)
            .args(["--image", IMAGE, "--out"])
            .arg(temp.path().join("out"))
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}
