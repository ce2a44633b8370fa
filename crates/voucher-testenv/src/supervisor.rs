//! The one supervisor of the services the tests and `voucher-dev local` start
//! (Postgres, nats-server, etcd, kube-apiserver): none may outlive the process
//! that started it, however that process ends (a test binary that panics, is
//! killed or just exits; Ctrl-C on the dev stack).
//!
//! Each service's command runs under `setpriv --pdeathsig` (util-linux, on
//! every Debian machine): the kernel sends the service its stop signal when
//! the thread that started it ends. So every service is started from one
//! thread that lives as long as the process. A service is stopped on purpose
//! with the same signal, waited for, and killed after a grace period. No
//! `unsafe` anywhere: signals go through rustix.

use std::ffi::OsStr;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

/// `program` as a supervised service's command: it gets `stop` when the
/// thread that starts it (see [`start`]) ends. Arguments, environment and
/// standard streams are set on the result as on any command.
pub fn command(program: impl AsRef<OsStr>, stop: Signal) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", signal_name(stop), "--"])
        .arg(program);
    cmd
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::INT => "INT",
        Signal::QUIT => "QUIT",
        Signal::KILL => "KILL",
        _ => "TERM",
    }
}

/// A command to start, and where to send what came of it.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts `cmd` (from [`command`]) from the thread that lives as long as this
/// process, so that its parent-death signal fires only when the process ends.
pub fn start(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("service-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread, and so the parent-death link, alive.
                loop {
                    std::thread::park();
                }
            })
            .expect("start the service spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .expect("the spawner")
        .send((cmd, reply_tx))
        .expect("the spawner thread runs");
    reply_rx.recv().expect("the spawner thread answers")
}

/// Sends `signal` to the process `pid` (a child of ours); a process that is
/// gone already is no error.
pub fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Stops `child` with `stop`, waits up to `grace`, then kills it; reaped.
pub fn stop(child: &mut Child, stop: Signal, grace: Duration) {
    signal(child.id(), stop);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether the process `pid` still exists (a child that exited but was not
/// waited for is not running).
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// The kernel's clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_gets_its_signal_and_is_reaped() {
        let mut cmd = command("sleep", Signal::TERM);
        cmd.arg("30");
        let mut child = start(cmd).unwrap();
        let pid = child.id();
        assert!(is_running(pid));
        stop(&mut child, Signal::TERM, Duration::from_secs(5));
        assert!(!is_running(pid));
    }

    /// A `sleep` service started by a thread of its own that then ends (once setpriv has
    /// set the signal and run `sleep`): `start`ed or not.
    fn started_by_a_short_lived_thread(supervised: bool) -> Child {
        std::thread::spawn(move || {
            let mut cmd = command("sleep", Signal::TERM);
            cmd.arg("30");
            let child = if supervised { start(cmd) } else { cmd.spawn() }.unwrap();
            let comm = format!("/proc/{}/comm", child.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
                assert!(Instant::now() < deadline, "setpriv never ran sleep");
                std::thread::sleep(Duration::from_millis(5));
            }
            child
        })
        .join()
        .unwrap()
    }

    fn ended_within(child: &mut Child, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn a_service_dies_with_the_thread_that_started_it() {
        // Started outside the supervisor's thread: when that thread ends, so does the service.
        let mut orphan = started_by_a_short_lived_thread(false);
        assert!(
            ended_within(&mut orphan, Duration::from_secs(5)),
            "the service outlived the thread that started it: no parent-death signal"
        );
    }

    #[test]
    fn a_started_service_lives_as_long_as_the_process() {
        // Through `start`, the spawning thread is the supervisor's: the service stays.
        let mut service = started_by_a_short_lived_thread(true);
        assert!(
            !ended_within(&mut service, Duration::from_millis(500)),
            "the service died with the thread that asked for it"
        );
        stop(&mut service, Signal::TERM, Duration::from_secs(5));
    }
}
