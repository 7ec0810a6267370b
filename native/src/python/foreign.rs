//! The crate's one `unsafe` module: what Python hands over (buffers, file descriptors)
//! made into Rust references, each with the argument that makes it sound.
//!
//! A socket's descriptor taken over from Python (`detach_socket`), a file's duplicated
//! (`dup_file`), sendfile(2) from a file to a socket (`sendfile`), and buffers lent for
//! the NBD client's requests (`LentBuffer`: a READ's target, a WRITE's payload).
//!
//! A Python buffer's bytes as `&[u8]` (`with_bytes`): the NBD server parses requests
//! where the transport received them, in the connection's receive buffer.
//!
//! A writable Python buffer's bytes as `&mut [u8]` (`with_bytes_mut`): decrypting a
//! read in place, in the buffer its ciphertext was received into, saves the copy into
//! a new `bytes` object and that object's zero fill. Python hands us
//! the memory through the buffer protocol, which promises nothing about exclusive
//! access, so what makes the `&mut [u8]` sound is argued here, once, and the work on
//! it must keep to what the argument allows.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::nbd_client::ReadTarget;

/// Runs `work` on the bytes of `buf` with the GIL held throughout, never released.
///
/// Refused (ValueError) unless `buf` is writable and C-contiguous. `work` is `Send`,
/// so it cannot hold the GIL token (`Python<'_>` and `Bound` are not `Send`) and
/// cannot run Python code or release the GIL; it must only compute on the slice.
pub(crate) fn with_bytes_mut<R>(
    py: Python<'_>,
    buf: &PyBuffer<u8>,
    work: impl FnOnce(&mut [u8]) -> R + Send,
) -> PyResult<R> {
    if buf.readonly() {
        return Err(PyValueError::new_err(
            "the buffer is read-only; opening in place needs a writable one (a bytearray)",
        ));
    }
    if buf.len_bytes() == 0 {
        return Ok(work(&mut []));
    }
    let Some(slice) = buf.as_slice_ptr() else {
        return Err(PyValueError::new_err(
            "the buffer is not contiguous; opening in place needs one run of bytes",
        ));
    };
    let _gil_held = py; // the argument below depends on holding it for the whole call
                        // SAFETY: `slice` is `buf`'s memory, `len` items of `u8`:
                        // - valid and pinned: `buf` holds a buffer export of its object until it is dropped,
                        //   after this call; an exporter keeps the memory alive and in place while exported
                        //   (a bytearray refuses to resize);
                        // - `u8` and initialised: PyBuffer<u8> checked the item format and size; any byte
                        //   pattern is a valid `u8`, and exported memory is readable as bytes;
                        // - writable: checked above (`readonly` is false), and C-contiguous (`as_slice_ptr`
                        //   returns None otherwise), so it is one run of `len` bytes from `buf_ptr`;
                        // - not aliased while `work` runs: we hold the GIL and never release it, and `work`
                        //   (Send, no GIL token) runs no Python code, so no Python code can touch the memory.
                        //   What remains is native code that works on a buffer with the GIL released
                        //   (socket I/O, our own codec on its threads): trustvbd never hands a buffer it
                        //   opens in place to such code at the same time, which is the caller's contract,
                        //   as for any buffer-protocol consumer. No other `&`/`&mut` to this memory exists
                        //   in Rust either: callers copy every other argument out before calling this.
    let bytes = unsafe { &mut *slice.as_ptr() };
    Ok(work(bytes))
}

/// How many references `obj` has (the read plane's pool hands a buffer out again only
/// when it holds the last one).
pub(crate) fn refcount(obj: &Bound<'_, PyAny>) -> isize {
    // SAFETY: `obj` is a `Bound`: a valid, live object (we hold a reference to it) with the
    // GIL held for the borrow's life, which is all Py_REFCNT needs to read its count.
    unsafe { pyo3::ffi::Py_REFCNT(obj.as_ptr()) }
}

/// A socket's file descriptor, owned: taken from a Python `socket.socket` by calling its
/// `detach()`, which hands the descriptor over and leaves the object closed.
pub(crate) fn detach_socket(sock: &Bound<'_, PyAny>) -> PyResult<File> {
    let fd: RawFd = sock.call_method0("detach")?.extract()?;
    if fd < 0 {
        return Err(PyValueError::new_err(
            "the socket is closed: there is no descriptor to take over",
        ));
    }
    // SAFETY: `socket.detach()` returned `fd`, an open descriptor the socket object owned,
    // and gave up that ownership: the object now reads as closed (fileno() is -1) and will
    // never close or use `fd` again, so nothing else in this process owns it. (A `detach`
    // that is not `socket.socket`'s could lie; trustvbd only passes real sockets, and
    // `NbdClientEngine`'s only caller is `trustvbd.nbd.client`.) The `File` we make is
    // its one owner and closes it when dropped; reads and writes on it are the socket's.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A descriptor of our own for the open file behind `fd` (a duplicate, closed when the
/// `File` is dropped): the driver's NBD session pwrites into it (python/nbd_server.rs).
pub(crate) fn dup_file(py: Python<'_>, fd: RawFd) -> PyResult<File> {
    if fd < 0 {
        return Err(PyValueError::new_err(format!(
            "file descriptor {fd} is not a descriptor: the file is closed"
        )));
    }
    let _gil_held = py; // the argument below depends on holding it for the whole call
                        // SAFETY: `borrow_raw` needs `fd` open for the borrow's life, which ends with this
                        // statement (it is used once, to duplicate it). The caller passes a descriptor the
                        // object it holds owns and keeps open (`FileBackend.write_fd()`); we hold the GIL
                        // throughout, so no Python code can close it meanwhile, and no native code of
                        // trustvbd closes another object's descriptor. A closed number fails the duplicate
                        // with EBADF; nothing here reads or writes memory through it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned()?;
    Ok(File::from(owned))
}

/// sendfile(2): up to `count` bytes of `file` from `offset` to `sock`, the file's own
/// offset untouched; the count sent (0 at the file's end). The driver's big READ replies
/// (python/file_serve.rs) go from the page cache to the socket without a copy in between.
pub(crate) fn sendfile(sock: &File, file: &File, offset: u64, count: usize) -> std::io::Result<usize> {
    let mut at = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: both descriptors are open for the call (borrowed from `File`s the caller
    // holds); `&mut at` is a valid, aligned off_t that lives across the call, which the
    // kernel reads and advances and keeps no pointer to afterwards. sendfile touches no
    // other memory of this process.
    let sent = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut at, count) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Waits until `fd` has bytes to read (or an end, an error): poll(2) for POLLIN, no
/// timeout; an interrupted wait returns too (the caller's read then sees what there is).
/// The driver's serve loop (python/file_serve.rs) sleeps here rather than in its read.
pub(crate) fn wait_readable(fd: RawFd) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, aligned pollfd that lives across the call (nfds 1); the
    // kernel writes only its `revents` and keeps no pointer to it. poll touches nothing
    // through the descriptor (a closed number is answered POLLNVAL, and the read after
    // it fails with EBADF).
    let n = unsafe { libc::poll(&mut pfd, 1, -1) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

/// Whether `fd` has bytes to read (or an end, an error) now: poll(2) that does not wait.
/// The bounded busy-wait (python/spin.rs) asks it in a loop. A number that is no open
/// descriptor reads as ready (POLLNVAL): the caller then goes on to its real read.
pub(crate) fn poll_ready(fd: RawFd) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, aligned pollfd that lives across the call (nfds 1); the
    // kernel writes only its `revents` and keeps no pointer to it. poll touches nothing
    // through the descriptor (a closed number is answered POLLNVAL), and a timeout of 0
    // never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// The calling thread's involuntary context switches so far (getrusage RUSAGE_THREAD):
/// a count that grows when the scheduler took the CPU from it for another task.
pub(crate) fn involuntary_switches() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a zeroed (so initialised) rusage the call fills in; it lives
    // across the call and the kernel keeps no pointer to it. RUSAGE_THREAD is Linux's.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0; // cannot fail with these arguments; a 0 only hides a preemption
    }
    // SAFETY: zeroed, then filled in by the kernel: every field is an integer.
    let usage = unsafe { usage.assume_init() };
    u64::try_from(usage.ru_nivcsw).unwrap_or(0)
}

/// A Python buffer lent for a request: a READ's target (written in place, `writable`)
/// or a WRITE's payload (read while it is sent). Holding it holds the buffer export,
/// so the memory stays alive and in place (a bytearray refuses to resize meanwhile).
///
/// Only `NbdClientEngine` (python/nbd_client.rs) holds these, as its requests' payloads
/// and read targets (a native read's target holds one: python/read_plane.rs, which makes
/// it and hands it to the engine at once), and it uses them only inside its own and the
/// read plane's and server session's `#[pymethods]`, which run with the GIL held (they
/// borrow their objects through Python) and never release it: every use below holds
/// the GIL.
pub(crate) struct LentBuffer(PyBuffer<u8>);

impl LentBuffer {
    /// Refused (ValueError) unless `obj` is C-contiguous, and writable if `writable`.
    pub(crate) fn new(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let buf = PyBuffer::<u8>::get(obj)?;
        if writable && buf.readonly() {
            return Err(PyValueError::new_err(
                "a READ's buffer must be writable (a bytearray or a view of one)",
            ));
        }
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "the buffer is not contiguous; it must be one run of bytes",
            ));
        }
        Ok(Self(buf))
    }

    /// The buffer's bytes, read with the GIL held (see above).
    pub(crate) fn bytes(&self) -> &[u8] {
        let len = self.0.len_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: `buf_ptr` is the start of `len` initialised bytes (PyBuffer<u8> checked
        // the item format and size; C-contiguous checked in `new`), valid and pinned while
        // `self.0` holds the export, which outlives the returned borrow of `self`. Python
        // code can change them only while holding the GIL, which our caller holds for the
        // borrow's whole life; native code that works on a buffer with the GIL released is
        // never handed a buffer trustvbd has lent here (the caller's contract, as for any
        // buffer-protocol consumer). The GIL is held for the borrow's life: `self` lives
        // in the engine, which uses it only inside its Python methods, never releasing
        // the GIL (no `py.detach` in python/nbd_client.rs).
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, len) }
    }
}

impl ReadTarget for LentBuffer {
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.0.len_bytes();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: as `bytes` above, and: the export is writable (`readonly` is false,
        // checked in `new` for every target), and not aliased while the borrow lives:
        // `self` lives in the engine, which calls this only inside its own Python
        // methods, holding the GIL, never releasing it and running no Python code meanwhile, so no Python code touches
        // the memory; `&mut self` is the one Rust path to it, and the engine makes no
        // other `&`/`&mut` from the same object's export at the same time (a READ's
        // target is a different request's than any payload being sent, and a caller
        // that passed one buffer for both gets what a socket would give it: no UB,
        // since both borrows are never live at once: sends and receives are separate
        // method calls).
        unsafe { std::slice::from_raw_parts_mut(self.0.buf_ptr() as *mut u8, len) }
    }
}

/// A new `bytes` object holding a copy of `src`'s bytes, which `work` then changes in
/// place before the object is handed to anyone: the seal of a write (copy the plaintext,
/// encrypt it where it lies) without `PyBytes::new_with`'s zero fill of the whole payload
/// first (a memset of every sealed write's size; bench/README.md has its cost). `src` is
/// released once copied; `work` may release the GIL.
pub(crate) fn bytes_copied_then<'py, R>(
    py: Python<'py>,
    src: PyBuffer<u8>,
    work: impl FnOnce(&mut [u8]) -> R,
) -> PyResult<(Bound<'py, PyBytes>, R)> {
    let len = src.len_bytes();
    if len == 0 {
        return Ok((PyBytes::new(py, &[]), work(&mut [])));
    }
    let Some(from) = src.as_slice_ptr() else {
        // Scattered (never a guest's payload): gathered into a zero-filled object first.
        let mut result = None;
        let bytes = PyBytes::new_with(py, len, |data| {
            src.copy_to_slice(py, data)?;
            drop(src);
            result = Some(work(data));
            Ok(())
        })?;
        return Ok((bytes, result.expect("set by new_with")));
    };
    let size = isize::try_from(len).map_err(|_| PyValueError::new_err("the buffer is too large"))?;
    let fresh = pyo3::ffi::PyBytes_FromStringAndSize;
    // SAFETY: PyBytes_FromStringAndSize(NULL, size) makes a new object with `size` bytes
    // of storage not yet written (a null string is never one of CPython's shared cached
    // objects, which exist only for sizes 0, taken above, and 1 with a string); it
    // returns a new reference, or null with an exception set, which `from_owned_ptr_or_err`
    // turns into the PyErr.
    let obj = unsafe { Bound::from_owned_ptr_or_err(py, fresh(std::ptr::null(), size))? };
    let bytes = obj.cast_into::<PyBytes>()?;
    // SAFETY: the object's storage (PyBytes_AsString: its inline buffer of `len` bytes)
    // as `&mut [u8]`, initialised by the copy before any read, for this function only.
    // - The copy: `from` is `src`'s memory, `len` bytes of C-contiguous `u8` (checked by
    //   PyBuffer<u8> and `as_slice_ptr`), pinned and alive while `src` holds its export
    //   (dropped right after), not changed meanwhile (we hold the GIL; no native code of
    //   trustvbd writes a buffer it also seals), and it cannot overlap a new object.
    // - Exclusive: the object was made just now and its one reference is `bytes`, held
    //   here and handed to no one before `work` returns, so no Python code or other thread
    //   can reach it, even while `work` releases the GIL. Nothing has hashed it (its cached
    //   hash is still unset), so changing it breaks no invariant of `bytes`: CPython's own
    //   bytes builders (_PyBytes_Resize) fill a fresh object so.
    let data = unsafe {
        let at = pyo3::ffi::PyBytes_AsString(bytes.as_ptr()).cast::<u8>();
        std::ptr::copy_nonoverlapping(from.as_ptr().cast::<u8>(), at, len);
        std::slice::from_raw_parts_mut(at, len)
    };
    drop(src); // the export ends: its owner may resize it while `work` runs without the GIL
    let result = work(data);
    Ok((bytes, result))
}

/// Runs `work` on the bytes of `buf` (read only) with the GIL held throughout.
///
/// Refused (ValueError) unless `buf` is C-contiguous. As for `with_bytes_mut`, `work`
/// is `Send`: it cannot run Python code or release the GIL, only compute on the slice.
pub(crate) fn with_bytes<R>(py: Python<'_>, buf: &PyBuffer<u8>, work: impl FnOnce(&[u8]) -> R + Send) -> PyResult<R> {
    if buf.len_bytes() == 0 {
        return Ok(work(&[]));
    }
    let Some(slice) = buf.as_slice_ptr() else {
        return Err(PyValueError::new_err(
            "the buffer is not contiguous; parsing needs one run of bytes",
        ));
    };
    let _gil_held = py; // the argument below depends on holding it for the whole call
                        // SAFETY: `slice` is `buf`'s memory, `len` items of `u8`:
                        // - valid and pinned: `buf` holds a buffer export of its object until it is dropped,
                        //   after this call; an exporter keeps the memory alive and in place while exported;
                        // - `u8` and initialised: PyBuffer<u8> checked the item format and size; any byte
                        //   pattern is a valid `u8`; C-contiguous (`as_slice_ptr` returns None otherwise), so
                        //   it is one run of `len` bytes;
                        // - not written while `work` runs: we hold the GIL and never release it, and `work`
                        //   (Send, no GIL token) runs no Python code, so no Python code writes the memory.
                        //   What remains is native code that writes a buffer with the GIL released: the
                        //   only writer of what trustvbd hands here (a connection's receive buffer) is the
                        //   event loop's socket read, which runs on this same thread between callbacks, never
                        //   during one. No `&mut` to this memory exists in Rust either.
    let bytes = unsafe { &*slice.as_ptr() };
    Ok(work(bytes))
}

/// A ring of ciphertext the encryption domain shares with this driver (docs/driver-ring.md):
/// a memfd mapped read-only and shared, for one connection, unmapped when dropped.
pub(crate) struct RingMap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: (Send) the mapping is owned by this value alone; nothing else unmaps it.
unsafe impl Send for RingMap {}

impl RingMap {
    /// Maps `fd` (`len` bytes) read-only. Refused unless it is open read-only, is `len`
    /// bytes long and sealed against shrinking and growing: a shrunk file would fault
    /// (SIGBUS) on a read of the mapping past its new end.
    pub(crate) fn new(py: Python<'_>, fd: RawFd, len: usize) -> PyResult<Self> {
        let file = dup_file(py, fd)?;
        let raw = file.as_raw_fd();
        let refuse = |why: String| PyValueError::new_err(format!("the ring (descriptor {fd}) {why}"));
        // SAFETY: fcntl on a descriptor we own (`file`), no memory passed.
        let mode = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if mode < 0 || mode & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(refuse("is not open read-only".into()));
        }
        // SAFETY: as above.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        let needed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals < 0 || seals & needed != needed {
            return Err(refuse(
                "is not sealed against resizing (F_SEAL_SHRINK, F_SEAL_GROW)".into(),
            ));
        }
        let size = file.metadata()?.len();
        if len == 0 || size != len as u64 {
            return Err(refuse(format!("is {size} bytes, not the {len} agreed")));
        }
        // SAFETY: a new mapping (no address asked for) of a descriptor we own; the result
        // is checked below and owned by the value returned, which unmaps it once.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, raw, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Self { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Runs `work` on `len` bytes of the ring at `at` (inside it: checked by the caller,
    /// asserted here). `work` must only hand the bytes to the kernel (pwrite): the
    /// encryption domain rewrites the ring's slots, so what Rust read of them could
    /// change under it; the kernel copies what is there when it copies.
    pub(crate) fn with_slot<R>(&self, at: usize, len: usize, work: impl FnOnce(&[u8]) -> R) -> R {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.len),
            "a slot inside the ring"
        );
        // SAFETY: `at..at + len` is inside the mapping (asserted), which stays mapped for
        // `self`'s life, longer than the borrow; it is mapped readable. Another process
        // may write these bytes meanwhile: `work` only passes them to pwrite (see above).
        let bytes = unsafe { std::slice::from_raw_parts((self.ptr as *const u8).add(at), len) };
        work(bytes)
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes, unmapped once, here; no borrow outlives it.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::types::{PyByteArray, PyBytes, PyDict};

    /// The test binary embeds the interpreter (the extension itself never does).
    fn attach(test: impl for<'py> FnOnce(Python<'py>)) {
        Python::initialize();
        Python::attach(test);
    }

    fn buffer<'py>(py: Python<'py>, expr: &str) -> PyResult<PyBuffer<u8>> {
        let locals = PyDict::new(py);
        let obj = py.eval(&std::ffi::CString::new(expr).unwrap(), None, Some(&locals))?;
        PyBuffer::get(&obj)
    }

    #[test]
    fn a_bytearray_is_changed_where_it_is() {
        attach(|py| {
            let array = PyByteArray::new(py, b"abcd");
            let buf = PyBuffer::<u8>::get(array.as_any()).unwrap();
            let seen = with_bytes_mut(py, &buf, |bytes| {
                bytes.reverse();
                bytes.len()
            })
            .unwrap();
            drop(buf);
            assert_eq!(seen, 4);
            assert_eq!(array.to_vec(), b"dcba");
        });
    }

    #[test]
    fn read_only_and_scattered_buffers_are_refused_untouched() {
        attach(|py| {
            let bytes = PyBytes::new(py, b"abcd");
            let buf = PyBuffer::<u8>::get(bytes.as_any()).unwrap();
            let err = with_bytes_mut(py, &buf, |b| b.fill(0)).unwrap_err();
            assert!(err.to_string().contains("read-only"), "{err}");
            assert_eq!(bytes.as_bytes(), b"abcd");
            let strided = buffer(py, "memoryview(bytearray(b'abcdef'))[::2]").unwrap();
            let err = with_bytes_mut(py, &strided, |b| b.fill(0)).unwrap_err();
            assert!(err.to_string().contains("not contiguous"), "{err}");
        });
    }

    #[test]
    fn an_empty_buffer_is_an_empty_slice() {
        attach(|py| {
            let empty = buffer(py, "bytearray()").unwrap();
            assert_eq!(with_bytes_mut(py, &empty, |b| b.len()).unwrap(), 0);
            let tail = buffer(py, "memoryview(bytearray(8))[8:]").unwrap();
            assert_eq!(with_bytes_mut(py, &tail, |b| b.len()).unwrap(), 0);
        });
    }

    #[test]
    fn bytes_are_read_where_they_are() {
        attach(|py| {
            let view = buffer(py, "memoryview(bytearray(b'abcdef'))[1:4]").unwrap();
            assert_eq!(with_bytes(py, &view, |b| b.to_vec()).unwrap(), b"bcd");
            let empty = buffer(py, "b''").unwrap();
            assert_eq!(with_bytes(py, &empty, |b| b.len()).unwrap(), 0);
            let strided = buffer(py, "memoryview(b'abcdef')[::2]").unwrap();
            let err = with_bytes(py, &strided, |b| b.len()).unwrap_err();
            assert!(err.to_string().contains("not contiguous"), "{err}");
        });
    }

    #[test]
    fn a_slice_of_a_view_is_exactly_that_slice() {
        attach(|py| {
            let locals = PyDict::new(py);
            py.run(c"a = bytearray(8)\nv = memoryview(a)[2:5]", None, Some(&locals))
                .unwrap();
            let view = locals.get_item("v").unwrap().unwrap();
            let buf = PyBuffer::<u8>::get(&view).unwrap();
            with_bytes_mut(py, &buf, |b| b.fill(7)).unwrap();
            drop(buf);
            let a = locals.get_item("a").unwrap().unwrap();
            assert_eq!(a.extract::<Vec<u8>>().unwrap(), vec![0, 0, 7, 7, 7, 0, 0, 0]);
        });
    }

    #[test]
    fn a_detached_socket_is_ours_and_the_python_object_is_closed() {
        use std::io::{Read, Write};
        attach(|py| {
            let locals = PyDict::new(py);
            py.run(c"import socket\na, b = socket.socketpair()", None, Some(&locals))
                .unwrap();
            let a = locals.get_item("a").unwrap().unwrap();
            let mut file = detach_socket(&a).unwrap();
            assert_eq!(a.call_method0("fileno").unwrap().extract::<i64>().unwrap(), -1);
            file.write_all(b"ping").unwrap();
            py.run(c"assert b.recv(4) == b'ping'\nb.sendall(b'pong')", None, Some(&locals))
                .unwrap();
            let mut got = [0u8; 4];
            file.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"pong");
            drop(file); // closes the descriptor: the peer sees the end
            py.run(c"assert b.recv(1) == b''\nb.close()", None, Some(&locals))
                .unwrap();
            let err = detach_socket(&a).unwrap_err(); // already detached: -1
            assert!(err.to_string().contains("closed"), "{err}");
        });
    }

    #[test]
    fn lent_buffers_are_the_objects_bytes_and_targets_must_be_writable_runs() {
        attach(|py| {
            let locals = PyDict::new(py);
            py.run(c"a = bytearray(b'abcdef')\nv = memoryview(a)[1:4]", None, Some(&locals))
                .unwrap();
            let view = locals.get_item("v").unwrap().unwrap();
            let mut target = LentBuffer::new(&view, true).unwrap();
            assert_eq!(target.bytes(), b"bcd");
            target.bytes_mut().copy_from_slice(b"XYZ");
            drop(target);
            let a = locals.get_item("a").unwrap().unwrap();
            assert_eq!(a.extract::<Vec<u8>>().unwrap(), b"aXYZef");
            let bytes = PyBytes::new(py, b"abc");
            assert_eq!(LentBuffer::new(bytes.as_any(), false).unwrap().bytes(), b"abc");
            let err = LentBuffer::new(bytes.as_any(), true).err().unwrap();
            assert!(err.to_string().contains("writable"), "{err}");
            let strided = py.eval(c"memoryview(bytearray(b'abcdef'))[::2]", None, None).unwrap();
            let err = LentBuffer::new(&strided, false).err().unwrap();
            assert!(err.to_string().contains("not contiguous"), "{err}");
            let empty = PyByteArray::new(py, b"");
            assert!(LentBuffer::new(empty.as_any(), true).unwrap().bytes_mut().is_empty());
        });
    }
}
