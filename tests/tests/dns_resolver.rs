//! The router's DNS client against a DNS server on loopback whose records
//! change between lookups, as a headless Service's do when pods come and go.

use std::net::IpAddr;

use moe_e2e::dns::TestDns;
use moe_e2e::within;
use router_svc::RouterError;
use router_svc::replicas::dns::{DnsResolver, parse_dns_target};

fn ips(addresses: &[&str]) -> Vec<IpAddr> {
    addresses
        .iter()
        .map(|address| address.parse().expect("an IP address"))
        .collect()
}

#[tokio::test]
async fn each_lookup_sees_the_records_as_they_are_now() {
    let dns = TestDns::start().await;
    let resolver = DnsResolver::new(Some(dns.addr())).expect("a resolver");
    let (name, port) = parse_dns_target("dns:///expert-3.moe.test.:50061").expect("a valid target");
    assert_eq!(port, 50061);
    let lookup = |what: &'static str| {
        let (resolver, name) = (&resolver, &name);
        async move {
            within(what, resolver.addresses(name))
                .await
                .unwrap_or_else(|err| panic!("{what}: {err}"))
        }
    };

    assert_eq!(lookup("a name not yet set").await, ips(&[]));

    dns.set(&name, ips(&["127.0.0.2", "127.0.0.1", "127.0.0.2"]));
    assert_eq!(
        lookup("two IPv4 replicas").await,
        ips(&["127.0.0.1", "127.0.0.2"]),
        "sorted and deduplicated"
    );

    dns.set(&name, ips(&["::1"]));
    assert_eq!(lookup("one IPv6 replica").await, ips(&["::1"]));

    dns.set(&name, ips(&["::1", "127.0.0.3"]));
    assert_eq!(lookup("both families").await, ips(&["127.0.0.3", "::1"]));

    dns.set(&name, vec![]);
    assert_eq!(lookup("no records").await, ips(&[]));
}

#[tokio::test]
async fn a_stopped_server_is_an_error_not_an_empty_answer() {
    let dns = TestDns::start().await;
    let server = dns.addr();
    let resolver = DnsResolver::new(Some(server)).expect("a resolver");
    dns.set("expert-0.moe.test", ips(&["127.0.0.1"]));
    assert_eq!(
        within("a lookup", resolver.addresses("expert-0.moe.test."))
            .await
            .expect("an answer"),
        ips(&["127.0.0.1"])
    );

    drop(dns);
    match within("a lookup", resolver.addresses("expert-0.moe.test.")).await {
        Err(RouterError::ExpertUnavailable(message)) => {
            assert!(message.contains("expert-0.moe.test."), "{message}");
            assert!(message.contains(&server.to_string()), "{message}");
        }
        other => panic!("expected ExpertUnavailable, got {other:?}"),
    }
}
