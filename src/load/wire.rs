//! The load clients' own WebSocket wire (RFC 6455, client side): the HTTP
//! upgrade, masked client frames, and frames parsed in place from a plain
//! byte buffer (tungstenite's header parser plus the load client's rules),
//! for both the async join path ([`Conn`]) and the receiver threads
//! ([`super::receiver`]).
//!
//! Why not tungstenite here: with 10,000 clients the load generator's cost
//! per frame counts as much as the relay's (issue 20's E4 runs the machine
//! near saturation). A frame parsed in place from a socket's own buffer,
//! read by a thread that polls thousands of sockets, costs no task wake-up,
//! no copy into a second buffer and no per-frame allocation. tungstenite
//! stays for the Broadcast load clients and the tests.
//!
//! Invariants:
//! - [`parse_header`] never panics and never reads past its input; server
//!   frames must be unmasked, control frames final and ≤ 125 bytes, payloads
//!   ≤ [`MAX_FRAME`]; anything else is an error with its reason;
//! - every client frame is masked (a fresh key per frame);
//! - [`Conn`]'s reads are cancel-safe (bytes read are in its buffer before
//!   the await returns), so it can sit under `tokio::time::timeout`.

use std::io::{Cursor, Write};
use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

use super::client::Endpoint;

/// The largest server frame payload a load client accepts.
pub const MAX_FRAME: usize = 16 << 20;
/// A client socket's initial read buffer (grown for a larger frame).
pub const READ_BUFFER: usize = 4 << 10;
/// The largest HTTP upgrade response accepted.
const MAX_RESPONSE: usize = 16 << 10;

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// A continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary.
    Binary,
    /// Close (code and reason).
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// FIN: the last frame of a message.
    pub fin: bool,
    /// The opcode.
    pub opcode: Opcode,
    /// Header bytes (2, 4 or 10: server frames carry no mask).
    pub header_len: usize,
    /// Payload bytes.
    pub payload_len: usize,
}

impl Header {
    /// Header and payload bytes.
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses the server frame header at the start of `buf` (tungstenite's
/// header parser, then the load client's rules): `Ok(None)` while more
/// bytes are needed.
///
/// # Errors
/// Reserved bits, an unknown opcode, a masked frame, a fragmented or long
/// control frame, or a payload over [`MAX_FRAME`], as text.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, String> {
    let mut cursor = Cursor::new(buf);
    let Some((header, len)) = FrameHeader::parse(&mut cursor).map_err(|e| format!("frame header: {e}"))? else {
        return Ok(None);
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err("reserved bits set (no extension was negotiated)".into());
    }
    let opcode = match header.opcode {
        OpCode::Data(Data::Continue) => Opcode::Continuation,
        OpCode::Data(Data::Text) => Opcode::Text,
        OpCode::Data(Data::Binary) => Opcode::Binary,
        OpCode::Control(Control::Close) => Opcode::Close,
        OpCode::Control(Control::Ping) => Opcode::Ping,
        OpCode::Control(Control::Pong) => Opcode::Pong,
        OpCode::Data(Data::Reserved(n)) | OpCode::Control(Control::Reserved(n)) => {
            return Err(format!("unknown opcode {n}"))
        }
    };
    if header.mask.is_some() {
        return Err("a masked frame from the server".into());
    }
    let control = matches!(opcode, Opcode::Close | Opcode::Ping | Opcode::Pong);
    if control && (!header.is_final || len > 125) {
        return Err(format!("a {opcode:?} frame that is fragmented or longer than 125 bytes ({len})"));
    }
    if len > MAX_FRAME as u64 {
        return Err(format!("a {len}-byte frame (the load client accepts {MAX_FRAME})"));
    }
    let header_len = usize::try_from(cursor.position()).map_err(|_| "a header past the buffer".to_owned())?;
    Ok(Some(Header { fin: header.is_final, opcode, header_len, payload_len: len as usize }))
}

/// What a complete server frame means to a load client.
#[derive(Debug)]
pub enum Received<'a> {
    /// A text frame (valid UTF-8).
    Text(&'a str),
    /// A close frame, described (`"1000 reason"`).
    Close(String),
    /// A ping: answer it with a pong of this payload.
    Ping(&'a [u8]),
    /// A binary or pong frame: nothing to do.
    Ignored,
}

/// Interprets a complete frame (`header` and its `payload`), the same way on
/// the join path and the receiver threads.
///
/// # Errors
/// A text frame that is not UTF-8, or a fragmented message (the relay never
/// fragments), as text.
pub fn classify<'a>(header: &Header, payload: &'a [u8]) -> Result<Received<'a>, String> {
    match (header.fin, header.opcode) {
        (true, Opcode::Text) => {
            std::str::from_utf8(payload).map(Received::Text).map_err(|e| format!("a text frame that is not UTF-8: {e}"))
        }
        (true, Opcode::Close) => Ok(Received::Close(describe_close(payload))),
        (true, Opcode::Ping) => Ok(Received::Ping(payload)),
        (true, Opcode::Binary | Opcode::Pong) => Ok(Received::Ignored),
        _ => Err("a fragmented message (the relay never fragments)".into()),
    }
}

/// A close frame's payload, described (`"1000 reason"`).
pub fn describe_close(payload: &[u8]) -> String {
    match payload {
        [] => "no close code".to_owned(),
        [a, b, reason @ ..] => format!("{} {}", u16::from_be_bytes([*a, *b]), String::from_utf8_lossy(reason)),
        _ => "a 1-byte close payload".to_owned(),
    }
}

/// A small xorshift for mask keys (masking guards proxies' caches, not
/// secrets; the relay only unmasks).
#[derive(Debug, Clone)]
pub struct Masks(u64);

impl Masks {
    /// Keys seeded from `seed` (any value).
    pub fn new(seed: u64) -> Masks {
        Masks(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> [u8; 4] {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 as u32).to_be_bytes()
    }

    /// A masked, final client frame of `opcode` carrying `payload`.
    pub fn frame(&mut self, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let code = match opcode {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
        };
        let mut out = Vec::with_capacity(payload.len() + 14);
        out.push(0x80 | code);
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = self.next();
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }
}

/// A message read by [`Conn::next_message`].
#[derive(Debug)]
pub enum Message {
    /// A text frame.
    Text(String),
    /// The server closed (its close frame described, or why the stream ended).
    Closed(String),
    /// A binary or pong frame (ignored by the load clients).
    Other,
}

/// An upgraded client connection for the join phase (async), handed to a
/// receiver thread with [`Conn::into_parts`] once subscribed.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet consumed: `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    masks: Masks,
}

impl Conn {
    /// Opens a TCP connection to `endpoint` (bound to `source` when given)
    /// and upgrades it.
    ///
    /// # Errors
    /// Connect or handshake failures, as text.
    pub async fn open(endpoint: &Endpoint, source: Option<IpAddr>, seed: u64) -> Result<Conn, String> {
        let mut stream = super::client::connect_tcp(endpoint, source).await?;
        let key = generate_key();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
            endpoint.path, endpoint.addr
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("websocket handshake: {e}"))?;
        let mut buf = Vec::with_capacity(READ_BUFFER);
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() >= MAX_RESPONSE {
                return Err(format!("websocket handshake: no end of headers within {MAX_RESPONSE} bytes"));
            }
            let n = stream.read_buf(&mut buf).await.map_err(|e| format!("websocket handshake: {e}"))?;
            if n == 0 {
                return Err("websocket handshake: closed before the response".into());
            }
        };
        check_upgrade(&buf[..end], &key)?;
        buf.drain(..end);
        buf.reserve(READ_BUFFER.saturating_sub(buf.len()));
        Ok(Conn { stream, buf, start: 0, masks: Masks::new(seed) })
    }

    /// Sends a text frame.
    ///
    /// # Errors
    /// The write failing, as text.
    pub async fn send_text(&mut self, text: &str) -> Result<(), String> {
        let frame = self.masks.frame(Opcode::Text, text.as_bytes());
        self.stream.write_all(&frame).await.map_err(|e| format!("send: {e}"))
    }

    /// The next text frame, close or other frame. Pings are answered.
    ///
    /// # Errors
    /// A malformed or fragmented frame, or a read error, as text.
    pub async fn next_message(&mut self) -> Result<Message, String> {
        loop {
            if let Some(header) = parse_header(&self.buf[self.start..])? {
                if self.buf.len() - self.start >= header.total() {
                    let at = self.start + header.header_len;
                    let payload = &self.buf[at..at + header.payload_len];
                    let message = match classify(&header, payload)? {
                        Received::Text(text) => Message::Text(text.to_owned()),
                        Received::Close(why) => Message::Closed(why),
                        Received::Ping(payload) => {
                            let pong = self.masks.frame(Opcode::Pong, payload);
                            // A pong that does not fit at once is dropped: the
                            // relay never pings, and a partial frame would
                            // corrupt the stream.
                            let _ = self.stream.try_write(&pong);
                            Message::Other
                        }
                        Received::Ignored => Message::Other,
                    };
                    self.start += header.total();
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    return Ok(message);
                }
                self.buf.reserve(header.total());
            }
            if self.start > 0 && self.buf.capacity() - self.buf.len() < READ_BUFFER / 2 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // Cancel-safe: read_buf appends before it returns, nothing else
            // changes across the await.
            let n = self.stream.read_buf(&mut self.buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Ok(Message::Closed("the stream ended without a close frame".into()));
            }
        }
    }

    /// The socket (still non-blocking) and the bytes read but not consumed.
    ///
    /// # Errors
    /// Tokio failing to release the socket, as text.
    pub fn into_parts(mut self) -> Result<(std::net::TcpStream, Vec<u8>, Masks), String> {
        self.buf.drain(..self.start);
        let stream = self.stream.into_std().map_err(|e| format!("into_std: {e}"))?;
        Ok((stream, self.buf, self.masks))
    }
}

/// Checks an HTTP upgrade response (`head` up to and with its blank line).
fn check_upgrade(head: &[u8], key: &str) -> Result<(), String> {
    let text = std::str::from_utf8(head).map_err(|_| "websocket handshake: a response that is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("websocket handshake: {status}"));
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, value)| value.trim());
    if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(format!("websocket handshake: Sec-WebSocket-Accept {accept:?} does not match the key"));
    }
    Ok(())
}

/// Writes a whole small frame to a non-blocking socket at once.
///
/// # Errors
/// A short write or an error, as text (a partial frame would corrupt the
/// stream, so the caller treats it as fatal for the socket).
pub fn write_frame(stream: &mut impl Write, frame: &[u8]) -> Result<(), String> {
    match stream.write(frame) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(n) => Err(format!("a short write ({n} of {} bytes)", frame.len())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn server_frame(fin: bool, code: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | code];
        match payload.len() {
            n @ 0..=125 => out.push(n as u8),
            n @ 126..=0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn headers_parse_at_every_length_and_wait_for_more_bytes() {
        for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let frame = server_frame(true, 1, &vec![b'x'; len]);
            let header = parse_header(&frame).unwrap().unwrap();
            assert_eq!((header.opcode, header.payload_len, header.total()), (Opcode::Text, len, frame.len()));
            for cut in 0..header.header_len {
                assert_eq!(parse_header(&frame[..cut]).unwrap(), None, "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        let cases: [(&[u8], &str); 6] = [
            (&[0x81 | 0x40, 0], "reserved"),
            (&[0x83, 0], "opcode"),
            (&[0x81, 0x80, 0, 0, 0, 0], "masked"),
            (&[0x09, 0], "fragmented"),
            (&[0x89, 126, 0, 200], "longer than 125"),
            (&[0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 0], "accepts"),
        ];
        for (bytes, why) in cases {
            let err = parse_header(bytes).unwrap_err();
            assert!(err.contains(why), "{bytes:?}: {err}");
        }
        assert_eq!(describe_close(&[0x03, 0xe8, b'b', b'y', b'e']), "1000 bye");
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        let mut masks = Masks::new(7);
        for len in [0usize, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frame = masks.frame(Opcode::Text, &payload);
            assert_eq!(frame[0], 0x81);
            assert_ne!(frame[1] & 0x80, 0, "masked");
            let (len_field, at) = match frame[1] & 0x7f {
                126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
                127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            assert_eq!(len_field, len);
            let key = &frame[at..at + 4];
            let unmasked: Vec<u8> = frame[at + 4..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(unmasked, payload);
        }
        assert_ne!(
            masks.frame(Opcode::Text, b"a")[2..6],
            masks.frame(Opcode::Text, b"a")[2..6],
            "a fresh key per frame"
        );
    }

    #[test]
    fn upgrade_responses_are_checked() {
        let key = generate_key();
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        assert_eq!(check_upgrade(ok.as_bytes(), &key), Ok(()));
        assert!(check_upgrade(b"HTTP/1.1 403 Forbidden\r\n\r\n", &key).unwrap_err().contains("403"));
        let wrong = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(check_upgrade(wrong.as_bytes(), &key).unwrap_err().contains("does not match"));
    }

    proptest! {
        #[test]
        fn garbage_never_panics_and_a_header_never_claims_more_than_it_read(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(Some(header)) = parse_header(&bytes) {
                prop_assert!(header.header_len <= bytes.len());
                prop_assert!(header.payload_len <= MAX_FRAME);
            }
        }
    }
}
