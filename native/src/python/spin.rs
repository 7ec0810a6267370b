//! `Spinner`: a bounded busy-wait for the one socket the next bytes come on (issue #13,
//! QD1 latency), for `trustvbd.nbd.spin`.
//!
//! A QD1 read wakes the encryption domain twice (the guest's request, the driver's
//! reply); on a VM whose idle vCPUs halt at once each wake-up of a sleeping process costs
//! tens of µs (bench/wake_cost.py measures it). Polling the socket for a
//! short budget instead of sleeping saves that when the bytes come within it. So a wait:
//!
//! - spins at most `budget` (never more than BUDGET_MAX), then gives up: the caller goes
//!   on as it would have without it (back to its event loop, or a blocking read);
//! - yields the CPU (sched_yield) between two looks at the socket: a task the scheduler
//!   put on this CPU meanwhile runs at once. That task is often the one the bytes come
//!   from (the driver or the guest woken by this thread, placed beside it); a spin that
//!   kept the CPU made it wait for the budget to run out. Being switched out so is
//!   counted (`yielded`), not a back-off;
//! - does not spin at all for a while after a wait the bytes did not come in: OFF_VAIN_FIRST
//!   after a lone one, doubled for each further one until PAID_TO_FORGIVE waits in a row
//!   have paid, up to OFF_VAIN. A QD1 chain on a quiet VM has a late reply now and then
//!   (a host hiccup): a flat OFF_VAIN after each made a long run of requests at the
//!   sleeping latency, the tail of the latency (bench/README.md); a guest whose requests
//!   mostly come after the budget still turns it off for OFF_VAIN soon;
//! - does not spin while the machine's CPU pressure (`/proc/pressure/cpu`, `some avg10`:
//!   the share of time some task waited for a CPU) is above PSI_MAX, read at most every
//!   PSI_EVERY from a descriptor opened before the domain was confined. Unreadable
//!   pressure counts as pressure. A QD1 chain's own hand-offs make 20-30 % on an idle
//!   2-vCPU machine (each wakee waits for its waker to sleep): the limit is above that.
//!
//! The spin holds no lock and no GIL (callers detach), so it delays nothing but its own
//! thread's next step, by at most the budget.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::foreign;

/// The longest budget a Spinner takes.
pub(crate) const BUDGET_MAX: Duration = Duration::from_micros(500);
/// No spinning for at most this long after a wait the bytes did not come in.
pub(crate) const OFF_VAIN: Duration = Duration::from_millis(20);
/// No spinning for this long after a lone wait in vain (doubled per further one).
pub(crate) const OFF_VAIN_FIRST: Duration = Duration::from_millis(1);
/// Waits in a row that must pay before a wait in vain counts as lone again.
pub(crate) const PAID_TO_FORGIVE: u32 = 64;
/// How often the CPU pressure is read.
pub(crate) const PSI_EVERY: Duration = Duration::from_millis(250);
/// No spinning while some task waited for a CPU more than this share of the last 10 s
/// (%), unless told another.
pub(crate) const PSI_MAX: f64 = 50.0;

/// How waits ended, counted: bytes came; the budget ran out; not spun (off); and the waits
/// during which another task ran on this CPU (`yielded`, whatever their end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) paid: u64,
    pub(crate) vain: u64,
    pub(crate) yielded: u64,
    pub(crate) off: u64,
}

pub(crate) struct SpinGate {
    budget: Duration,
    off_until: Option<Instant>,
    /// Waits in vain since PAID_TO_FORGIVE waits in a row last paid, and those paid since
    /// the last in vain.
    vain_streak: u32,
    paid_run: u32,
    psi: Option<File>,
    psi_max: f64,
    psi_read_at: Option<Instant>,
    pressured: bool,
    pub(crate) counts: Counts,
}

impl SpinGate {
    /// `psi`: `/proc/pressure/cpu` opened; None: no pressure gate (tests, and a driver that
    /// could not open it keeps only the back-offs).
    pub(crate) fn new(budget: Duration, psi: Option<File>, psi_max: f64) -> Result<Self, String> {
        if budget > BUDGET_MAX {
            return Err(format!(
                "a busy-wait budget of {} µs is over the {} µs allowed: a trusted domain \
                 spins only briefly",
                budget.as_micros(),
                BUDGET_MAX.as_micros()
            ));
        }
        if !(0.0..=100.0).contains(&psi_max) {
            return Err(format!(
                "a CPU pressure limit of {psi_max} % is not a share: give 0 to 100"
            ));
        }
        Ok(Self {
            budget,
            off_until: None,
            vain_streak: 0,
            paid_run: 0,
            psi,
            psi_max,
            psi_read_at: None,
            pressured: false,
            counts: Counts::default(),
        })
    }

    /// Whether a wait now would spin (not off after a wait, not under CPU pressure); a
    /// wait that is not counts as off.
    pub(crate) fn armed(&mut self) -> bool {
        let now = Instant::now();
        let armed = !self.budget.is_zero() && self.off_until.is_none_or(|until| now >= until) && !self.pressure(now);
        if !armed {
            self.counts.off += 1;
        }
        armed
    }

    /// Spins until `fd` has bytes to read or the budget is spent, if the gate allows:
    /// true when they came (the caller reads them now), false otherwise (it waits as usual).
    pub(crate) fn wait(&mut self, fd: RawFd) -> bool {
        // A task placed on this CPU (the waker's wakee, often the sender of the bytes
        // awaited) runs now; with none, sched_yield returns at once.
        self.wait_with(fd, std::thread::yield_now)
    }

    /// `wait`, with `pause` between two looks at the socket.
    fn wait_with(&mut self, fd: RawFd, mut pause: impl FnMut()) -> bool {
        if !self.armed() {
            return false;
        }
        let start = Instant::now();
        let switches = foreign::involuntary_switches();
        let ready = loop {
            // An error (a closed number) reads as ready: the caller's read says what it is.
            if foreign::poll_ready(fd).unwrap_or(true) {
                break true;
            }
            if start.elapsed() >= self.budget {
                break false;
            }
            pause();
        };
        if foreign::involuntary_switches() != switches {
            self.counts.yielded += 1;
        }
        if ready {
            self.counts.paid += 1;
            self.paid_run = self.paid_run.saturating_add(1);
            if self.paid_run >= PAID_TO_FORGIVE {
                self.vain_streak = 0;
            }
        } else {
            self.counts.vain += 1;
            self.paid_run = 0;
            self.off_until = Some(Instant::now() + off_after_vain(self.vain_streak));
            self.vain_streak = self.vain_streak.saturating_add(1);
        }
        ready
    }

    /// Whether the CPU pressure is over PSI_MAX (read again once PSI_EVERY has passed).
    fn pressure(&mut self, now: Instant) -> bool {
        let Some(file) = &self.psi else { return false };
        if self.psi_read_at.is_some_and(|at| now.duration_since(at) < PSI_EVERY) {
            return self.pressured;
        }
        self.psi_read_at = Some(now);
        let mut buf = [0u8; 256];
        self.pressured = match file.read_at(&mut buf, 0) {
            Ok(n) => some_avg10(&buf[..n]).is_none_or(|share| share > self.psi_max),
            Err(_) => true,
        };
        self.pressured
    }
}

/// How long no wait spins after one in vain that follows `streak` others (see SpinGate).
pub(crate) fn off_after_vain(streak: u32) -> Duration {
    OFF_VAIN_FIRST.saturating_mul(1 << streak.min(16)).min(OFF_VAIN)
}

/// `some avg10` of a /proc/pressure file's text ("some avg10=1.23 avg60=..."), in %.
pub(crate) fn some_avg10(text: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(text).ok()?;
    let line = text.lines().find(|line| line.starts_with("some "))?;
    let field = line.split_whitespace().find_map(|f| f.strip_prefix("avg10="))?;
    field.parse().ok()
}

/// A bounded busy-wait for a socket's next bytes (see the module's text). One wait at a
/// time: a thread that finds another waiting does not spin.
#[pyclass(name = "Spinner", module = "trustvbd._native", frozen)]
pub(crate) struct PySpinner {
    gate: Mutex<SpinGate>,
}

#[pymethods]
impl PySpinner {
    /// `budget_us`: the longest spin; `psi_fd`: `/proc/pressure/cpu` open (duplicated
    /// here), or -1 for no pressure gate; `psi_max`: the pressure (%) above which it is off.
    #[new]
    #[pyo3(signature = (budget_us, psi_fd, psi_max = PSI_MAX))]
    fn new(py: Python<'_>, budget_us: u64, psi_fd: RawFd, psi_max: f64) -> PyResult<Self> {
        let psi = if psi_fd < 0 {
            None
        } else {
            Some(foreign::dup_file(py, psi_fd)?)
        };
        let gate = SpinGate::new(Duration::from_micros(budget_us), psi, psi_max).map_err(PyValueError::new_err)?;
        Ok(Self { gate: Mutex::new(gate) })
    }

    /// Spins (the GIL released) until `fd` is readable or the budget is spent, if the
    /// gate allows: whether it is readable.
    fn wait(&self, py: Python<'_>, fd: RawFd) -> bool {
        py.detach(|| match self.gate.try_lock() {
            Ok(mut gate) => gate.wait(fd),
            Err(_) => false, // another thread waits (or one panicked): no spinning here
        })
    }

    /// Whether a wait now would spin (else it counts as off): asked before a wait is
    /// queued, so that an idle gate costs no loop callback.
    fn armed(&self) -> bool {
        self.gate.try_lock().is_ok_and(|mut gate| gate.armed())
    }

    /// (paid, vain, yielded, off): how the waits so far ended, and how many of them
    /// another task ran during (see the module's text).
    #[getter]
    fn counts(&self) -> (u64, u64, u64, u64) {
        let c = match self.gate.lock() {
            Ok(gate) => gate.counts,
            Err(poisoned) => poisoned.into_inner().counts,
        };
        (c.paid, c.vain, c.yielded, c.off)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySpinner>()?;
    m.add("SPIN_BUDGET_MAX_US", BUDGET_MAX.as_micros() as u64)?;
    m.add("SPIN_PSI_MAX", PSI_MAX)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn bytes_already_there_end_the_wait_at_once() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let mut gate = SpinGate::new(Duration::from_micros(100), None, PSI_MAX).unwrap();
        assert!(gate.wait(b.as_raw_fd()));
        assert_eq!(gate.counts.vain + gate.counts.off, 0);
    }

    #[test]
    fn a_wait_in_vain_ends_after_its_budget_then_none_spins_for_a_while() {
        let (_a, b) = UnixStream::pair().unwrap();
        let budget = Duration::from_micros(300);
        let mut gate = SpinGate::new(budget, None, PSI_MAX).unwrap();
        let start = Instant::now();
        assert!(!gate.wait(b.as_raw_fd()));
        let spent = start.elapsed();
        assert!(spent >= budget, "gave up after {spent:?}, before its budget");
        assert!(spent < Duration::from_secs(1), "spun {spent:?}: unbounded");
        assert_eq!(gate.counts.vain, 1);
        // Off now: the next waits return without polling, even with bytes there.
        let (mut c, d) = UnixStream::pair().unwrap();
        c.write_all(b"x").unwrap();
        assert!(!gate.wait(d.as_raw_fd()));
        assert_eq!(gate.counts.off, 1);
    }

    #[test]
    fn a_lone_wait_in_vain_turns_spinning_off_briefly_not_for_the_whole_back_off() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut gate = SpinGate::new(Duration::from_micros(50), None, PSI_MAX).unwrap();
        assert!(!gate.wait(b.as_raw_fd()));
        // Off just after it...
        let (mut c, d) = UnixStream::pair().unwrap();
        c.write_all(b"x").unwrap();
        assert!(!gate.wait(d.as_raw_fd()));
        assert_eq!(gate.counts.off, 1);
        // ...and spinning again well before OFF_VAIN (a flat 20 ms made each late reply of
        // a quiet VM ~115 QD1 requests at the sleeping latency).
        std::thread::sleep(OFF_VAIN_FIRST * 3);
        assert!(
            gate.wait(d.as_raw_fd()),
            "still off {:?} after a lone wait in vain",
            OFF_VAIN_FIRST * 3
        );
        assert_eq!(gate.counts.paid, 1);
    }

    #[test]
    fn waits_in_vain_in_a_row_back_off_longer_until_enough_have_paid() {
        assert_eq!(off_after_vain(0), OFF_VAIN_FIRST);
        assert_eq!(off_after_vain(1), OFF_VAIN_FIRST * 2);
        assert_eq!(off_after_vain(40), OFF_VAIN);
        let (_a, b) = UnixStream::pair().unwrap();
        let (mut c, d) = UnixStream::pair().unwrap();
        c.write_all(b"x").unwrap();
        let mut gate = SpinGate::new(Duration::from_micros(20), None, PSI_MAX).unwrap();
        // A guest whose next request mostly comes after the budget: vain, a few paid, vain...
        for streak in 0..3 {
            gate.off_until = None;
            assert!(!gate.wait(b.as_raw_fd()));
            assert_eq!(gate.vain_streak, streak + 1);
            gate.off_until = None;
            assert!(gate.wait(d.as_raw_fd()));
        }
        // ...until PAID_TO_FORGIVE waits in a row pay: then a wait in vain is lone again.
        for _ in 0..PAID_TO_FORGIVE {
            assert!(gate.wait(d.as_raw_fd()));
        }
        assert_eq!(gate.vain_streak, 0);
    }

    #[test]
    fn cpu_pressure_over_the_limit_turns_spinning_off() {
        let dir = std::env::temp_dir().join(format!("tvb-spin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cpu");
        std::fs::write(
            &path,
            "some avg10=55.10 avg60=3.00 avg300=1.00 total=9\n\
                               full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        )
        .unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let mut gate = SpinGate::new(Duration::from_micros(100), Some(File::open(&path).unwrap()), PSI_MAX).unwrap();
        assert!(!gate.wait(b.as_raw_fd()), "spun at 55 % CPU pressure");
        assert_eq!(gate.counts.off, 1);
        std::fs::write(&path, "some avg10=xyz\n").unwrap();
        gate.psi_read_at = None;
        assert!(!gate.wait(b.as_raw_fd()), "spun with the pressure unreadable");
        std::fs::write(&path, "some avg10=2.50 avg60=3.00 avg300=1.00 total=9\n").unwrap();
        gate.psi_read_at = None;
        assert!(gate.wait(b.as_raw_fd()), "a quiet machine: the bytes there are seen");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cpu_is_given_up_between_two_looks_at_the_socket() {
        // What another task does when the spinning thread yields: here, send the bytes.
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut gate = SpinGate::new(BUDGET_MAX, None, PSI_MAX).unwrap();
        let mut pauses = 0;
        let ready = gate.wait_with(b.as_raw_fd(), || {
            pauses += 1;
            a.write_all(b"x").unwrap();
        });
        assert!(ready, "the bytes sent while the CPU was given up were not seen");
        assert_eq!(pauses, 1);
        assert_eq!((gate.counts.paid, gate.counts.vain), (1, 0));
    }

    #[test]
    fn a_budget_over_the_maximum_is_refused() {
        let err = SpinGate::new(BUDGET_MAX + Duration::from_micros(1), None, PSI_MAX)
            .err()
            .unwrap();
        assert!(err.contains("over the 500 µs allowed"), "{err}");
        assert!(SpinGate::new(BUDGET_MAX, None, PSI_MAX).is_ok());
    }

    #[test]
    fn a_zero_budget_never_spins() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let mut gate = SpinGate::new(Duration::ZERO, None, PSI_MAX).unwrap();
        assert!(!gate.wait(b.as_raw_fd()));
        assert_eq!(gate.counts.off, 1);
    }

    #[test]
    fn the_pressure_line_is_parsed() {
        assert_eq!(
            some_avg10(b"some avg10=97.86 avg60=55.02 avg300=16.18 total=57127612\n"),
            Some(97.86)
        );
        assert_eq!(some_avg10(b"full avg10=1.00\n"), None);
        assert_eq!(some_avg10(b""), None);
    }
}
