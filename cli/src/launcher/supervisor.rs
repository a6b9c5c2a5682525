//! Keeps a cluster's expert processes running. Each expert process has a
//! slot: a supervisor task that owns the child, and a handle
//! ([`ExpertSlot`]) that tests and commands keep. When the process exits
//! without the cluster asking (a crash, a SIGKILL, a SIGTERM someone else
//! sent), the supervisor starts a replacement on the same address, so
//! the router, which knows its experts by address, finds it again.
//!
//! The state a slot's handle reads is a `watch` value the supervisor
//! writes: signals go to whichever process runs now, and waiting for a
//! restart is waiting for that value to change, never sleeping.

use std::fmt;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use moe_proto::ListenAddr;
use tokio::process::Child;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ClusterOptions;
use super::backoff::RestartBackoff;
use super::process::{Process, start_replica};

/// What a slot's process is doing, as its supervisor last recorded it.
#[derive(Debug, Clone, Default)]
struct SlotState {
    /// The running process's; None between an exit and its replacement.
    pid: Option<u32>,
    restarts: u32,
    exits: u32,
    /// How the last process to exit ended (None: unknown, or none yet).
    last_exit: Option<ExitStatus>,
    /// No process will run in this slot again: the cluster is stopping,
    /// or restarts are off and its process exited.
    stopped: bool,
}

/// One expert process of a cluster, replaced on the same address when it
/// exits unasked. The handle outlives each process: its signals reach
/// whichever one runs now.
#[derive(Clone)]
pub struct ExpertSlot {
    /// "expert-svc E", or "expert-svc E (replica R)" for R > 0.
    pub name: String,
    pub expert: usize,
    /// From 0, among the expert's processes.
    pub replica: usize,
    /// Where it listens, every restart alike.
    pub addr: ListenAddr,
    /// Its `/metrics`, every restart alike, when it has one.
    pub metrics: Option<SocketAddr>,
    state: Arc<watch::Sender<SlotState>>,
}

impl ExpertSlot {
    /// What a client dials to reach this expert process.
    pub fn uri(&self) -> String {
        self.addr.uri()
    }

    /// The running process's, or None while it is being restarted (or
    /// stopped for good).
    pub fn pid(&self) -> Option<u32> {
        self.state.borrow().pid
    }

    /// How many times a replacement has come up in this slot.
    pub fn restarts(&self) -> u32 {
        self.state.borrow().restarts
    }

    /// SIGKILL, as a crash would; the supervisor restarts it (unless
    /// restarts are off). False when no process was running.
    pub fn kill(&self) -> bool {
        self.signal(libc::SIGKILL)
    }

    /// SIGTERM: the process drains and exits, and the supervisor restarts
    /// it like any exit the cluster did not ask for (a rolling restart).
    pub fn terminate(&self) -> bool {
        self.signal(libc::SIGTERM)
    }

    /// SIGSTOP: the process stops answering without closing its
    /// connections, as a hung one would, and is not restarted (it has
    /// not exited). [`ExpertSlot::resume`] undoes it.
    pub fn freeze(&self) -> bool {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT to a frozen process.
    pub fn resume(&self) -> bool {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> bool {
        // The read lock keeps the supervisor from recording an exit while
        // the signal goes out. It records one just after reaping the
        // process, so a signal sent in that gap finds its pid free: for
        // the pid to name another process by then, the kernel, which hands
        // pids out in sequence, would have had to wrap around.
        let state = self.state.borrow();
        let Some(pid) = state.pid else {
            return false;
        };
        // SAFETY: kill(2) has no memory effects; the pid is our child's.
        unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
    }

    /// Waits until the slot has restarted more than `previous` times, that
    /// is until a replacement listens at [`ExpertSlot::addr`], and returns
    /// the new count. Fails when the slot stops for good first (restarts
    /// off, or the cluster shutting down).
    pub async fn wait_restarted(&self, previous: u32) -> anyhow::Result<u32> {
        let mut state = self.state.subscribe();
        let state = state
            .wait_for(|s| s.restarts > previous || s.stopped)
            .await?;
        anyhow::ensure!(
            state.restarts > previous,
            "{} stopped for good after {} restarts",
            self.name,
            state.restarts
        );
        Ok(state.restarts)
    }

    /// Waits until the process running now has exited, and says how (None
    /// when that could not be read); at once when none is running.
    pub async fn wait_exited(&self) -> Option<ExitStatus> {
        let mut state = self.state.subscribe();
        let exits = {
            let now = state.borrow_and_update();
            if now.pid.is_none() {
                return now.last_exit;
            }
            now.exits
        };
        state
            .wait_for(|s| s.exits > exits)
            .await
            .ok()
            .and_then(|s| s.last_exit)
    }

    /// Waits until a process runs in the slot (at once when one does);
    /// false when the slot stopped for good instead.
    pub async fn wait_running(&self) -> bool {
        let mut state = self.state.subscribe();
        state
            .wait_for(|s| s.pid.is_some() || s.stopped)
            .await
            .is_ok_and(|s| s.pid.is_some())
    }
}

/// What happened to an expert process, as the supervisors report it to
/// whoever listens ([`super::Cluster::events`]; `moe up` prints them).
#[derive(Debug, Clone)]
pub enum ExpertEvent {
    /// A process exited without the cluster asking. `restart_in` is None
    /// when restarts are off.
    Exited {
        name: String,
        pid: Option<u32>,
        status: Option<ExitStatus>,
        uptime: Duration,
        restart_in: Option<Duration>,
    },
    /// A replacement listens at the slot's address.
    Restarted {
        name: String,
        addr: ListenAddr,
        pid: Option<u32>,
        restarts: u32,
    },
    /// A replacement did not come up (e.g. another program took the
    /// port); the supervisor tries again after `retry_in`.
    RestartFailed {
        name: String,
        error: String,
        retry_in: Duration,
    },
    /// `moe up --autoscale` changed an expert's processes from `from` to
    /// `to`, following the router's signal (`desired`).
    Scaled {
        expert: usize,
        from: usize,
        to: usize,
        desired: usize,
    },
}

impl fmt::Display for ExpertEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited {
                name,
                pid,
                status,
                uptime,
                restart_in,
            } => {
                write!(
                    f,
                    "{name} (pid {}) exited after {uptime:.1?}: ",
                    pid.unwrap_or(0)
                )?;
                match status {
                    Some(status) => write!(f, "{status}")?,
                    None => f.write_str("status unknown")?,
                }
                match restart_in {
                    Some(delay) => write!(f, "; restarting it in {delay:?}"),
                    None => f.write_str("; not restarting it (restarts are off)"),
                }
            }
            Self::Restarted {
                name,
                addr,
                pid,
                restarts,
            } => write!(
                f,
                "{name} restarted at {addr} (pid {}, restart {restarts})",
                pid.unwrap_or(0)
            ),
            Self::RestartFailed {
                name,
                error,
                retry_in,
            } => write!(
                f,
                "{name} did not restart: {error}; retrying in {retry_in:?}"
            ),
            Self::Scaled {
                expert,
                from,
                to,
                desired,
            } => write!(
                f,
                "autoscale: expert {expert} from {from} to {to} processes (signal: {desired})"
            ),
        }
    }
}

/// Why a supervisor woke up.
enum Woke {
    Exited(std::io::Result<ExitStatus>),
    /// The cluster is stopping: with a grace period for a SIGTERM, or
    /// None (the cluster was dropped) to kill at once.
    Stop(Option<Duration>),
}

/// What a supervisor needs to start a replacement and to report.
pub(super) struct Supervisor {
    pub name: String,
    pub expert: usize,
    pub replica: usize,
    pub addr: ListenAddr,
    /// Its `/metrics` address, every restart alike (Prometheus keeps
    /// scraping the same target).
    pub metrics: Option<SocketAddr>,
    pub options: ClusterOptions,
    pub events: broadcast::Sender<ExpertEvent>,
}

impl Supervisor {
    /// Starts replica `replica` of `expert` on `listen` and hands it to a
    /// new supervisor task that `stop` stops; the slot is its handle.
    pub async fn start_replica(
        options: &ClusterOptions,
        events: &broadcast::Sender<ExpertEvent>,
        (expert, replica): (usize, usize),
        listen: &ListenAddr,
        stop: watch::Receiver<Option<Duration>>,
    ) -> anyhow::Result<(ExpertSlot, JoinHandle<()>)> {
        let metrics = options.expert_metrics_listen();
        let mut process = start_replica(options, expert, replica, None, listen, metrics).await?;
        process.name = slot_name(expert, replica);
        let supervisor = Supervisor {
            name: process.name.clone(),
            expert,
            replica,
            // The bound address: a restart reuses the port.
            addr: process.addr.clone(),
            metrics: process.http,
            options: options.clone(),
            events: events.clone(),
        };
        Ok(supervisor.start(process, stop))
    }

    /// Hands `process` to a new supervisor task; the slot is its handle.
    pub fn start(
        self,
        process: Process,
        stop: watch::Receiver<Option<Duration>>,
    ) -> (ExpertSlot, JoinHandle<()>) {
        let state = Arc::new(watch::Sender::new(SlotState {
            pid: process.pid(),
            ..SlotState::default()
        }));
        let slot = ExpertSlot {
            name: self.name.clone(),
            expert: self.expert,
            replica: self.replica,
            addr: self.addr.clone(),
            metrics: self.metrics,
            state: state.clone(),
        };
        let task = tokio::spawn(async move {
            self.supervise(process.into_child(), &state, stop).await;
            state.send_modify(|s| {
                s.pid = None;
                s.stopped = true;
            });
        });
        (slot, task)
    }

    async fn supervise(
        &self,
        mut child: Child,
        state: &watch::Sender<SlotState>,
        mut stop: watch::Receiver<Option<Duration>>,
    ) {
        let mut backoff = RestartBackoff::default();
        loop {
            let started = Instant::now();
            let pid = child.id();
            let woke = tokio::select! {
                status = child.wait() => Woke::Exited(status),
                grace = stop_requested(&mut stop) => Woke::Stop(grace),
            };
            let status = match woke {
                Woke::Exited(status) => status,
                Woke::Stop(grace) => return stop_child(&mut child, grace, state).await,
            };
            if let Err(err) = &status {
                tracing::warn!(expert = %self.name, %err, "cannot read the exit status");
            }
            let status = status.ok();
            let uptime = started.elapsed();
            state.send_modify(|s| {
                s.pid = None;
                s.exits += 1;
                s.last_exit = status;
            });
            if stop.borrow().is_some() {
                return;
            }
            let restart_in = self
                .options
                .restart_experts
                .then(|| backoff.next_delay(uptime));
            self.report(ExpertEvent::Exited {
                name: self.name.clone(),
                pid,
                status,
                uptime,
                restart_in,
            });
            let Some(delay) = restart_in else {
                return;
            };
            match self.restart(delay, &mut backoff, state, &mut stop).await {
                Some(replacement) => child = replacement,
                None => return,
            }
        }
    }

    /// Starts a replacement after `delay`, and again with backoff until
    /// one listens; None when the cluster stops first.
    async fn restart(
        &self,
        mut delay: Duration,
        backoff: &mut RestartBackoff,
        state: &watch::Sender<SlotState>,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> Option<Child> {
        loop {
            let attempt = async {
                tokio::time::sleep(delay).await;
                self.respawn().await
            };
            // A replacement half-started when the cluster stops dies with
            // the dropped future (its child is `kill_on_drop`).
            let result = tokio::select! {
                result = attempt => result,
                _ = stop_requested(stop) => return None,
            };
            match result {
                Ok(process) => {
                    let pid = process.pid();
                    let mut restarts = 0;
                    state.send_modify(|s| {
                        s.pid = pid;
                        s.restarts += 1;
                        restarts = s.restarts;
                    });
                    self.report(ExpertEvent::Restarted {
                        name: self.name.clone(),
                        addr: self.addr.clone(),
                        pid,
                        restarts,
                    });
                    return Some(process.into_child());
                }
                Err(err) => {
                    delay = backoff.next_delay(Duration::ZERO);
                    self.report(ExpertEvent::RestartFailed {
                        name: self.name.clone(),
                        error: format!("{err:#}"),
                        retry_in: delay,
                    });
                }
            }
        }
    }

    /// A replacement on the slot's address, or why not.
    async fn respawn(&self) -> anyhow::Result<Process> {
        let mut process = start_replica(
            &self.options,
            self.expert,
            self.replica,
            None,
            &self.addr,
            self.metrics,
        )
        .await?;
        process.name = self.name.clone();
        // Dropping a misplaced replacement kills it.
        anyhow::ensure!(
            process.addr == self.addr,
            "the replacement listens on {} instead of {}",
            process.addr,
            self.addr
        );
        Ok(process)
    }

    /// Logs `event` and hands it to the cluster's listeners, if any.
    fn report(&self, event: ExpertEvent) {
        tracing::info!(expert = self.expert, replica = self.replica, "{event}");
        // An error only says that nobody listens.
        let _ = self.events.send(event);
    }
}

/// Resolves once the cluster stops, with what [`Woke::Stop`] carries.
async fn stop_requested(stop: &mut watch::Receiver<Option<Duration>>) -> Option<Duration> {
    match stop.wait_for(Option::is_some).await {
        Ok(grace) => *grace,
        Err(_) => None,
    }
}

/// SIGTERM and up to `grace` to drain, then SIGKILL; SIGKILL at once
/// without a grace period.
async fn stop_child(child: &mut Child, grace: Option<Duration>, state: &watch::Sender<SlotState>) {
    let mut status = None;
    if let (Some(grace), Some(pid)) = (grace, child.id()) {
        // SAFETY: kill(2) on our child, not yet reaped (`id()` is Some).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        status = tokio::time::timeout(grace, child.wait())
            .await
            .ok()
            .and_then(Result::ok);
    }
    if status.is_none() {
        let _ = child.kill().await;
        status = child.try_wait().ok().flatten();
    }
    state.send_modify(|s| {
        s.pid = None;
        s.exits += 1;
        s.last_exit = status;
    });
}

/// "expert-svc E", or "expert-svc E (replica R)" past the first.
pub(super) fn slot_name(expert: usize, replica: usize) -> String {
    match replica {
        0 => format!("expert-svc {expert}"),
        _ => format!("expert-svc {expert} (replica {replica})"),
    }
}
