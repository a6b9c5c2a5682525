//! The supervisor against a stand-in for expert-svc: a shell script that
//! prints the `listening on` line and sleeps, so that restarts, backoff
//! and stopping are tested in a second, without a checkpoint.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use moe_proto::{ExpertMode, ListenAddr};
use tokio::sync::{broadcast, watch};

use super::supervisor::Supervisor;
use super::{ClusterOptions, ExpertEvent, ExpertSlot, ExpertTransport, start_expert};

/// Counts its starts in `starts` beside itself; the start numbered in
/// `fail_on` exits before listening, as one whose port was taken would.
const FAKE_EXPERT: &str = r#"#!/bin/sh
dir=$(dirname "$0")
n=$(( $(cat "$dir/starts" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$dir/starts"
if grep -qx "$n" "$dir/fail_on" 2>/dev/null; then
    echo "cannot listen: address in use" >&2
    exit 1
fi
# --model M --listen ADDR --expert E
echo "fake expert-svc listening on $4"
exec sleep 600
"#;

fn options(bin_dir: &Path, restart_experts: bool) -> ClusterOptions {
    let script = bin_dir.join("expert-svc");
    std::fs::write(&script, FAKE_EXPERT).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    ClusterOptions {
        model: bin_dir.to_owned(),
        router_listen: "127.0.0.1:0".parse().unwrap(),
        bin_dir: bin_dir.to_owned(),
        expert_threads: 1,
        expert_transport: ExpertTransport::Tcp,
        mode: ExpertMode::Distributed,
        replicas: Vec::new(),
        router_args: Vec::new(),
        http_listen: None,
        env: Vec::new(),
        autoscale: None,
        expert_metrics: false,
        kernels: moe_model::Kernels::Fast,
        ready_timeout: Duration::from_secs(10),
        log_filter: "warn".into(),
        restart_experts,
        gpus: Vec::new(),
        tls: None,
    }
}

/// A supervised fake expert 3, replica 1, with its events and the stop
/// channel a cluster would hold.
async fn supervised(
    options: &ClusterOptions,
) -> (
    ExpertSlot,
    tokio::task::JoinHandle<()>,
    broadcast::Receiver<ExpertEvent>,
    watch::Sender<Option<Duration>>,
) {
    let listen: ListenAddr = "127.0.0.1:7".parse().unwrap();
    let process = start_expert(options, 3, None, &listen).await.unwrap();
    let (events, receiver) = broadcast::channel(16);
    let (stop, _) = watch::channel(None);
    let supervisor = Supervisor {
        name: "expert-svc 3 (replica 1)".into(),
        expert: 3,
        replica: 1,
        addr: process.addr.clone(),
        metrics: process.http,
        options: options.clone(),
        events,
    };
    let (slot, task) = supervisor.start(process, stop.subscribe());
    (slot, task, receiver, stop)
}

async fn next(events: &mut broadcast::Receiver<ExpertEvent>) -> ExpertEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event within 10 s")
        .expect("an event")
}

#[tokio::test]
async fn a_killed_or_terminated_process_comes_back_until_the_cluster_stops() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), true);
    let (slot, task, mut events, stop) = supervised(&options).await;
    assert_eq!(slot.uri(), "http://127.0.0.1:7");
    let first = slot.pid().expect("running");

    assert!(slot.kill());
    assert_eq!(slot.wait_restarted(0).await.unwrap(), 1);
    let second = slot.pid().expect("the replacement runs");
    assert_ne!(first, second);
    match next(&mut events).await {
        ExpertEvent::Exited {
            pid,
            status,
            restart_in,
            ..
        } => {
            assert_eq!(pid, Some(first));
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status.unwrap()),
                Some(libc::SIGKILL)
            );
            assert_eq!(restart_in, Some(Duration::from_millis(100)));
        }
        other => panic!("{other}"),
    }
    let restarted = next(&mut events).await;
    assert!(
        matches!(&restarted, ExpertEvent::Restarted { restarts: 1, pid, .. } if *pid == Some(second)),
        "{restarted}"
    );
    assert_eq!(
        restarted.to_string(),
        format!("expert-svc 3 (replica 1) restarted at 127.0.0.1:7 (pid {second}, restart 1)")
    );

    // A SIGTERM someone else sends is healed too, after a longer wait:
    // the replacement died within 2 s of starting.
    assert!(slot.terminate());
    assert_eq!(slot.wait_restarted(1).await.unwrap(), 2);
    assert!(matches!(
        next(&mut events).await,
        ExpertEvent::Exited { restart_in: Some(delay), .. } if delay == Duration::from_millis(200)
    ));

    // Stopping the cluster terminates it for good.
    let third = slot.pid().expect("running");
    stop.send_replace(Some(Duration::from_secs(5)));
    task.await.unwrap();
    assert_eq!(slot.pid(), None);
    assert!(!slot.kill());
    assert!(slot.wait_restarted(2).await.is_err());
    assert!(slot.wait_exited().await.is_some());
    // SAFETY: signal 0 only asks whether the pid exists.
    assert_eq!(unsafe { libc::kill(third as libc::pid_t, 0) }, -1, "reaped");
}

#[tokio::test]
async fn a_replacement_that_cannot_listen_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fail_on"), "2\n3\n").unwrap();
    let options = options(dir.path(), true);
    let (slot, _task, mut events, _stop) = supervised(&options).await;
    assert!(slot.kill());
    assert_eq!(slot.wait_restarted(0).await.unwrap(), 1);
    let mut delays = Vec::new();
    for _ in 0..3 {
        match next(&mut events).await {
            ExpertEvent::Exited { restart_in, .. } => delays.push(restart_in.unwrap()),
            ExpertEvent::RestartFailed { retry_in, .. } => delays.push(retry_in),
            other => panic!("{other}"),
        }
    }
    assert_eq!(delays, [100, 200, 400].map(Duration::from_millis));
    assert!(matches!(
        next(&mut events).await,
        ExpertEvent::Restarted { restarts: 1, .. }
    ));
}

#[tokio::test]
async fn with_restarts_off_an_exit_is_final() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), false);
    let (slot, task, mut events, _stop) = supervised(&options).await;
    assert!(slot.terminate());
    let status = slot.wait_exited().await.expect("an exit status");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM)
    );
    task.await.unwrap();
    assert!(matches!(
        next(&mut events).await,
        ExpertEvent::Exited {
            restart_in: None,
            ..
        }
    ));
    assert!(slot.wait_restarted(0).await.is_err());
    assert!(!slot.wait_running().await);
}

#[tokio::test]
async fn dropping_the_cluster_kills_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), true);
    let (slot, task, _events, stop) = supervised(&options).await;
    let pid = slot.pid().expect("running");
    drop(stop);
    task.await.unwrap();
    let status = slot.wait_exited().await.expect("an exit status");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // SAFETY: signal 0 only asks whether the pid exists.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, 0) }, -1, "reaped");
}
