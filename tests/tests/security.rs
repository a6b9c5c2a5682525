//! Transport security and authentication, with real processes: mutual TLS
//! between router and experts (a router without the right client
//! certificate is refused, an expert whose certificate names another host
//! is refused), TLS and bearer tokens on the public API, and certificates
//! and API keys rotated while the router runs.

use std::path::Path;
use std::time::Duration;

use moe::client::{self, Access};
use moe::launcher::{ClusterOptions, Process};
use moe::pki::{Ca, LOOPBACK_NAMES, LocalPki, Usage, write_private};
use moe_e2e::{greedy, quiet_options, spawn_router, tiny_checkpoint, within};
use moe_proto::dial_once::{DialTls, connect_once};
use moe_proto::tls::{self, ClientTlsFiles, Identity};
use moe_proto::v1::{DescribeRequest, StatsRequest};
use moe_proto::{ExpertMode, ListenAddr, transport};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// An expert-svc for expert 0 with `pki`'s certificates (`--tls-*`).
async fn secure_expert(model: &Path, pki: &LocalPki) -> Process {
    let mut options = quiet_options(model);
    options.tls = Some(pki.clone());
    let listen: ListenAddr = "127.0.0.1:0".parse().unwrap();
    moe::launcher::start_expert(&options, 0, None, &listen)
        .await
        .expect("expert starts")
}

/// Calls Describe on `uri` over TLS as a client trusting `ca` and
/// presenting `identity`.
async fn describe_as(uri: &str, ca: &Path, identity: Option<Identity>) -> Result<(), String> {
    let config = tls::client(ClientTlsFiles {
        ca: ca.to_owned(),
        identity,
    })
    .map_err(|err| err.to_string())?;
    let dial = DialTls::new(config, uri, None)?;
    let channel = connect_once(uri, Some(dial))
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
    transport::expert_client(channel)
        .describe(DescribeRequest {})
        .await
        .map(drop)
        .map_err(|status| format!("Describe: {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_takes_only_routers_with_a_certificate_from_its_ca() {
    let model = tiny_checkpoint();
    let pki = LocalPki::generate().unwrap();
    let expert = secure_expert(model.path(), &pki).await;
    let uri = expert.uri();

    within("the right client certificate", async {
        describe_as(&uri, &pki.ca(), Some(pki.router_client()))
            .await
            .expect("a router with the CA's client certificate is served")
    })
    .await;

    let no_certificate = within("no client certificate", describe_as(&uri, &pki.ca(), None)).await;
    assert!(
        no_certificate.is_err(),
        "served a client without a certificate"
    );

    let other = Ca::new("another CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stranger = other
        .issue(&["router"], Usage::Client)
        .unwrap()
        .write(dir.path(), "stranger")
        .unwrap();
    let other_ca = within(
        "a certificate from another CA",
        describe_as(&uri, &pki.ca(), Some(stranger)),
    )
    .await;
    assert!(other_ca.is_err(), "served a client of another CA");

    let plaintext = within("plaintext", async {
        let channel = connect_once(&uri, None).await.map_err(drop)?;
        transport::expert_client(channel)
            .describe(DescribeRequest {})
            .await
            .map_err(drop)
    })
    .await;
    assert!(plaintext.is_err(), "served a plaintext client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_refuses_an_expert_whose_certificate_names_another_host() {
    let model = tiny_checkpoint();
    let pki = LocalPki::generate().unwrap();
    // Signed by the right CA, but for a name that is not 127.0.0.1.
    let ca = Ca::new("misnaming CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("ca.pem"), &ca.cert_pem()).unwrap();
    ca.issue(&["expert.example"], Usage::Server)
        .unwrap()
        .write(dir.path(), "expert")
        .unwrap();
    ca.issue(&["router"], Usage::Client)
        .unwrap()
        .write(dir.path(), "router-client")
        .unwrap();
    for name in [
        "ca.pem",
        "expert.pem",
        "expert-key.pem",
        "router-client.pem",
        "router-client-key.pem",
    ] {
        std::fs::copy(dir.path().join(name), pki.dir().join(name)).unwrap();
    }
    let expert = secure_expert(model.path(), &pki).await;
    // The public API in plaintext: only the experts' TLS matters here.
    let client_identity = pki.router_client();
    let mut args: Vec<String> = [
        ("--expert-tls-ca", pki.ca()),
        ("--expert-tls-cert", client_identity.cert),
        ("--expert-tls-key", client_identity.key),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.to_string_lossy().into_owned()])
    .collect();
    args.extend(["--expert".into(), format!("0={}", expert.uri())]);
    // The other experts are nowhere: only expert 0's state matters here.
    for other in 1..16 {
        args.extend(["--expert".into(), format!("{other}=http://127.0.0.1:9")]);
    }
    let router = spawn_router(model.path(), &args).await;
    let problem = within("the router refuses expert 0", async {
        let mut client = client::connect(&router.uri()).await.unwrap();
        loop {
            let stats = client.stats(StatsRequest {}).await.unwrap().into_inner();
            let refused = stats.replicas.iter().find(|replica| {
                replica.expert == 0 && replica.state == "refused" && !replica.problem.is_empty()
            });
            if let Some(replica) = refused {
                return (replica.problem.clone(), stats.replicas_refused);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        problem.0.contains("TLS refused") && problem.0.contains("not valid for name"),
        "{problem:?}"
    );
    assert!(problem.1 >= 1, "{problem:?}");
}

/// The public API's token check, on a secure cluster (TLS and mutual TLS)
/// that generates what a plain in-process router does; the keys file
/// rotated while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_cluster_checks_api_keys_and_generates_what_a_plain_one_does() {
    let model = tiny_checkpoint();
    let keys = tempfile::tempdir().unwrap();
    let keys_file = keys.path().join("api-keys");
    std::fs::write(&keys_file, "# test keys\nfirst-key\n").unwrap();
    let options = ClusterOptions {
        tls: Some(LocalPki::generate().unwrap()),
        router_args: vec![
            "--api-keys-file".into(),
            keys_file.to_string_lossy().into_owned(),
        ],
        ..quiet_options(model.path())
    };
    let secure = within(
        "the secure cluster starts",
        moe::launcher::Cluster::start(&options),
    )
    .await
    .expect("secure cluster starts");
    let plain = moe_e2e::start(model.path(), ExpertMode::InProcess).await;
    let uri = secure.router_uri();
    assert!(uri.starts_with("https://"), "{uri}");
    let with_key = |key: Option<&str>| Access {
        api_key: key.map(str::to_owned),
        ..secure.access()
    };
    let request = greedy(&[1, 2, 3, 4], 24);

    let expected = moe_e2e::generate(&plain.router_uri(), request.clone())
        .await
        .expect("plain generation");
    let mut good = client::connect_with(&uri, &with_key(Some("first-key")))
        .await
        .unwrap();
    let got = within(
        "a secure generation",
        client::generate(&mut good, request.clone(), |_| {}),
    )
    .await
    .expect("a good key is served");
    assert_eq!(got.token_ids, expected.token_ids);
    assert_eq!(got.logprobs.len(), expected.logprobs.len());

    for key in [None, Some("wrong-key"), Some("first-key ")] {
        let mut client = client::connect_with(&uri, &with_key(key)).await.unwrap();
        let result = client::generate(&mut client, request.clone(), |_| {}).await;
        match (key, result) {
            // Surrounding spaces are trimmed, like the file's lines.
            (Some("first-key "), result) => assert!(result.is_ok(), "{result:?}"),
            (_, Err(status)) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                assert!(!status.message().contains("wrong-key"), "{status:?}");
            }
            (key, Ok(_)) => panic!("{key:?} was served"),
        }
    }
    // Health stays open (no --auth-health).
    let channel = client::channel(&uri, secure.access().ca.as_deref())
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("health needs no key");

    // Rotate the keys: the new one is taken and the old one refused, soon.
    std::fs::write(&keys_file, "second-key\n").unwrap();
    within("the rotated keys take effect", async {
        loop {
            let mut new = client::connect_with(&uri, &with_key(Some("second-key")))
                .await
                .unwrap();
            let new_ok = new
                .model_info(moe_proto::v1::ModelInfoRequest {})
                .await
                .is_ok();
            let old_refused = good
                .model_info(moe_proto::v1::ModelInfoRequest {})
                .await
                .is_err_and(|status| status.code() == Code::Unauthenticated);
            if new_ok && old_refused {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    secure.shutdown(Duration::from_secs(5)).await;
    plain.shutdown(Duration::from_secs(5)).await;
}

/// The router's certificate files replaced by a new CA's: new clients
/// trusting only the new CA connect, old ones cannot, and a stream open
/// across the change runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_picked_up_and_open_streams_keep_going() {
    let model = tiny_checkpoint();
    let pki = LocalPki::generate().unwrap();
    let router_cert = pki.router();
    let args = vec![
        "--in-process".to_owned(),
        "--tls-cert".into(),
        router_cert.cert.to_string_lossy().into_owned(),
        "--tls-key".into(),
        router_cert.key.to_string_lossy().into_owned(),
    ];
    let router = spawn_router(model.path(), &args).await;
    let uri = router.uri().replacen("http://", "https://", 1);
    let old_access = Access {
        ca: Some(pki.ca()),
        api_key: None,
    };
    let mut old = client::connect_with(&uri, &old_access).await.unwrap();
    // A stream opened before the rotation, read only after it.
    let mut stream = within("the stream opens", old.generate(greedy(&[5, 6, 7], 200)))
        .await
        .expect("served on the old certificate")
        .into_inner();
    let first = within("a first message", stream.message())
        .await
        .unwrap()
        .expect("a first message");
    assert!(!first.token_ids.is_empty());

    let new_ca = Ca::new("rotated CA").unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    let new_ca_path = new_dir.path().join("ca.pem");
    write_private(&new_ca_path, &new_ca.cert_pem()).unwrap();
    let issued = new_ca.issue(&LOOPBACK_NAMES, Usage::Server).unwrap();
    // Key first, then certificate: in between, the pair does not match and
    // the router keeps the old one.
    write_private(&router_cert.key, &issued.key).unwrap();
    write_private(&router_cert.cert, &issued.cert).unwrap();

    let new_access = Access {
        ca: Some(new_ca_path),
        api_key: None,
    };
    within("a client of the new CA connects", async {
        loop {
            if let Ok(mut client) = client::connect_with(&uri, &new_access).await
                && client
                    .model_info(moe_proto::v1::ModelInfoRequest {})
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        client::connect_with(&uri, &old_access).await.is_err(),
        "a new connection trusting only the old CA still succeeds"
    );
    let rest = moe_e2e::collect(stream)
        .await
        .expect("the old stream ends well");
    assert_eq!(rest.finish_reason, "length");
    assert_eq!(first.token_ids.len() + rest.token_ids.len(), 200);
    // The old connection carries new calls too.
    old.stats(StatsRequest {})
        .await
        .expect("the old connection still serves");
    drop(router);
}

/// With `--auth-health`, gRPC health needs the API key too (for routers
/// that only authenticated callers may probe); without a key it is
/// UNAUTHENTICATED, with one it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_health_closes_health_to_callers_without_a_key() {
    let model = tiny_checkpoint();
    let keys = tempfile::tempdir().unwrap();
    let keys_file = keys.path().join("api-keys");
    std::fs::write(&keys_file, "probe-key\n").unwrap();
    let keys_path = keys_file.to_string_lossy().into_owned();
    let cluster = moe_e2e::start_in(
        model.path(),
        ExpertMode::InProcess,
        &["--api-keys-file", &keys_path, "--auth-health"],
    )
    .await;
    let channel = transport::connect(&cluster.router_uri()).await.unwrap();
    let check = |key: Option<&str>| {
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        if let Some(key) = key {
            let value = format!("Bearer {key}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        let mut health = HealthClient::new(channel.clone());
        async move { health.check(request).await }
    };
    let status = check(None).await.expect_err("health without a key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = check(Some("other-key")).await.expect_err("a wrong key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    check(Some("probe-key")).await.expect("health with the key");
    cluster.shutdown(Duration::from_secs(5)).await;
}

/// An expert's certificates replaced while it runs, as Kubernetes swaps a
/// renewed Secret: its server certificate and the CA it checks clients
/// against both move to a new CA. New connections then get the new server
/// certificate and must show a client certificate of the new CA; the old
/// CA's client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_picks_up_a_new_certificate_and_client_ca() {
    let model = tiny_checkpoint();
    let pki = LocalPki::generate().unwrap();
    let expert = secure_expert(model.path(), &pki).await;
    let uri = expert.uri();

    // The old CA and its client certificate, kept aside.
    let old = tempfile::tempdir().unwrap();
    let old_ca = old.path().join("ca.pem");
    std::fs::copy(pki.ca(), &old_ca).unwrap();
    let old_client = Identity {
        cert: old.path().join("client.pem"),
        key: old.path().join("client-key.pem"),
    };
    std::fs::copy(pki.router_client().cert, &old_client.cert).unwrap();
    std::fs::copy(pki.router_client().key, &old_client.key).unwrap();
    describe_as(&uri, &old_ca, Some(old_client.clone()))
        .await
        .expect("served before the rotation");

    // The new CA's files, written aside and renamed over the expert's.
    let new = Ca::new("the renewed CA").unwrap();
    let staged = tempfile::tempdir_in(pki.ca().parent().unwrap()).unwrap();
    write_private(&staged.path().join("ca.pem"), &new.cert_pem()).unwrap();
    let server = new
        .issue(&LOOPBACK_NAMES, Usage::Server)
        .unwrap()
        .write(staged.path(), "expert")
        .unwrap();
    let new_client = new
        .issue(&["router"], Usage::Client)
        .unwrap()
        .write(old.path(), "new-client")
        .unwrap();
    let new_ca = old.path().join("new-ca.pem");
    std::fs::copy(staged.path().join("ca.pem"), &new_ca).unwrap();
    let expert_files = pki.expert();
    std::fs::rename(&server.key, &expert_files.key).unwrap();
    std::fs::rename(&server.cert, &expert_files.cert).unwrap();
    std::fs::rename(staged.path().join("ca.pem"), pki.ca()).unwrap();

    within("the new certificate and client CA take effect", async {
        while describe_as(&uri, &new_ca, Some(new_client.clone()))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let refused = describe_as(&uri, &new_ca, Some(old_client)).await;
    assert!(refused.is_err(), "served a client of the replaced CA");
    let untrusted = describe_as(&uri, &old_ca, Some(new_client)).await;
    assert!(
        untrusted.is_err(),
        "the expert still shows the old CA's certificate"
    );
}
