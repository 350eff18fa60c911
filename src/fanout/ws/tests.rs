//! The vendored tungstenite's read path (vendor/README.md): a server connection waiting with
//! nothing buffered gives its read buffer back; frames that arrive in pieces, with waits between
//! them (a header alone, a payload split anywhere), still come through whole and in order.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::{Error, Message};

/// A socket whose peer's bytes arrive as `chunks`, one per read, each read after a wait.
struct Trickle {
    chunks: VecDeque<Vec<u8>>,
    waited: bool,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.waited {
            self.waited = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Some(chunk) = self.chunks.front_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            self.chunks.pop_front();
            self.waited = false;
        }
        Ok(n)
    }
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a client's frames go: a socket that is written to and never read.
struct Sink(Vec<u8>);

impl Read for Sink {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The masked frames a client sends for `messages`.
fn client_bytes(messages: &[String]) -> Vec<u8> {
    let mut client = WebSocket::from_raw_socket(Sink(Vec::new()), Role::Client, None);
    for m in messages {
        client.send(Message::text(m.clone())).expect("client send");
    }
    std::mem::take(&mut client.get_mut().0)
}

/// Each of the client's frames as (header, payload) byte ranges.
fn frames(bytes: &[u8]) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (ext, len) = match bytes[at + 1] & 0x7f {
            126 => (
                2,
                u64::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
            ),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&bytes[at + 2..at + 10]);
                (8, u64::from_be_bytes(b))
            }
            n => (0, u64::from(n)),
        };
        let header = 2 + ext + 4; // client frames are masked
        let end = at + header + usize::try_from(len).expect("length");
        out.push((at..at + header, at + header..end));
        at = end;
    }
    out
}

/// Reads `messages` from a server connection whose client's bytes arrive as `chunks`.
fn read_all(chunks: VecDeque<Vec<u8>>, messages: &[String], case: &str) {
    let stream = Trickle {
        chunks,
        waited: false,
    };
    let config = WebSocketConfig::default().read_buffer_size(1024);
    let mut server = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
    let mut got = Vec::new();
    // bounded: every read either makes progress or waits once per chunk
    for _ in 0..100_000 {
        if got.len() == messages.len() {
            break;
        }
        match server.read() {
            Ok(Message::Text(t)) => got.push(t.as_str().to_string()),
            Ok(other) => panic!("{case}: unexpected message {other:?}"),
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{case}: read failed: {e}"),
        }
    }
    assert_eq!(got.len(), messages.len(), "{case}: messages lost");
    assert!(got == messages, "{case}: a message came through altered");
}

#[test]
fn a_frame_whose_header_came_alone_keeps_its_buffer_across_the_wait() {
    let messages: Vec<String> = [0, 300, 1025, 5000, 70_000, 3]
        .iter()
        .map(|&n| "x".repeat(n))
        .collect();
    let bytes = client_bytes(&messages);
    for piece in [1, 700, 1024, 4096] {
        let mut chunks = VecDeque::new();
        for (header, payload) in frames(&bytes) {
            chunks.push_back(bytes[header].to_vec());
            for c in bytes[payload].chunks(piece) {
                chunks.push_back(c.to_vec());
            }
        }
        read_all(
            chunks,
            &messages,
            &format!("header alone, payload in {piece}-byte pieces"),
        );
    }
}

#[test]
fn frames_split_anywhere_across_waits_arrive_whole() {
    // sizes around the 1 KiB read buffer, the 7-bit and 16-bit length limits and 64 KiB
    let messages: Vec<String> = [0, 1, 5, 125, 126, 1000, 1024, 1025, 3000, 65_535, 70_000, 7]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let c = char::from(b'a' + (i % 26) as u8);
            std::iter::repeat_n(c, n).collect()
        })
        .collect();
    let bytes = client_bytes(&messages);
    // cut points from a fixed cycle: 1-byte pieces (a header split), pieces ending exactly at
    // a header, and pieces bigger than the read buffer
    let sizes = [1, 2, 3, 14, 200, 1, 1500, 6, 4096, 9, 17_000];
    for shift in 0..sizes.len() {
        let mut chunks = VecDeque::new();
        let mut at = 0;
        for i in 0.. {
            if at >= bytes.len() {
                break;
            }
            let n = sizes[(i + shift) % sizes.len()].min(bytes.len() - at);
            chunks.push_back(bytes[at..at + n].to_vec());
            at += n;
        }
        read_all(chunks, &messages, &format!("pieces from shift {shift}"));
    }
}
