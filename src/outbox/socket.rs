//! WebSocket framing of queued frames, and the non-blocking vectored write
//! that puts them on the socket.
//!
//! A queued frame is its payload only: server frames are never masked, so
//! the header (FIN, opcode, length) depends on nothing but the payload and
//! is made here, on the stack, when the frame is written — the payload
//! `Bytes` shared by every receiver is handed to the kernel as it is (one
//! `writev` for up to [`BATCH`] frames), never copied into a per-socket
//! buffer. Text frames are the JSON this server serializes (valid UTF-8 by
//! construction, starting with `[` or `{`); anything else is a binary frame
//! (Supabase's kind-4 broadcasts).
//!
//! Invariants: [`wire_len`] is exactly what [`write_some`] sends for a frame,
//! so [`advance`] can account partial writes; a header is at most
//! [`MAX_HEADER`] bytes.

use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;

/// Frames per `writev` (two iovecs each; far below `IOV_MAX`).
pub const BATCH: usize = 32;

/// Longest frame header: 2 bytes + a 64-bit length.
pub const MAX_HEADER: usize = 10;

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const FIN: u8 = 0x80;

/// The opcode a payload is sent with: text for JSON, binary otherwise.
fn opcode(payload: &[u8]) -> u8 {
    match payload.first() {
        Some(b'[' | b'{') => OP_TEXT,
        _ => OP_BINARY,
    }
}

/// Writes the unmasked header of a final frame with `opcode` and a payload
/// of `len` bytes into `out`; returns its length.
pub fn header(opcode: u8, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = FIN | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= usize::from(u16::MAX) {
        4
    } else {
        10
    }
}

/// Bytes a queued frame takes on the wire (header included; a raw entry is
/// already framed).
pub fn wire_len(frame: &Bytes, raw: bool) -> usize {
    if raw {
        frame.len()
    } else {
        header_len(frame.len()) + frame.len()
    }
}

/// A close frame with `code` and `reason` (cut to 123 bytes at a character
/// boundary, as a control frame's payload is at most 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = Vec::with_capacity(4 + cut);
    out.push(FIN | OP_CLOSE);
    out.push((2 + cut) as u8);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..cut]);
    out
}

/// Whether `frames` (complete, unmasked frames as the WebSocket library
/// writes them) hold a close frame. Anything it cannot walk counts as no.
pub fn holds_close(frames: &[u8]) -> bool {
    let mut at = 0usize;
    while at + 2 <= frames.len() {
        let op = frames[at] & 0x0f;
        let (len, head) = match frames[at + 1] & 0x7f {
            126 if at + 4 <= frames.len() => (usize::from(u16::from_be_bytes([frames[at + 2], frames[at + 3]])), 4),
            127 if at + 10 <= frames.len() => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&frames[at + 2..at + 10]);
                (usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX), 10)
            }
            126 | 127 => return false,
            n => (usize::from(n), 2),
        };
        // A masked frame carries 4 more bytes (the server never masks).
        let mask = if frames[at + 1] & 0x80 != 0 { 4 } else { 0 };
        if op == OP_CLOSE {
            return true;
        }
        at = match at.checked_add(head + mask).and_then(|a| a.checked_add(len)) {
            Some(next) => next,
            None => return false,
        };
    }
    false
}

/// How a write reaches the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `sendmsg` on the descriptor, past tokio's readiness bookkeeping: the
    /// hub's and flushers' writes, which never wait for readiness (a full
    /// socket is handed to the writer task). Saves touching the socket's
    /// readiness state — a cache miss per delivery on 10,000 sockets.
    Direct,
    /// Through tokio (`try_io`), which clears the socket's readiness on
    /// `WouldBlock`: the writer task's writes, after which it awaits
    /// `writable()`.
    Tokio,
}

/// One non-blocking `sendmsg` of the frames from the front of the queue (up
/// to [`BATCH`]), skipping the first `front_sent` bytes already on the
/// socket. `fd` is `socket`'s descriptor (for [`Via::Direct`]). Returns the
/// bytes written (`WouldBlock` when the socket is full).
///
/// # Errors
/// The socket's error.
pub fn write_some<'a>(
    socket: &OwnedWriteHalf,
    fd: std::os::fd::RawFd,
    via: Via,
    frames: impl Iterator<Item = (&'a Bytes, bool)>,
    front_sent: usize,
) -> io::Result<usize> {
    let mut heads = [[0u8; MAX_HEADER]; BATCH];
    let mut lens = [0usize; BATCH];
    let mut payloads: [&[u8]; BATCH] = [&[]; BATCH];
    let mut n = 0;
    for (i, (frame, raw)) in frames.take(BATCH).enumerate() {
        lens[i] = if raw { 0 } else { header(opcode(frame), frame.len(), &mut heads[i]) };
        payloads[i] = frame;
        n = i + 1;
    }
    let mut slices = [IoSlice::new(&[]); 2 * BATCH];
    let mut used = 0;
    let mut skip = front_sent;
    for i in 0..n {
        let head = &heads[i][..lens[i]];
        let payload = payloads[i];
        let (head, payload) = if skip >= head.len() {
            let cut = (skip - head.len()).min(payload.len());
            (&[][..], &payload[cut..])
        } else {
            (&head[skip..], payload)
        };
        skip = 0;
        for part in [head, payload] {
            if !part.is_empty() {
                slices[used] = IoSlice::new(part);
                used += 1;
            }
        }
    }
    // SAFETY: `fd` is the descriptor of `socket`, which the caller holds
    // borrowed for this call: it stays open until we return.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let send = || socket2::SockRef::from(&fd).send_vectored_with_flags(&slices[..used], libc::MSG_NOSIGNAL);
    match via {
        Via::Direct => send(),
        Via::Tokio => socket.as_ref().try_io(tokio::io::Interest::WRITABLE, send),
    }
}

/// Accounts `sent` bytes against frames of the given wire lengths, the
/// first of which had `front_sent` bytes out already: returns how many
/// frames are now complete, and the bytes sent of the next one.
pub fn advance(wire_lens: impl Iterator<Item = usize>, front_sent: usize, sent: usize) -> (usize, usize) {
    let mut left = sent;
    let mut done = 0;
    let mut already = front_sent;
    for len in wire_lens {
        let rest = len - already.min(len);
        if left < rest {
            return (done, already + left);
        }
        left -= rest;
        already = 0;
        done += 1;
        if left == 0 {
            break;
        }
    }
    (done, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_rfc_6455_lengths() {
        let mut h = [0u8; MAX_HEADER];
        assert_eq!(header(OP_TEXT, 5, &mut h), 2);
        assert_eq!(&h[..2], &[0x81, 5]);
        assert_eq!(header(OP_BINARY, 126, &mut h), 4);
        assert_eq!(&h[..4], &[0x82, 126, 0, 126]);
        assert_eq!(header(OP_TEXT, 65_535, &mut h), 4);
        assert_eq!(header(OP_TEXT, 65_536, &mut h), 10);
        assert_eq!(&h[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        for len in [0, 125, 126, 65_535, 65_536] {
            assert_eq!(wire_len(&Bytes::from(vec![b'{'; len]), false), header_len(len) + len);
        }
        assert_eq!(opcode(b"[1]"), OP_TEXT);
        assert_eq!(opcode(&[4, 1, 2]), OP_BINARY);
    }

    #[test]
    fn advance_counts_whole_and_partial_frames() {
        let lens = [10usize, 20, 5];
        assert_eq!(advance(lens.iter().copied(), 0, 0), (0, 0));
        assert_eq!(advance(lens.iter().copied(), 0, 10), (1, 0));
        assert_eq!(advance(lens.iter().copied(), 0, 15), (1, 5));
        assert_eq!(advance(lens.iter().copied(), 5, 5), (1, 0));
        assert_eq!(advance(lens.iter().copied(), 5, 29), (2, 4));
        assert_eq!(advance(lens.iter().copied(), 5, 30), (3, 0));
        assert_eq!(advance(lens.iter().copied(), 0, 35), (3, 0));
    }

    #[test]
    fn close_frames_are_found_and_cut() {
        let close = close_frame(1013, &"é".repeat(100));
        assert_eq!(close[0], 0x88);
        assert!(usize::from(close[1]) <= 125 && close.len() == 2 + usize::from(close[1]));
        assert!(std::str::from_utf8(&close[4..]).is_ok());
        let mut pong_then_close = vec![0x8a, 3, 1, 2, 3];
        pong_then_close.extend_from_slice(&close);
        assert!(holds_close(&pong_then_close));
        assert!(!holds_close(&[0x8a, 3, 1, 2, 3]));
        assert!(!holds_close(&[0x8a, 127, 255, 255, 255, 255, 255, 255, 255, 255, 0x88, 0]));
        assert!(!holds_close(&[]));
    }

    #[tokio::test]
    async fn partial_writes_resume_mid_frame_and_the_peer_reads_whole_frames() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        let frames: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("[{}]", "x".repeat(i * 997 % 70_000)))).collect();
        let expected: Vec<u8> = frames
            .iter()
            .flat_map(|f| {
                let mut h = [0u8; MAX_HEADER];
                let n = header(OP_TEXT, f.len(), &mut h);
                h[..n].iter().copied().chain(f.iter().copied()).collect::<Vec<_>>()
            })
            .collect();
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, expected);
        });
        let (mut done, mut front) = (0, 0);
        while done < frames.len() {
            let via = if done % 2 == 0 { Via::Direct } else { Via::Tokio };
            let fd = std::os::fd::AsRawFd::as_raw_fd(write.as_ref());
            match write_some(&write, fd, via, frames[done..].iter().map(|f| (f, false)), front) {
                Ok(n) => {
                    let (d, f) = advance(frames[done..].iter().map(|f| wire_len(f, false)), front, n);
                    done += d;
                    front = f;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness is tokio's only after a write through it.
                    match write_some(&write, fd, Via::Tokio, frames[done..].iter().map(|f| (f, false)), front) {
                        Ok(n) => {
                            let (d, f) = advance(frames[done..].iter().map(|f| wire_len(f, false)), front, n);
                            done += d;
                            front = f;
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => write.writable().await.unwrap(),
                        Err(err) => panic!("{err}"),
                    }
                }
                Err(err) => panic!("{err}"),
            }
        }
        reader.await.unwrap();
    }
}
