//! `LogSync`: the intent log's group-commit fdatasync on a native thread that never takes
//! the GIL (`trustvbd.blocks.intent_log`).
//!
//! Python writes the records itself (on the event loop, a pwrite) and asks for a sync
//! (`ask`); the thread fdatasyncs the log's descriptor and says so by a byte on a pipe,
//! which the loop watches: its reader takes the outcome (`take`) and advances the durable
//! watermark. Before this the thread was a Python one: it took the GIL to wake, to write,
//! after the fdatasync and to wake the loop, each a hand-over the loop paid for too.
//!
//! The seam for tests: given a callable (a FileOps' fdatasync that records or fails
//! syncs), the thread calls it, with the GIL, instead of fdatasync; everything else is
//! the same.

use std::fs::File;
use std::io::{PipeReader, PipeWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use super::foreign::dup_file;

#[derive(Default)]
struct State {
    asked: bool,
    busy: bool,
    closed: bool,
    ended: bool, // the thread returned: nothing serves an ask any more
    outcome: Option<PyResult<()>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it is a bug that already aborted the sync: go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// LogSync(fd, name, sync=None)
///
/// Syncs the file open as `fd` (a duplicate of it) on a thread named "sync NAME", or
/// calls `sync()` there instead when given. One sync at a time: `ask`, then wait until
/// `fileno()` is readable and `take` its outcome.
#[pyclass(module = "trustvbd._native", name = "LogSync")]
pub(crate) struct LogSync {
    shared: Arc<Shared>,
    wake: PipeReader,
    thread: Option<JoinHandle<()>>,
}

fn run(shared: &Shared, file: &File, sync: Option<&Py<PyAny>>, wake: PipeWriter) {
    serve(shared, file, sync, wake);
    shared.lock().ended = true;
    shared.changed.notify_all();
}

fn serve(shared: &Shared, file: &File, sync: Option<&Py<PyAny>>, mut wake: PipeWriter) {
    loop {
        let mut state = shared.lock();
        while !state.asked && !state.closed {
            state = shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if !state.asked {
            return; // closed, nothing asked
        }
        state.asked = false;
        state.busy = true;
        drop(state);
        let outcome = match sync {
            Some(sync) => Python::attach(|py| sync.call0(py).map(drop)),
            None => file
                .sync_data()
                .map_err(|e| PyOSError::new_err((e.raw_os_error().unwrap_or(0), format!("fdatasync: {e}")))),
        };
        let mut state = shared.lock();
        state.outcome = Some(outcome);
        state.busy = false;
        let closed = state.closed;
        drop(state);
        shared.changed.notify_all();
        // The loop's reader takes the outcome. A full pipe cannot happen (one byte per
        // sync, one sync at a time); a closed reader means nobody waits any more.
        if wake.write_all(b"s").is_err() || closed {
            return;
        }
    }
}

#[pymethods]
impl LogSync {
    #[new]
    #[pyo3(signature = (fd, name, sync=None))]
    fn new(py: Python<'_>, fd: i32, name: &str, sync: Option<Py<PyAny>>) -> PyResult<Self> {
        let file = dup_file(py, fd)?;
        let (wake, writer) = std::io::pipe()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("sync {name}"))
            .spawn(move || run(&theirs, &file, sync.as_ref(), writer))?;
        Ok(Self {
            shared,
            wake,
            thread: Some(thread),
        })
    }

    /// The pipe's read end: readable once a sync asked for has ended (`take`).
    fn fileno(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    /// Start a sync. ValueError if one is under way or not taken yet, or once closed.
    fn ask(&self) -> PyResult<()> {
        let mut state = self.shared.lock();
        if state.closed || state.ended {
            return Err(PyValueError::new_err("the log's sync thread is closed"));
        }
        if state.asked || state.busy || state.outcome.is_some() {
            return Err(PyValueError::new_err("a sync is under way: take its outcome first"));
        }
        state.asked = true;
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// take() -> None, or the exception the sync failed with; ValueError if no sync
    /// ended. Call once `fileno()` is readable (or after `wait`).
    ///
    /// Once an outcome is taken it is returned, never an exception instead: whoever
    /// waits for the sync hears only through it. A pipe that cannot be read (its byte is
    /// written before the outcome could be taken, so that is a broken pipe) makes a sync
    /// that succeeded a failed one: its records are written and synced again next time.
    fn take(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let outcome = self.shared.lock().outcome.take();
        let Some(outcome) = outcome else {
            return Err(PyValueError::new_err("no sync has ended"));
        };
        let mut byte = [0u8; 1];
        let outcome = match self.wake.read_exact(&mut byte) {
            Ok(()) => outcome,
            Err(e) => {
                // Ended for the caller at once (`alive` false, no more asks): the thread
                // may not have met the broken pipe yet, and an ask taken now would never
                // be answered.
                self.shared.lock().ended = true;
                outcome.and(Err(PyOSError::new_err((
                    e.raw_os_error().unwrap_or(0),
                    format!("the log's sync thread's pipe: {e}"),
                ))))
            }
        };
        Ok(outcome.err().map(|e| e.into_value(py).into_any()))
    }

    /// Until no sync is asked for or under way (the GIL released meanwhile): a reset or
    /// a sync of the log's own must not run inside one.
    fn wait(&self, py: Python<'_>) {
        py.detach(|| {
            let mut state = self.shared.lock();
            while state.asked || state.busy {
                state = self.shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        });
    }

    /// Ends the thread once a sync under way ended (the GIL released meanwhile); its
    /// outcome may still be taken.
    fn close(&mut self, py: Python<'_>) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = py.detach(|| thread.join());
        }
    }

    /// Whether the thread is running and serves an `ask` (it ends when closed, or when
    /// it cannot wake the loop: its pipe broken).
    #[getter]
    fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished()) && !self.shared.lock().ended
    }
}

impl Drop for LogSync {
    /// Dropped unclosed: the thread ends by itself (it is not joined: it may be waiting
    /// for the GIL in a test's sync callable, which whoever drops this may hold).
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LogSync>()
}
