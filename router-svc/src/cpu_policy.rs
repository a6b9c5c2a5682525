//! `--sched-batch`: the router's threads give way to the expert processes
//! it shares cores with.
//!
//! Linux lets a thread that wakes up preempt the one running on its core.
//! On a machine shared with the expert processes, every expert result woke
//! a router thread that preempted whichever expert forward pass was
//! running, and most of those results were not the layer's last, so
//! nothing could proceed on them anyway. Under SCHED_BATCH a woken router
//! thread waits for the running pass to end instead (it still gets its
//! fair share of the CPU); the last result of a layer finds the cores free
//! (measured in docs/decisions.md).

use std::io;

/// Makes the calling thread SCHED_BATCH. Threads it starts afterwards
/// inherit the policy, so call it in `main` before the runtime starts.
pub fn schedule_as_batch() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (pid 0) with a
        // valid parameter; it changes nothing but this thread's policy.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SCHED_BATCH exists only on Linux",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_thread_and_the_threads_it_starts_are_batch() {
        std::thread::spawn(|| {
            schedule_as_batch().unwrap();
            // SAFETY: reads the calling thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_BATCH);
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) });
            assert_eq!(child.join().unwrap(), libc::SCHED_BATCH);
        })
        .join()
        .unwrap();
    }
}
