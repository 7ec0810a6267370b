//! dataplane-ceiling GUEST_SOCKET LOG_FILE SIZE DRIVER_SOCKET...
//!
//! Serves one NBD export of SIZE bytes on GUEST_SOCKET (one client at a time, fixed newstyle,
//! simple replies). Writes are sealed block by block (AES-256-GCM, a fresh version per
//! block, the tag and version kept in memory as trustvbd's leaf table would), an intent
//! record is appended to LOG_FILE per write, and the ciphertext goes to every driver; the
//! reply waits for all. Reads go round robin to one driver and are opened (verified)
//! before the reply. FLUSH goes to every driver, then fdatasync of the log.
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

const BS: usize = 4096;
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn read_u32(s: &mut impl Read) -> Res<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> Res<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(s: &mut UnixStream, opt: u32, typ: u32, data: &[u8]) -> Res<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)?;
    Ok(())
}

/// The guest side of the handshake; returns when transmission starts.
fn serve_handshake(s: &mut UnixStream, size: u64) -> Res<()> {
    let mut greet = Vec::new();
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&3u16.to_be_bytes()); // fixed newstyle, no zeroes
    s.write_all(&greet)?;
    let client_flags = read_u32(s)?;
    let tflags: u16 = 1 | 4; // has flags, send flush
    loop {
        if read_u64(s)? != IHAVEOPT {
            return Err("bad option magic".into());
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)? as usize;
        if len > 4096 {
            return Err("option too long".into());
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match opt {
            1 => {
                // EXPORT_NAME
                let mut out = size.to_be_bytes().to_vec();
                out.extend_from_slice(&tflags.to_be_bytes());
                if client_flags & 2 == 0 {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(());
            }
            6 | 7 => {
                // INFO, GO
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                option_reply(s, opt, 3, &info)?;
                option_reply(s, opt, 1, &[])?;
                if opt == 7 {
                    return Ok(());
                }
            }
            2 => return Err("client aborted".into()),
            _ => option_reply(s, opt, (1 << 31) | 1, &[])?,
        }
    }
}

/// The client side of the handshake with a driver: OPT_GO on the default export.
fn client_handshake(s: &mut UnixStream) -> Res<u64> {
    if read_u64(s)? != NBDMAGIC || read_u64(s)? != IHAVEOPT {
        return Err("driver is not a newstyle NBD server".into());
    }
    let mut f = [0u8; 2];
    s.read_exact(&mut f)?;
    s.write_all(&3u32.to_be_bytes())?;
    let mut go = IHAVEOPT.to_be_bytes().to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // empty name, no info requests
    s.write_all(&go)?;
    let mut size = 0;
    loop {
        if read_u64(s)? != REPLY_MAGIC {
            return Err("bad option reply magic".into());
        }
        let _opt = read_u32(s)?;
        let typ = read_u32(s)?;
        let len = read_u32(s)? as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match typ {
            1 => return Ok(size),
            3 if len >= 12 && data[..2] == [0, 0] => {
                size = u64::from_be_bytes(data[2..10].try_into()?);
            }
            3 => {}
            _ => return Err(format!("driver refused GO: {typ:#x}").into()),
        }
    }
}

enum Kind {
    Read { guest_cookie: u64, offset: u64, len: usize },
    Counted { guest_cookie: u64, left: usize, error: u32, then_sync: bool },
}

/// What outlives one client: the key and, per block, its version and tag (the leaf table).
struct Table {
    key: LessSafeKey,
    versions: Vec<AtomicU64>,
    tags: Mutex<Vec<[u8; 16]>>,
    next_version: AtomicU64,
}

struct Shared {
    t: Arc<Table>,
    pending: Mutex<HashMap<u64, Kind>>,
    next_cookie: AtomicU64,
    guest_out: Mutex<UnixStream>,
    drivers: Vec<Mutex<UnixStream>>,
    round_robin: AtomicUsize,
    log: File,
}

fn nonce(version: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&version.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

fn reply_guest(sh: &Shared, cookie: u64, error: u32, data: &[u8]) -> Res<()> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    let mut out = sh.guest_out.lock().unwrap();
    if data.is_empty() {
        out.write_all(&h)?;
    } else {
        let bufs = [IoSlice::new(&h), IoSlice::new(data)];
        let n = out.write_vectored(&bufs)?;
        if n < 16 + data.len() {
            let rest: Vec<u8> = h.iter().chain(data.iter()).skip(n).copied().collect();
            out.write_all(&rest)?;
        }
    }
    Ok(())
}

/// Reads one driver's replies and finishes the guest requests they answer.
fn driver_replies(sh: Arc<Shared>, mut s: UnixStream) -> Res<()> {
    let mut buf = vec![0u8; 32 << 20];
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let error = u32::from_be_bytes(h[4..8].try_into()?);
        let cookie = u64::from_be_bytes(h[8..16].try_into()?);
        let mut pending = sh.pending.lock().unwrap();
        let kind = pending.remove(&cookie).ok_or("reply to a cookie never sent")?;
        match kind {
            Kind::Read { guest_cookie, offset, len } => {
                drop(pending);
                let data = &mut buf[..len];
                if error == 0 {
                    s.read_exact(data)?;
                }
                let mut err = error;
                let first = (offset / BS as u64) as usize;
                {
                    let tags = sh.t.tags.lock().unwrap();
                    for (i, block) in data.chunks_exact_mut(BS).enumerate() {
                        let b = first + i;
                        let v = sh.t.versions[b].load(Ordering::Acquire);
                        if v == 0 {
                            block.fill(0);
                            continue;
                        }
                        let tag = ring::aead::Tag::from(tags[b]);
                        let aad = (b as u64).to_be_bytes();
                        if sh.t.key.open_in_place_separate_tag(nonce(v), Aad::from(aad), tag, block, 0..).is_err() {
                            err = 5;
                        }
                    }
                }
                reply_guest(&sh, guest_cookie, err, if err == 0 { data } else { &[] })?;
            }
            Kind::Counted { guest_cookie, left, error: e, then_sync } => {
                let e = if error != 0 { error } else { e };
                if left > 1 {
                    pending.insert(cookie, Kind::Counted { guest_cookie, left: left - 1, error: e, then_sync });
                    continue;
                }
                drop(pending);
                if then_sync {
                    sh.log.sync_data()?;
                }
                reply_guest(&sh, guest_cookie, e, &[])?;
            }
        }
    }
}

fn serve_guest(sh: Arc<Shared>, mut g: UnixStream, size: u64) -> Res<()> {
    let mut payload = vec![0u8; 32 << 20];
    let mut log_at = 0u64;
    loop {
        let mut h = [0u8; 28];
        g.read_exact(&mut h)?;
        if u32::from_be_bytes(h[..4].try_into()?) != REQUEST_MAGIC {
            return Err("bad request magic".into());
        }
        let cmd = u16::from_be_bytes(h[6..8].try_into()?);
        let cookie = u64::from_be_bytes(h[8..16].try_into()?);
        let offset = u64::from_be_bytes(h[16..24].try_into()?);
        let len = u32::from_be_bytes(h[24..28].try_into()?) as usize;
        let aligned = offset.is_multiple_of(BS as u64) && len.is_multiple_of(BS) && len <= payload.len();
        if (cmd == CMD_READ || cmd == CMD_WRITE) && (!aligned || offset + len as u64 > size) {
            if cmd == CMD_WRITE {
                return Err("unaligned write: not in this sketch".into());
            }
            reply_guest(&sh, cookie, 22, &[])?;
            continue;
        }
        let ours = sh.next_cookie.fetch_add(1, Ordering::Relaxed);
        match cmd {
            CMD_READ => {
                sh.pending.lock().unwrap().insert(ours, Kind::Read { guest_cookie: cookie, offset, len });
                let i = sh.round_robin.fetch_add(1, Ordering::Relaxed) % sh.drivers.len();
                sh.drivers[i].lock().unwrap().write_all(&request(CMD_READ, ours, offset, len as u32))?;
            }
            CMD_WRITE => {
                let data = &mut payload[..len];
                g.read_exact(data)?;
                let first = (offset / BS as u64) as usize;
                let count = len / BS;
                let base = sh.t.next_version.fetch_add(count as u64, Ordering::Relaxed);
                {
                    let mut tags = sh.t.tags.lock().unwrap();
                    for (i, block) in data.chunks_exact_mut(BS).enumerate() {
                        let b = first + i;
                        let v = base + i as u64;
                        let aad = (b as u64).to_be_bytes();
                        let tag = sh.t.key.seal_in_place_separate_tag(nonce(v), Aad::from(aad), block)
                            .map_err(|_| "seal failed")?;
                        tags[b].copy_from_slice(tag.as_ref());
                        sh.t.versions[b].store(v, Ordering::Release);
                    }
                }
                let mut record = [0u8; 32];
                record[..8].copy_from_slice(&offset.to_be_bytes());
                record[8..16].copy_from_slice(&(len as u64).to_be_bytes());
                record[16..24].copy_from_slice(&base.to_be_bytes());
                sh.log.write_all_at(&record, log_at)?;
                log_at = (log_at + 32) % (64 << 20);
                sh.pending.lock().unwrap().insert(
                    ours, Kind::Counted { guest_cookie: cookie, left: sh.drivers.len(), error: 0, then_sync: false });
                let hdr = request(CMD_WRITE, ours, offset, len as u32);
                for d in &sh.drivers {
                    let mut d = d.lock().unwrap();
                    d.write_all(&hdr)?;
                    d.write_all(data)?;
                }
            }
            CMD_FLUSH => {
                sh.pending.lock().unwrap().insert(
                    ours, Kind::Counted { guest_cookie: cookie, left: sh.drivers.len(), error: 0, then_sync: true });
                for d in &sh.drivers {
                    d.lock().unwrap().write_all(&request(CMD_FLUSH, ours, 0, 0))?;
                }
            }
            CMD_DISC => return Ok(()),
            _ => reply_guest(&sh, cookie, 22, &[])?,
        }
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        return Err("usage: dataplane-ceiling GUEST_SOCKET LOG_FILE SIZE DRIVER_SOCKET...".into());
    }
    let size: u64 = args[3].parse()?;
    let listener = UnixListener::bind(&args[1])?;
    let log = OpenOptions::new().create(true).write(true).truncate(true).open(&args[2])?;
    let mut key_bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut key_bytes)?;
    let blocks = (size / BS as u64) as usize;
    let table = Arc::new(Table {
        key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_bytes).map_err(|_| "key")?),
        versions: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
        tags: Mutex::new(vec![[0u8; 16]; blocks]),
        next_version: AtomicU64::new(1),
    });
    println!("ready");
    std::io::stdout().flush()?;
    for guest in listener.incoming() {
        let mut g = guest?;
        if let Err(e) = serve_handshake(&mut g, size) {
            eprintln!("handshake: {e}");
            continue;
        }
        let mut drivers = Vec::new();
        let mut readers = Vec::new();
        for path in &args[4..] {
            let mut d = UnixStream::connect(path)?;
            client_handshake(&mut d)?;
            readers.push(d.try_clone()?);
            drivers.push(Mutex::new(d));
        }
        let sh = Arc::new(Shared {
            t: Arc::clone(&table),
            pending: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            guest_out: Mutex::new(g.try_clone()?),
            drivers,
            round_robin: AtomicUsize::new(0),
            log: log.try_clone()?,
        });
        let threads: Vec<_> = readers.into_iter().map(|r| {
            let sh = Arc::clone(&sh);
            thread::spawn(move || driver_replies(sh, r))
        }).collect();
        // One client at a time (the sketch's limit): when it leaves, its driver links go too.
        if let Err(e) = serve_guest(Arc::clone(&sh), g, size) {
            eprintln!("guest: {e}");
        }
        for d in &sh.drivers {
            let _ = d.lock().unwrap().shutdown(std::net::Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
    }
    Ok(())
}
