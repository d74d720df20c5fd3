//! The receiver threads: once a load client is subscribed, its socket moves
//! here, and a few threads (one `mio` poll each) read every client's frames,
//! check them ([`super::client::Listener`]) and heartbeat the sockets, until
//! told to stop; then each client's [`ClientOutcome`] goes back to the run.
//!
//! Why threads over sockets rather than a task per client: at issue 20's E4
//! rate (≈ 94,000 deliveries/s on 2 cores) a task wake-up, tungstenite's
//! buffering and a lock per delivery made the generator cost as much CPU as
//! the relay, and the machine saturated. Here one `epoll_wait` returns many
//! ready sockets, each read is parsed in place from the socket's own buffer,
//! and latencies go to the shared histograms once per poll.
//!
//! Invariants:
//! - a socket is read until a read comes back short (drained: the poll is
//!   edge-triggered, and data arriving later raises a new edge), so no frame
//!   waits for another event;
//! - a socket that closes, errs or sends a malformed frame is deregistered
//!   with a protocol error in its outcome; the others go on;
//! - every wait is bounded: a poll waits at most 50 ms (`TICK`), and `stop` joins
//!   the threads after they see the flag.
//!
//! Each read also takes the kernel's receive timestamp (`SO_TIMESTAMP`): when
//! the read's last bytes reached the client's socket, which on loopback is
//! when the relay wrote them. So commit→receive splits into the database's
//! and the relay's part (commit→socket) and the load generator's
//! (socket→parsed).

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use super::client::{ClientOutcome, Clock, Listener, Sample, Shared, HEARTBEAT};
use super::wire::{self, Masks, Opcode, Received, MAX_FRAME, READ_BUFFER};

/// The longest a poll waits (stop and heartbeat checks).
const TICK: Duration = Duration::from_millis(50);
/// The waker's token (client tokens are slab indices below it).
const WAKE: Token = Token(usize::MAX);

/// A subscribed client handed to a receiver thread.
#[derive(Debug)]
pub struct Handoff {
    /// The client's index in the run.
    pub index: u32,
    /// Its socket (non-blocking).
    pub stream: std::net::TcpStream,
    /// Bytes read during the join and not consumed yet.
    pub pending: Vec<u8>,
    /// Its mask keys.
    pub masks: Masks,
    /// What checks its frames.
    pub listener: Listener,
}

/// A receiver thread: it returns its clients' outcomes.
type Worker = JoinHandle<Vec<(u32, ClientOutcome)>>;

/// The running receiver threads.
#[derive(Debug)]
pub struct Receivers {
    lanes: Vec<(mpsc::Sender<Handoff>, Arc<Waker>)>,
    threads: std::sync::Mutex<Vec<Worker>>,
    stop: Arc<AtomicBool>,
}

impl Receivers {
    /// Starts `threads` receiver threads recording into `shared`.
    ///
    /// # Errors
    /// The poll or thread failing to start.
    pub fn start(threads: usize, shared: &Arc<Shared>) -> std::io::Result<Receivers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut lanes = Vec::new();
        let mut handles = Vec::new();
        for n in 0..threads.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let (tx, rx) = mpsc::channel();
            let (shared, stop) = (Arc::clone(shared), Arc::clone(&stop));
            handles.push(
                std::thread::Builder::new()
                    .name(format!("load-recv-{n}"))
                    .spawn(move || Thread { poll, rx, shared, stop, slots: Vec::new() }.run())?,
            );
            lanes.push((tx, waker));
        }
        Ok(Receivers { lanes, threads: std::sync::Mutex::new(handles), stop })
    }

    /// Hands a subscribed client to a thread (by its index).
    ///
    /// # Errors
    /// The thread being gone (it panicked), as text.
    pub fn add(&self, client: Handoff) -> Result<(), String> {
        let (tx, waker) = &self.lanes[client.index as usize % self.lanes.len()];
        tx.send(client).map_err(|_| "the receiver thread is gone".to_owned())?;
        waker.wake().map_err(|e| format!("wake the receiver: {e}"))
    }

    /// Stops the threads and returns every client's outcome (blocking; call
    /// off the async runtime). A client handed over after this is never
    /// read; a second call returns nothing.
    pub fn stop(&self) -> Vec<(u32, ClientOutcome)> {
        self.stop.store(true, Ordering::Relaxed);
        for (_, waker) in &self.lanes {
            let _ = waker.wake();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect()
    }
}

/// One client on a thread.
struct Slot {
    index: u32,
    stream: TcpStream,
    /// Unconsumed bytes are `buf[start..filled]`.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    masks: Masks,
    listener: Listener,
    outcome: ClientOutcome,
    next_beat: Instant,
    open: bool,
}

struct Thread {
    poll: Poll,
    rx: mpsc::Receiver<Handoff>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    slots: Vec<Slot>,
}

impl Thread {
    fn run(mut self) -> Vec<(u32, ClientOutcome)> {
        let mut events = Events::with_capacity(256);
        let mut samples: Vec<Sample> = Vec::with_capacity(1024);
        let mut next_sweep = Instant::now() + Duration::from_secs(1);
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(err) = self.poll.poll(&mut events, Some(TICK)) {
                if err.kind() == ErrorKind::Interrupted {
                    continue;
                }
                for slot in self.slots.iter_mut().filter(|s| s.open) {
                    slot.outcome.protocol(format!("the receiver's poll failed: {err}"));
                }
                break;
            }
            for event in &events {
                if event.token() == WAKE {
                    continue;
                }
                if let Some(slot) = self.slots.get_mut(event.token().0) {
                    slot.read(&self.shared, &mut samples);
                    if !slot.open {
                        let _ = self.poll.registry().deregister(&mut slot.stream);
                    }
                }
            }
            while let Ok(handoff) = self.rx.try_recv() {
                self.add(handoff, &mut samples);
            }
            if !samples.is_empty() {
                self.shared.record(&samples);
                samples.clear();
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + Duration::from_secs(1);
                for slot in self.slots.iter_mut().filter(|s| s.open && s.next_beat <= now) {
                    slot.heartbeat(now);
                    if !slot.open {
                        let _ = self.poll.registry().deregister(&mut slot.stream);
                    }
                }
            }
        }
        self.slots.into_iter().map(|s| (s.index, s.outcome)).collect()
    }

    fn add(&mut self, handoff: Handoff, samples: &mut Vec<Sample>) {
        let Handoff { index, stream, pending, masks, listener } = handoff;
        let mut buf = pending;
        let filled = buf.len();
        buf.resize(filled.max(READ_BUFFER), 0);
        let mut slot = Slot {
            index,
            stream: TcpStream::from_std(stream),
            buf,
            start: 0,
            filled,
            masks,
            listener,
            outcome: ClientOutcome::default(),
            next_beat: Instant::now() + HEARTBEAT,
            open: true,
        };
        let token = Token(self.slots.len());
        // Frames that came with the join's last read.
        slot.consume(&self.shared, samples);
        if slot.open {
            if let Err(err) = enable_timestamps(&slot.stream) {
                slot.fail(format!("SO_TIMESTAMP on the client's socket: {err}"));
            } else if let Err(err) = self.poll.registry().register(&mut slot.stream, token, Interest::READABLE) {
                slot.fail(format!("register with the receiver's poll: {err}"));
            }
        }
        self.slots.push(slot);
    }
}

impl Slot {
    fn fail(&mut self, why: String) {
        self.outcome.protocol(why);
        self.open = false;
    }

    /// Reads until drained, checking each complete frame.
    fn read(&mut self, shared: &Shared, samples: &mut Vec<Sample>) {
        while self.open {
            if self.filled == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.filled, 0);
                    self.filled -= self.start;
                    self.start = 0;
                } else {
                    let grown = (self.buf.len() * 2).min(MAX_FRAME + 14);
                    if grown == self.buf.len() {
                        return self.fail("a frame larger than the read buffer's bound".into());
                    }
                    self.buf.resize(grown, 0);
                }
            }
            match recv_stamped(&self.stream, &mut self.buf[self.filled..]) {
                Ok((0, _)) => return self.fail("the socket closed".into()),
                Ok((n, stamp)) => {
                    self.filled += n;
                    let drained = self.filled < self.buf.len();
                    self.consume_stamped(shared, samples, stamp);
                    if drained {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.fail(format!("socket error: {e}")),
            }
        }
    }

    /// Checks every complete frame in the buffer.
    fn consume(&mut self, shared: &Shared, samples: &mut Vec<Sample>) {
        self.consume_stamped(shared, samples, None);
    }

    /// [`Slot::consume`], with the kernel's receive time of the last read
    /// (wall µs).
    fn consume_stamped(&mut self, shared: &Shared, samples: &mut Vec<Sample>, stamp: Option<u64>) {
        let mut clock = None;
        while self.open {
            let header = match wire::parse_header(&self.buf[self.start..self.filled]) {
                Ok(Some(h)) if self.filled - self.start >= h.total() => h,
                Ok(_) => break,
                Err(why) => return self.fail(format!("undecodable frame: {why}")),
            };
            let at = self.start + header.header_len;
            let payload = &self.buf[at..at + header.payload_len];
            match wire::classify(&header, payload) {
                Ok(Received::Text(text)) => {
                    // One clock reading per read: the frames of one read
                    // arrived together.
                    let now = *clock.get_or_insert_with(|| Clock { socket_wall_us: stamp, ..shared.clock() });
                    self.listener.handle(text, shared, now, &mut self.outcome, samples);
                }
                Ok(Received::Close(why)) => return self.fail(format!("the relay closed the socket: {why}")),
                Ok(Received::Ping(payload)) => {
                    let pong = self.masks.frame(Opcode::Pong, payload);
                    if let Err(why) = wire::write_frame(&mut self.stream, &pong) {
                        return self.fail(format!("pong: {why}"));
                    }
                }
                Ok(Received::Ignored) => {}
                Err(why) => return self.fail(why),
            }
            self.start += header.total();
        }
        if self.start == self.filled {
            self.start = 0;
            self.filled = 0;
        }
    }

    fn heartbeat(&mut self, now: Instant) {
        self.next_beat = now + HEARTBEAT;
        let frame = self.masks.frame(Opcode::Text, self.listener.heartbeat().as_bytes());
        if let Err(why) = wire::write_frame(&mut self.stream, &frame) {
            self.fail(format!("heartbeat: {why}"));
        }
    }
}

/// Asks the kernel to timestamp what reaches `stream` (`SO_TIMESTAMP`).
fn enable_timestamps(stream: &TcpStream) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to a c_int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMP,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One non-blocking read into `buf`, with the kernel's receive time of its
/// last bytes (wall µs since the Unix epoch) when the kernel attached one.
fn recv_stamped(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    // Room for one SCM_TIMESTAMP (a timeval) and its header, aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain old data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: iov points into `buf` (its length), control into `control`;
    // both outlive the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* walk stays within msg_controllen bytes of
    // `control`, as the kernel filled them; a timeval is read only from a
    // message long enough to hold one.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            let whole =
                header.cmsg_len as usize >= libc::CMSG_LEN(std::mem::size_of::<libc::timeval>() as u32) as usize;
            if whole && header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_TIMESTAMP {
                let tv = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timeval>());
                stamp =
                    u64::try_from(tv.tv_sec).ok().zip(u64::try_from(tv.tv_usec).ok()).map(|(s, us)| s * 1_000_000 + us);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}
