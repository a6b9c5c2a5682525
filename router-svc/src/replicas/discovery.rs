//! Where each expert's replicas are, kept current while the router runs:
//! the `--expert` flags (fixed), the cluster file (re-read when it
//! changes), and `dns:///NAME:PORT` entries in either (every address NAME
//! resolves to is a replica; resolved again every `--resolve-interval` and
//! soon after a replica could not be reached).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::dns::{DnsResolver, parse_dns_target};
use super::set::{ReplicaKey, ReplicaSets};
use crate::RouterError;
use crate::endpoints::{self, ExpertEndpoint};

/// How often the cluster file's contents are compared with the last read.
/// Polling rather than inotify: Kubernetes swaps a mounted ConfigMap with
/// a symlink rename, which file watchers miss.
const FILE_POLL: Duration = Duration::from_millis(500);

/// After a replica could not be reached, names are resolved again, but not
/// more often than this.
const RESOLVE_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// The sources of the replica sets.
#[derive(Debug, Clone)]
pub struct Sources {
    /// From `--expert` flags.
    pub flags: Vec<ExpertEndpoint>,
    pub cluster_file: Option<PathBuf>,
    pub resolve_interval: Duration,
    /// `--dns-server`; otherwise the system's resolver.
    pub dns_server: Option<SocketAddr>,
}

impl Sources {
    /// Every endpoint listed now (the flags, and the cluster file as it
    /// reads now).
    pub fn listed(&self) -> Result<Vec<ExpertEndpoint>, RouterError> {
        let from_file = match &self.cluster_file {
            Some(path) => endpoints::read_cluster_file(path)?,
            None => Vec::new(),
        };
        Ok(self.with_flags(from_file))
    }

    /// The flags' endpoints followed by `from_file`.
    fn with_flags(&self, from_file: Vec<ExpertEndpoint>) -> Vec<ExpertEndpoint> {
        let mut listed = self.flags.clone();
        listed.extend(from_file);
        listed
    }

    fn uses_dns(endpoints: &[ExpertEndpoint]) -> bool {
        endpoints.iter().any(|endpoint| is_dns(&endpoint.uri))
    }
}

fn is_dns(uri: &str) -> bool {
    uri.starts_with("dns:")
}

/// Keeps `sets` equal to what the sources list, until the task is dropped.
/// `listed` is what they listed at start (already checked for coverage).
pub async fn run(
    sources: Sources,
    mut listed: Vec<ExpertEndpoint>,
    num_layers: usize,
    sets: Arc<ReplicaSets>,
) {
    let mut dns: Option<DnsResolver> = None;
    let mut resolved: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut last_resolve: Option<Instant> = None;
    let mut file_text = match &sources.cluster_file {
        Some(path) => tokio::fs::read_to_string(path).await.ok(),
        None => None,
    };
    let mut resolve_now = true;
    loop {
        if resolve_now && Sources::uses_dns(&listed) {
            let resolver = match &dns {
                Some(resolver) => Some(resolver),
                None => match DnsResolver::new(sources.dns_server) {
                    Ok(resolver) => Some(&*dns.insert(resolver)),
                    Err(err) => {
                        tracing::warn!(%err, "no DNS resolver");
                        None
                    }
                },
            };
            if let Some(resolver) = resolver {
                resolve_all(resolver, &listed, &mut resolved).await;
            }
            last_resolve = Some(Instant::now());
        }
        sets.reconcile(&expand(&listed, &resolved, num_layers));

        let next_resolve =
            last_resolve.map_or_else(Instant::now, |at| at + sources.resolve_interval);
        let failed = sets.connection_failed.clone();
        tokio::select! {
            () = tokio::time::sleep(FILE_POLL) => {}
            () = failed.notified() => {
                // Give the name a moment to change, and bound the rate.
                tokio::time::sleep(RESOLVE_AFTER_FAILURE).await;
                resolve_now = true;
            }
        }
        resolve_now |= Instant::now() >= next_resolve;
        if let Some(path) = &sources.cluster_file {
            let text = tokio::fs::read_to_string(path).await.ok();
            if text.is_some() && text != file_text {
                file_text = text;
                let new_text = file_text.as_deref().unwrap_or_default();
                let parsed = endpoints::parse_cluster_file(new_text, path)
                    .map(|from_file| sources.with_flags(from_file));
                match parsed {
                    Ok(now) => {
                        tracing::info!(path = %path.display(), endpoints = now.len(), "cluster file changed");
                        listed = now;
                        resolve_now = true;
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cluster file changed but cannot be used; keeping the previous replicas")
                    }
                }
            }
        }
    }
}

/// Resolves every `dns:` endpoint. A name that cannot be resolved now
/// keeps its previous addresses: a DNS outage removes no replica.
async fn resolve_all(
    resolver: &DnsResolver,
    listed: &[ExpertEndpoint],
    resolved: &mut HashMap<String, Vec<IpAddr>>,
) {
    for endpoint in listed.iter().filter(|endpoint| is_dns(&endpoint.uri)) {
        let host = match parse_dns_target(&endpoint.uri) {
            Ok((host, _)) => host,
            Err(err) => {
                tracing::warn!(%err, "bad dns endpoint");
                continue;
            }
        };
        match resolver.addresses(&host).await {
            Ok(addresses) => {
                let previous = resolved.insert(host.clone(), addresses.clone());
                if previous.as_ref() != Some(&addresses) {
                    tracing::info!(%host, ?addresses, "resolved");
                }
            }
            Err(err) => {
                tracing::warn!(%host, %err, "cannot resolve; keeping its previous addresses")
            }
        }
    }
}

/// The replicas the endpoints name now: one per endpoint, or per address
/// of a `dns:` endpoint's name.
pub fn expand(
    listed: &[ExpertEndpoint],
    resolved: &HashMap<String, Vec<IpAddr>>,
    num_layers: usize,
) -> Vec<ReplicaKey> {
    let mut keys = Vec::new();
    for endpoint in listed {
        let layers = endpoint.layers.clone().unwrap_or(0..num_layers);
        if !is_dns(&endpoint.uri) {
            keys.push(ReplicaKey {
                expert: endpoint.expert,
                layers,
                uri: endpoint.uri.clone(),
                tls_name: None,
            });
            continue;
        }
        let Ok((host, port)) = parse_dns_target(&endpoint.uri) else {
            continue;
        };
        for address in resolved.get(&host).into_iter().flatten() {
            keys.push(ReplicaKey {
                expert: endpoint.expert,
                layers: layers.clone(),
                uri: format!("http://{}", SocketAddr::new(*address, port)),
                tls_name: Some(host.clone()),
            });
        }
    }
    keys.sort_by(|a, b| {
        (a.expert, &a.uri, a.layers.start).cmp(&(b.expert, &b.uri, b.layers.start))
    });
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dns_endpoint_is_one_replica_per_address() {
        let listed = vec![
            endpoints::parse_flag("0=127.0.0.1:5000").unwrap(),
            endpoints::parse_flag("1=dns:///expert-1.moe:6000").unwrap(),
            endpoints::parse_flag("2@0..1=dns:///unresolved.moe:6000").unwrap(),
        ];
        let resolved = HashMap::from([(
            "expert-1.moe".to_owned(),
            vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        )]);
        let keys = expand(&listed, &resolved, 4);
        let uris: Vec<(usize, &str)> = keys.iter().map(|k| (k.expert, k.uri.as_str())).collect();
        assert_eq!(
            uris,
            vec![
                (0, "http://127.0.0.1:5000"),
                (1, "http://10.0.0.1:6000"),
                (1, "http://[::1]:6000"),
            ]
        );
        assert!(keys.iter().all(|key| key.layers == (0..4)));
    }
}
