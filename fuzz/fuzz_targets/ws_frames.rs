//! Client bytes after the upgrade → WebSocket frames (tungstenite, with the hub's socket
//! settings) → protocol requests (`parse_request`) → the ack or error frame the hub would send.
//! Also feeds the bytes straight to the request parser when they are UTF-8.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use presence_hub::protocol::{
    OperatorRequest, VisitorRequest, ack_frame, error_frame, parse_request, request_ref,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};

/// The client's bytes in, the hub's answers (pongs, closes) counted and dropped.
struct Io {
    input: Cursor<Vec<u8>>,
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn handle(text: &str) {
    let (r, req) = parse_request::<OperatorRequest>(text);
    let frame = match &req {
        Ok(_) => ack_frame(r.as_deref(), None),
        Err(e) => error_frame(r.as_deref(), e),
    };
    // What the hub sends back is always one JSON object (checked as JSON text: a `ref` is
    // echoed verbatim, and `1e400` is valid JSON that serde_json's Value cannot hold).
    let back: Box<serde_json::value::RawValue> =
        serde_json::from_str(&frame).expect("answers are JSON");
    assert!(back.get().starts_with('{'));
    let (r, req) = parse_request::<VisitorRequest>(text);
    if let Err(e) = &req {
        let _ = error_frame(r.as_deref(), e);
    }
    let _ = request_ref(text);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        handle(text);
    }
    let io = Io {
        input: Cursor::new(data.to_vec()),
    };
    let mut ws =
        WebSocket::from_raw_socket(io, Role::Server, Some(presence_hub::ws::ws_config(4096)));
    for _ in 0..64 {
        match ws.read() {
            Ok(Message::Text(t)) => handle(t.as_str()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
});
