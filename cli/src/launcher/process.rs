//! One child process the launcher started, and how it starts one: each
//! child prints `... listening on ADDR` on stdout once bound, and the
//! launcher reads that line rather than guessing free ports.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};

use anyhow::{Context, bail};
use moe_proto::ListenAddr;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{ClusterOptions, path_arg};

/// One running child process, stopped by nothing but its caller (or its
/// handle being dropped). A cluster's experts are [`super::ExpertSlot`]s
/// instead, which their supervisor restarts.
pub struct Process {
    pub name: String,
    pub addr: ListenAddr,
    /// Its HTTP side, when it has one: the router's `--http-listen`
    /// (metrics and dashboard), an expert's `--metrics-listen`.
    pub http: Option<SocketAddr>,
    child: Child,
}

impl Process {
    /// What a client dials to reach this process.
    pub fn uri(&self) -> String {
        self.addr.uri()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM: the process drains and exits.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGSTOP: the process stops answering without closing its
    /// connections, as a hung one would. [`Process::resume`] undoes it.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Sends SIGCONT to a frozen process.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on a pid we spawned and have not reaped
            // (`id()` is None once it is reaped).
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }

    /// The child, for a supervisor that takes over waiting on it.
    pub(super) fn into_child(self) -> Child {
        self.child
    }
}

/// Starts one expert-svc process serving `expert` (for `layers`, "A..B",
/// or every layer) on `listen`, with the cluster's thread settings: one
/// gemm thread and one tokio worker unless `options` say otherwise, so
/// that a process per expert does not oversubscribe the cores.
pub async fn start_expert(
    options: &ClusterOptions,
    expert: usize,
    layers: Option<&str>,
    listen: &ListenAddr,
) -> anyhow::Result<Process> {
    start_replica(
        options,
        expert,
        0,
        layers,
        listen,
        options.expert_metrics_listen(),
    )
    .await
}

/// [`start_expert`] for replica `replica` of `expert`, which sets the
/// device it runs on ([`ClusterOptions::expert_device`]).
pub async fn start_replica(
    options: &ClusterOptions,
    expert: usize,
    replica: usize,
    layers: Option<&str>,
    listen: &ListenAddr,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<Process> {
    let mut command = Command::new(options.bin_dir.join("expert-svc"));
    if let Some(metrics) = metrics_listen {
        command.args(["--metrics-listen", &metrics.to_string()]);
    }
    command
        .args(["--model", &path_arg(&options.model)])
        .args(["--listen", &listen.to_string()])
        .args(["--expert", &expert.to_string()])
        .args(["--kernels", options.kernels.name()])
        .env("RAYON_NUM_THREADS", options.expert_threads.to_string())
        .env("TOKIO_WORKER_THREADS", "1");
    if let Some(layers) = layers {
        command.args(["--layers", layers]);
    }
    if let Some(device) = options.expert_device(expert, replica) {
        command.args(["--device", &device]);
    }
    if let Some(pki) = &options.tls {
        command.args(pki.expert_args());
    }
    spawn(format!("expert-svc {expert}"), command, options).await
}

/// Spawns `command` and waits for its `listening on ADDR` line. The child
/// dies with its handle (`kill_on_drop`), so no test leaks processes.
pub async fn spawn(
    name: String,
    mut command: Command,
    options: &ClusterOptions,
) -> anyhow::Result<Process> {
    let timeout = options.ready_timeout;
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", &options.log_filter);
    }
    command.envs(options.env.iter().map(|(key, value)| (key, value)));
    let mut child = command
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // An HTTP side, if any, is announced first ("... http on ADDR",
    // "... metrics on ADDR"), then the gRPC "... listening on ADDR".
    let mut http = None;
    let addr = loop {
        let line = tokio::time::timeout(timeout, lines.next_line())
            .await
            .with_context(|| format!("{name} did not start listening within {timeout:?}"))??;
        let Some(line) = line else {
            let status = child.wait().await?;
            bail!("{name} exited before listening ({status}); its log above says why");
        };
        if let Some((_, addr)) = line.rsplit_once("listening on ") {
            break addr.trim().to_owned();
        }
        if let Some((_, addr)) = line
            .rsplit_once(" http on ")
            .or_else(|| line.rsplit_once(" metrics on "))
        {
            http = Some(
                addr.trim()
                    .parse()
                    .map_err(|err| anyhow::anyhow!("{name} printed a bad HTTP address: {err}"))?,
            );
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Process {
        addr: addr
            .parse()
            .map_err(|err| anyhow::anyhow!("{name} printed a bad address: {err}"))?,
        name,
        http,
        child,
    })
}
