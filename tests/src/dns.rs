//! A DNS server on loopback whose answers a test changes as it runs: what
//! replica discovery (`--expert E=dns:///NAME:PORT`) is tested against,
//! standing in for a Kubernetes headless Service whose pods come and go.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

/// The addresses each name has now. A std lock: it is held only to copy a
/// list out or put one in, never across an await.
type Zone = Arc<RwLock<HashMap<LowerName, Vec<IpAddr>>>>;

/// A DNS server on `127.0.0.1`, over UDP and TCP on the same port, that
/// knows only the names a test [`set`](TestDns::set). Dropping it stops it.
pub struct TestDns {
    addr: SocketAddr,
    zone: Zone,
    /// Owns the tasks that serve; dropping it aborts them.
    _server: Server<Answers>,
}

impl TestDns {
    /// Serves on `127.0.0.1:<free port>`, in background tasks.
    pub async fn start() -> Self {
        let zone = Zone::default();
        let mut server = Server::new(Answers { zone: zone.clone() });
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("a bound socket has an address");
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        Self {
            addr,
            zone,
            _server: server,
        }
    }

    /// Where to send queries: `--dns-server`'s value.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on `name` (e.g. "expert-3.moe.test.", fully qualified or
    /// not) has these A and AAAA records, with TTL 0; an empty list makes
    /// it a name without records (NOERROR, no answers). A name never set
    /// does not exist (NXDOMAIN).
    pub fn set(&self, name: &str, addresses: Vec<IpAddr>) {
        let mut name = Name::from_ascii(name)
            .unwrap_or_else(|err| panic!("{name:?} is not a DNS name: {err}"));
        name.set_fqdn(true);
        self.zone
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(LowerName::new(&name), addresses);
    }
}

/// A UDP socket and a TCP listener on the same free loopback port. The
/// UDP port is free, the same TCP port almost always is too; when it is not,
/// another port is tried.
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    let mut last_error = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a loopback UDP port");
        let addr = udp.local_addr().expect("a bound socket has an address");
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp),
            Err(err) => last_error = Some(err),
        }
    }
    panic!("no loopback port free for both UDP and TCP: {last_error:?}")
}

/// Answers A and AAAA queries from the zone; every record has TTL 0, so
/// that nothing a test changes can be served from a cache.
struct Answers {
    zone: Zone,
}

impl Answers {
    /// The records answering a query for `name`'s `record_type`, or `None`
    /// for a name that does not exist.
    fn records(&self, name: &LowerName, record_type: RecordType) -> Option<Vec<Record>> {
        let zone = self
            .zone
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let addresses = zone.get(name)?;
        let owner = Name::from(name.clone());
        let records = addresses
            .iter()
            .filter_map(|address| match (address, record_type) {
                (IpAddr::V4(ip), RecordType::A) => Some(RData::A(A(*ip))),
                (IpAddr::V6(ip), RecordType::AAAA) => Some(RData::AAAA(AAAA(*ip))),
                _ => None,
            })
            .map(|data| Record::from_rdata(owner.clone(), 0, data))
            .collect();
        Some(records)
    }
}

#[async_trait::async_trait]
impl RequestHandler for Answers {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let records = match request.request_info() {
            Ok(info) => match self.records(info.query.name(), info.query.query_type()) {
                Some(records) => records,
                None => {
                    metadata.response_code = ResponseCode::NXDomain;
                    Vec::new()
                }
            },
            Err(_) => {
                metadata.response_code = ResponseCode::FormErr;
                Vec::new()
            }
        };
        let response = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            records.iter(),
            [],
            [],
            [],
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                // The client is gone; this is what the server logs of it.
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
