//! `moe k8s --tls`: the router and the experts mount their certificates
//! from Secrets and get the TLS flags; with `--cert-manager ISSUER`,
//! cert-manager Certificates make (and renew) those Secrets. The services
//! re-read the mounted files when Kubernetes updates them, so a renewal
//! needs no restart.
//!
//! Each Secret holds `tls.crt`, `tls.key` and `ca.crt` (what cert-manager
//! writes; by hand: `kubectl create secret generic NAME --from-file=...`):
//!
//! | Secret | mounted by | holds |
//! | --- | --- | --- |
//! | `router-tls` | router | the public API's certificate (`ca.crt` unused) |
//! | `router-expert-client-tls` | router | its client certificate for the experts; `ca.crt`: the CA of the experts' certificates |
//! | `expert-tls` | every expert | its server certificate for all the experts' Service names; `ca.crt`: the CA of the router's client certificate |
//!
//! Kubernetes' own gRPC probes cannot speak TLS, so with `--tls` they
//! become HTTP probes of the same gRPC health on the plaintext metrics
//! port (`/readyz`, `/livez`); the router still follows each expert's gRPC
//! health itself, over mutual TLS.

use serde_json::{Value, json};

use super::{ExpertUnit, Plan};

pub const ROUTER_SECRET: &str = "router-tls";
pub const ROUTER_CLIENT_SECRET: &str = "router-expert-client-tls";
pub const EXPERT_SECRET: &str = "expert-tls";
/// Where the Secrets are mounted, each in a folder of its own.
const MOUNT: &str = "/etc/moe/tls";

/// A cert-manager issuer: `NAME` (an Issuer in the namespace) or
/// `ClusterIssuer/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerRef {
    pub kind: String,
    pub name: String,
}

impl std::str::FromStr for IssuerRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, name) = text.split_once('/').unwrap_or(("Issuer", text));
        if !matches!(kind, "Issuer" | "ClusterIssuer") || name.is_empty() {
            return Err(format!(
                "{text:?}: expected NAME (an Issuer) or ClusterIssuer/NAME"
            ));
        }
        Ok(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn file(secret: &str, name: &str) -> String {
    format!("{MOUNT}/{secret}/{name}")
}

/// Adds `secrets` as read-only volumes of `deployment`'s pod and mounts.
fn mount(deployment: &mut Value, secrets: &[&str]) {
    let pod = &mut deployment["spec"]["template"]["spec"];
    for secret in secrets {
        pod["volumes"]
            .as_array_mut()
            .expect("volumes")
            .push(json!({"name": secret, "secret": {"secretName": secret, "defaultMode": 0o440}}));
        pod["containers"][0]["volumeMounts"]
            .as_array_mut()
            .expect("volume mounts")
            .push(
                json!({"name": secret, "mountPath": format!("{MOUNT}/{secret}"), "readOnly": true}),
            );
    }
}

fn add_args(deployment: &mut Value, args: &[(&str, String)]) {
    let list = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .expect("args");
    for (flag, value) in args {
        list.extend([json!(flag), json!(value)]);
    }
}

/// gRPC probes become HTTP probes of the container port named `port`:
/// liveness asks `/livez`, startup and readiness `/readyz` (the gRPC
/// health of the service, unchanged but in plaintext HTTP, which kubelet
/// speaks where it speaks no TLS).
fn http_probes(deployment: &mut Value, port: &str) {
    let container = &mut deployment["spec"]["template"]["spec"]["containers"][0];
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
    ] {
        let probe = &mut container[probe];
        if let Some(object) = probe.as_object_mut()
            && object.remove("grpc").is_some()
        {
            object.insert("httpGet".into(), json!({"path": path, "port": port}));
        }
    }
}

/// The Service's gRPC port carries TLS now, not cleartext HTTP/2.
fn tls_service(service: &mut Value) {
    for port in service["spec"]["ports"].as_array_mut().expect("ports") {
        if port["name"] == "grpc" {
            port.as_object_mut().expect("a port").remove("appProtocol");
        }
    }
}

/// The router's Deployment and Service, made secure.
pub fn secure_router(objects: &mut [Value]) {
    for object in objects.iter_mut() {
        match object["kind"].as_str() {
            Some("Deployment") => {
                mount(object, &[ROUTER_SECRET, ROUTER_CLIENT_SECRET]);
                add_args(
                    object,
                    &[
                        ("--tls-cert", file(ROUTER_SECRET, "tls.crt")),
                        ("--tls-key", file(ROUTER_SECRET, "tls.key")),
                        ("--expert-tls-ca", file(ROUTER_CLIENT_SECRET, "ca.crt")),
                        ("--expert-tls-cert", file(ROUTER_CLIENT_SECRET, "tls.crt")),
                        ("--expert-tls-key", file(ROUTER_CLIENT_SECRET, "tls.key")),
                    ],
                );
                http_probes(object, "http");
            }
            Some("Service") => tls_service(object),
            _ => {}
        }
    }
}

/// An expert unit's Deployment and Service, made secure.
pub fn secure_expert(objects: &mut [Value]) {
    for object in objects.iter_mut() {
        match object["kind"].as_str() {
            Some("Deployment") => {
                mount(object, &[EXPERT_SECRET]);
                add_args(
                    object,
                    &[
                        ("--tls-cert", file(EXPERT_SECRET, "tls.crt")),
                        ("--tls-key", file(EXPERT_SECRET, "tls.key")),
                        ("--tls-ca", file(EXPERT_SECRET, "ca.crt")),
                    ],
                );
                http_probes(object, "metrics");
            }
            Some("Service") => tls_service(object),
            _ => {}
        }
    }
}

/// The cert-manager Certificates of the three Secrets, all from `issuer`
/// (so that one CA signs both sides of the mutual TLS).
pub fn certificates(plan: &Plan, issuer: &IssuerRef) -> Vec<Value> {
    let namespace = &plan.namespace;
    let router_names = vec![
        "router".to_owned(),
        format!("router.{namespace}.svc"),
        format!("router.{namespace}.svc.cluster.local"),
    ];
    let expert_names: Vec<String> = plan
        .units
        .iter()
        .map(|unit: &ExpertUnit| plan.dns_name(unit))
        .collect();
    let certificate = |secret: &str, names: Option<Vec<String>>, usage: &str| {
        let mut spec = json!({
            "secretName": secret,
            "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": "cert-manager.io"},
            "duration": "2160h",
            "renewBefore": "360h",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["digital signature", "key encipherment", usage],
        });
        match names {
            Some(names) => spec["dnsNames"] = json!(names),
            None => spec["commonName"] = json!("router"),
        }
        json!({
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": secret, "labels": {"app.kubernetes.io/part-of": "moe-serve"}},
            "spec": spec,
        })
    };
    vec![
        certificate(ROUTER_SECRET, Some(router_names), "server auth"),
        certificate(ROUTER_CLIENT_SECRET, None, "client auth"),
        certificate(EXPERT_SECRET, Some(expert_names), "server auth"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_parse() {
        assert_eq!(
            "ca".parse::<IssuerRef>(),
            Ok(IssuerRef {
                kind: "Issuer".into(),
                name: "ca".into()
            })
        );
        assert_eq!(
            "ClusterIssuer/moe-ca".parse::<IssuerRef>().unwrap().kind,
            "ClusterIssuer"
        );
        assert!("Secret/x".parse::<IssuerRef>().is_err());
        assert!("ClusterIssuer/".parse::<IssuerRef>().is_err());
    }
}
