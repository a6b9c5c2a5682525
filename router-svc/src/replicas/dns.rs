//! DNS discovery of an expert's replicas: with `--expert E=dns:///NAME:PORT`
//! every A and AAAA address of NAME is a replica of expert E. On Kubernetes
//! NAME is a headless Service, whose addresses are its ready pods.
//!
//! The resolver caches nothing. The discovery loop asks again every
//! `--resolve-interval` and after a connection failure, and keeps the last
//! answer itself; a cache in the resolver would only hide, for up to the
//! record's TTL, a replica that has just gone or come. Lookups give up
//! within seconds, so a dead DNS server delays discovery but never stalls it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use crate::RouterError;

/// How long one query waits for its answer. A DNS server answers in
/// milliseconds or not at all; the resolver's default, 5 s, would hold a
/// re-resolution after a failure for no gain.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Retries of a query that timed out or failed: one, for a lost UDP packet.
const RETRIES: usize = 1;

/// A DNS client for replica discovery.
#[derive(Clone)]
pub struct DnsResolver {
    resolver: TokioResolver,
    /// Who answers, as errors name it: `--dns-server`'s address or the
    /// system's name servers.
    server: String,
}

impl DnsResolver {
    /// `server`: a resolver's address (`--dns-server`), else the system
    /// configuration (`/etc/resolv.conf`, with its search domains, so that
    /// a Service's short name resolves in its pod's namespace).
    ///
    /// A server named on the command line answers every name: the hosts
    /// file is not consulted then, as it is with the system's.
    pub fn new(server: Option<SocketAddr>) -> Result<Self, RouterError> {
        let (config, mut options, description) = match server {
            Some(addr) => {
                let mut name_server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut name_server.connections {
                    connection.port = addr.port();
                }
                let mut options = ResolverOpts::default();
                options.use_hosts_file = ResolveHosts::Never;
                let config = ResolverConfig::from_name_servers(vec![name_server]);
                (config, options, addr.to_string())
            }
            None => {
                let (config, options) =
                    hickory_resolver::system_conf::read_system_conf().map_err(|err| {
                        RouterError::invalid(format!(
                            "no --dns-server, and the system's DNS configuration is unusable: {err}"
                        ))
                    })?;
                let description = system_servers(&config);
                (config, options, description)
            }
        };
        options.timeout = QUERY_TIMEOUT;
        options.attempts = RETRIES;
        options.cache_size = 0;
        options.positive_min_ttl = None;
        options.negative_min_ttl = None;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(|err| {
                RouterError::invalid(format!("a DNS resolver for {description}: {err}"))
            })?;
        Ok(Self {
            resolver,
            server: description,
        })
    }

    /// Every A and AAAA address of `host` now, sorted and deduplicated. An
    /// IP literal is its own address, without a query. A name that does not
    /// exist or has no address records has no replicas: `Ok(vec![])`.
    ///
    /// A failure (a timeout, a refusal, a SERVFAIL, for either record type)
    /// is an error naming the host and the server, never a shorter list: the
    /// caller keeps the replicas it has rather than dropping those whose
    /// records it could not read this time.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, RouterError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // Two lookups rather than `lookup_ip`, which answers with either
        // family alone when the other's query failed.
        let (v4, v6) = tokio::join!(
            self.resolver.lookup(host, RecordType::A),
            self.resolver.lookup(host, RecordType::AAAA),
        );
        let mut addresses = Vec::new();
        for lookup in [v4, v6] {
            match lookup {
                Ok(lookup) => {
                    addresses.extend(lookup.answers().iter().filter_map(
                        |record| match &record.data {
                            RData::A(a) => Some(IpAddr::V4(a.0)),
                            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                            _ => None,
                        },
                    ))
                }
                Err(err) if err.is_no_records_found() => {}
                Err(err) => {
                    return Err(RouterError::ExpertUnavailable(format!(
                        "resolving {host} with {}: {err}",
                        self.server
                    )));
                }
            }
        }
        addresses.sort_unstable();
        addresses.dedup();
        Ok(addresses)
    }
}

/// The system's name servers as errors name them.
fn system_servers(config: &ResolverConfig) -> String {
    let servers: Vec<String> = config
        .name_servers()
        .iter()
        .map(|server| {
            let port = server.connections.first().map_or(53, |c| c.port);
            SocketAddr::new(server.ip, port).to_string()
        })
        .collect();
    format!("the system's name servers ({})", servers.join(", "))
}

/// Parses gRPC's DNS name syntax, `dns:[//AUTHORITY/]NAME:PORT`, into NAME
/// and PORT: `dns:///expert-3.moe.svc:50061`, `dns:expert-3:50061`,
/// `dns:///[fd00::7]:50061`. An IPv6 NAME is bracketed, and returned without
/// its brackets.
///
/// An AUTHORITY is ignored: in gRPC it names the DNS server to ask, which
/// here is `--dns-server`'s one job, for every expert alike.
pub fn parse_dns_target(uri: &str) -> Result<(String, u16), RouterError> {
    let invalid =
        |what: String| RouterError::invalid(format!("{uri:?}: {what} (expected dns:///NAME:PORT)"));
    let rest = uri
        .strip_prefix("dns:")
        .ok_or_else(|| invalid("not a dns: URI".into()))?;
    let target = match rest.strip_prefix("//") {
        Some(authority_and_target) => match authority_and_target.split_once('/') {
            Some((_authority, target)) => target,
            None => return Err(invalid("no / after the authority".into())),
        },
        None => rest,
    };
    let (host, port) = if let Some(bracketed) = target.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 address without its closing ]".into()))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| invalid(format!("[{ip}] is not an IPv6 address")))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("no :PORT".into()))?;
        (ip, port)
    } else {
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| invalid("no :PORT".into()))?;
        if host.contains(':') {
            return Err(invalid(format!(
                "{host:?} has a colon: an IPv6 address goes in brackets"
            )));
        }
        check_name(host).map_err(invalid)?;
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid(format!("{port:?} is not a port (1-65535)"))),
        Ok(port) => Ok((host.to_owned(), port)),
    }
}

/// A DNS name (letters, digits, `-` and `_` in dot-separated labels of at
/// most 63 bytes, a final dot allowed) or an IPv4 address; what is wrong
/// otherwise.
fn check_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no NAME".into());
    }
    let labels = host.strip_suffix('.').unwrap_or(host);
    if host.len() > 254 {
        return Err(format!("{host:?} is longer than a DNS name can be"));
    }
    for label in labels.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{host:?} has a label of {} bytes (1-63)",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("{host:?} has {c:?}, which a DNS name cannot"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> (String, u16) {
        parse_dns_target(uri).unwrap_or_else(|err| panic!("{uri}: {err}"))
    }

    fn error(uri: &str) -> String {
        match parse_dns_target(uri) {
            Err(RouterError::InvalidArgument(message)) => message,
            other => panic!("{uri}: expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn names_and_ports_in_every_form_grpc_writes() {
        let expected = ("expert-3.moe.svc.cluster.local".to_owned(), 50061);
        assert_eq!(
            target("dns:///expert-3.moe.svc.cluster.local:50061"),
            expected
        );
        assert_eq!(
            target("dns://10.96.0.10:53/expert-3.moe.svc.cluster.local:50061"),
            expected,
            "the authority is ignored"
        );
        assert_eq!(target("dns:expert-3.moe.svc.cluster.local:50061"), expected);
        assert_eq!(target("dns:///expert-3:1"), ("expert-3".into(), 1));
        assert_eq!(
            target("dns:///moe.test.:65535"),
            ("moe.test.".into(), 65535)
        );
        assert_eq!(target("dns:///_grpc.moe:80"), ("_grpc.moe".into(), 80));
    }

    #[test]
    fn ip_literals_are_targets_too() {
        assert_eq!(target("dns:///10.0.0.5:50061"), ("10.0.0.5".into(), 50061));
        assert_eq!(target("dns:///[fd00::7]:50061"), ("fd00::7".into(), 50061));
        assert_eq!(target("dns:///[::1]:9"), ("::1".into(), 9));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            ("http://expert-3:50061", "not a dns: URI"),
            ("dns://10.96.0.10", "no / after the authority"),
            ("dns:///expert-3", "no :PORT"),
            ("dns:///:50061", "no NAME"),
            ("dns:///expert-3:", "\"\" is not a port"),
            ("dns:///expert-3:0", "\"0\" is not a port"),
            ("dns:///expert-3:65536", "\"65536\" is not a port"),
            ("dns:///expert-3:http", "\"http\" is not a port"),
            ("dns:///fd00::7:50061", "an IPv6 address goes in brackets"),
            ("dns:///[fd00::7:50061", "without its closing ]"),
            ("dns:///[fd00::7]", "no :PORT"),
            (
                "dns:///[expert-3]:50061",
                "[expert-3] is not an IPv6 address",
            ),
            ("dns:///expert 3:50061", "has ' '"),
            ("dns:///expert-3/x:50061", "has '/'"),
            ("dns:///moe..test:50061", "a label of 0 bytes"),
        ];
        for (uri, expected) in cases {
            let message = error(uri);
            assert!(
                message.contains(expected),
                "{uri}: {message:?} does not say {expected:?}"
            );
            assert!(message.contains(uri), "{message:?} does not name {uri}");
        }
        let long_label = format!("dns:///{}.moe:1", "a".repeat(64));
        assert!(error(&long_label).contains("a label of 64 bytes"));
    }

    #[tokio::test]
    async fn an_ip_literal_resolves_to_itself_without_a_query() {
        // Port 9 (discard) on loopback: any query sent there would fail.
        let resolver = DnsResolver::new(Some("127.0.0.1:9".parse().unwrap())).unwrap();
        for literal in ["10.0.0.5", "fd00::7", "::1"] {
            let ip: IpAddr = literal.parse().unwrap();
            assert_eq!(resolver.addresses(literal).await.unwrap(), vec![ip]);
        }
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_is_an_error_naming_host_and_server() {
        // A UDP port that nothing listens on: the query is refused or
        // times out; either way the lookup ends within seconds.
        let unused = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = unused.local_addr().unwrap();
        drop(unused);
        let resolver = DnsResolver::new(Some(server)).unwrap();
        let started = std::time::Instant::now();
        let result = resolver.addresses("expert-0.moe.test.").await;
        match result {
            Err(RouterError::ExpertUnavailable(message)) => {
                assert!(message.contains("expert-0.moe.test."), "{message}");
                assert!(message.contains(&server.to_string()), "{message}");
            }
            other => panic!("expected ExpertUnavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
}
