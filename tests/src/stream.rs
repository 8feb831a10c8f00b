//! A blocking client of the Kubernetes remote-command WebSocket protocol, as
//! kubectl speaks it to the URLs that CRI Exec and Attach return (containerd's
//! streaming server).
//!
//! Each binary WebSocket message starts with one byte naming its channel:
//! 0 stdin (client to server), 1 stdout, 2 stderr, 3 error (under
//! `v4.channel.k8s.io`: a `metav1.Status` as JSON once the process has
//! ended), 4 resize (client to server, `{"Width":..,"Height":..}`). The
//! server sends an empty frame on the lowest output channel when the streams
//! are up, and closes the WebSocket when the process ends.
//!
//! Stdin has no end-of-file signal before `v5.channel.k8s.io` (channel 255,
//! followed by the channel to close); under v4 a process sees EOF on stdin
//! only when the whole connection closes, which also ends its output
//! streams. A test that needs a process to end on its input either makes it
//! stop after a known number of bytes (`head -c N`), sends ^D to a terminal,
//! or, for Attach to a `stdinOnce` container, closes the session.
//!
//! Only the binary subprotocols are spoken here, not their base64 variants.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

/// The remote-command subprotocol with a JSON status on the error channel.
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";
/// The first remote-command subprotocol: the error channel carries only a
/// failure's message text.
pub const PROTOCOL_V1: &str = "channel.k8s.io";
/// The subprotocol with a stdin close signal (Kubernetes 1.29 and later).
pub const PROTOCOL_V5: &str = "v5.channel.k8s.io";

/// How long one blocking read waits before the caller's deadline is checked.
const POLL: Duration = Duration::from_millis(50);
/// How long the opening handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The v5 signal that closes the channel in the following byte.
const CLOSE_SIGNAL: u8 = 255;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("streaming url {0:?} is not http:// or ws://")]
    Url(String),
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server refused the upgrade with http {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("websocket handshake")]
    Handshake(#[source] tungstenite::Error),
    #[error("websocket")]
    WebSocket(#[from] tungstenite::Error),
    #[error("frame on unknown channel {0}")]
    UnknownChannel(u8),
    #[error("text message {0:?} on a binary subprotocol")]
    Text(String),
    #[error("subprotocol {0:?} has no stdin close signal")]
    NoHalfClose(String),
    #[error("no answer within {waited:?}; so far {so_far}")]
    Timeout { waited: Duration, so_far: String },
    #[error("the server closed the session first; it had sent {0}")]
    Closed(String),
    #[error("error channel status {json:?}")]
    Status {
        json: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A channel of the remote-command protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    Error = 3,
    Resize = 4,
}

impl TryFrom<u8> for Channel {
    type Error = StreamError;

    fn try_from(b: u8) -> Result<Self, StreamError> {
        Ok(match b {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::Error,
            4 => Channel::Resize,
            other => return Err(StreamError::UnknownChannel(other)),
        })
    }
}

/// A message for the server: the channel byte, then the payload.
pub fn encode_frame(channel: Channel, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 1);
    frame.push(channel as u8);
    frame.extend_from_slice(payload);
    frame
}

/// Splits a message from the server into its channel and payload; `None`
/// for an empty message, which carries nothing.
pub fn parse_frame(message: &[u8]) -> Result<Option<(Channel, &[u8])>, StreamError> {
    match message.split_first() {
        None => Ok(None),
        Some((c, rest)) => Ok(Some((Channel::try_from(*c)?, rest))),
    }
}

/// The payload of a resize message: a terminal of `width` columns and
/// `height` rows.
pub fn resize_payload(width: u16, height: u16) -> Vec<u8> {
    serde_json::json!({ "Width": width, "Height": height })
        .to_string()
        .into_bytes()
}

/// How the error channel said the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The process exited with this code (0 for a `Success` status).
    Exited(i32),
    /// A failure that is not an exit code, with the status's message.
    Failed(String),
}

/// Reads a v4 error-channel status: `{"status":"Success"}`, or a `Failure`
/// whose reason is `NonZeroExitCode` and whose `ExitCode` cause holds the
/// code, or any other failure.
pub fn parse_status(json: &str) -> Result<Ended, StreamError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|source| StreamError::Status {
            json: json.to_owned(),
            source,
        })?;
    if v["status"] == "Success" {
        return Ok(Ended::Exited(0));
    }
    let message = v["message"].as_str().unwrap_or_default().to_owned();
    if v["reason"] != "NonZeroExitCode" {
        return Ok(Ended::Failed(message));
    }
    let code = v["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["reason"] == "ExitCode")
        .find_map(|c| c["message"].as_str()?.parse().ok());
    Ok(code.map_or(Ended::Failed(message), Ended::Exited))
}

/// The WebSocket form of a streaming URL and the `host:port` to dial.
pub fn ws_url(url: &str) -> Result<(String, String), StreamError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| StreamError::Url(url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(StreamError::Url(url.to_owned()));
    }
    Ok((format!("ws://{rest}"), authority.to_owned()))
}

/// What a session collected.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel's payload, as sent.
    pub status_json: String,
    /// The exit code the error channel reported, if it reported one.
    pub exit_code: Option<i32>,
}

impl Outcome {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn summary(&self) -> String {
        format!(
            "stdout {:?}, stderr {:?}, status {:?}",
            self.stdout_str(),
            self.stderr_str(),
            self.status_json
        )
    }
}

/// One Exec or Attach stream.
pub struct Session {
    ws: WebSocket<TcpStream>,
    protocol: String,
    out: Outcome,
    closed: bool,
}

impl Session {
    /// Connects to a streaming URL with [`PROTOCOL_V4`], as kubectl does.
    pub fn connect(url: &str) -> Result<Self, StreamError> {
        Self::connect_with(url, &[PROTOCOL_V4])
    }

    /// Connects offering `protocols` in order of preference.
    pub fn connect_with(url: &str, protocols: &[&str]) -> Result<Self, StreamError> {
        let (ws, protocol) = handshake(url, protocols)?;
        Ok(Self {
            ws,
            protocol,
            out: Outcome::default(),
            closed: false,
        })
    }

    /// The subprotocol the server chose.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// What arrived so far.
    pub fn output(&self) -> &Outcome {
        &self.out
    }

    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.send(encode_frame(Channel::Stdin, data))
    }

    /// Ends stdin, where the subprotocol can say so (v5 only).
    pub fn close_stdin(&mut self) -> Result<(), StreamError> {
        if self.protocol != PROTOCOL_V5 {
            return Err(StreamError::NoHalfClose(self.protocol.clone()));
        }
        self.send(vec![CLOSE_SIGNAL, Channel::Stdin as u8])
    }

    /// Sets the terminal to `width` columns and `height` rows.
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), StreamError> {
        self.send(encode_frame(
            Channel::Resize,
            &resize_payload(width, height),
        ))
    }

    fn send(&mut self, frame: Vec<u8>) -> Result<(), StreamError> {
        self.ws.send(Message::binary(frame))?;
        Ok(())
    }

    /// Reads until `done` holds for what has arrived; fails on `timeout` or
    /// when the server closes the session first.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Outcome) -> bool,
    ) -> Result<&Outcome, StreamError> {
        let deadline = Instant::now() + timeout;
        while !done(&self.out) {
            if self.closed {
                return Err(StreamError::Closed(self.out.summary()));
            }
            self.poll(deadline, timeout)?;
        }
        Ok(&self.out)
    }

    /// Reads until the server closes the session (the process ended), then
    /// reads the exit code from the error channel.
    pub fn run_to_end(mut self, timeout: Duration) -> Result<Outcome, StreamError> {
        let deadline = Instant::now() + timeout;
        while !self.closed {
            self.poll(deadline, timeout)?;
        }
        if !self.out.status_json.is_empty() && self.protocol != PROTOCOL_V1 {
            if let Ended::Exited(code) = parse_status(&self.out.status_json)? {
                self.out.exit_code = Some(code);
            }
        }
        Ok(self.out)
    }

    /// Closes the session from this side (detaches, for Attach), returning
    /// what arrived.
    pub fn close(mut self) -> Result<Outcome, StreamError> {
        if !self.closed {
            match self.ws.close(None) {
                Ok(()) | Err(tungstenite::Error::ConnectionClosed) => {}
                Err(e) => return Err(e.into()),
            }
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            while !self.closed {
                self.poll(deadline, HANDSHAKE_TIMEOUT)?;
            }
        }
        Ok(self.out)
    }

    /// Reads at most one message, waiting at most [`POLL`].
    fn poll(&mut self, deadline: Instant, timeout: Duration) -> Result<(), StreamError> {
        if Instant::now() > deadline {
            return Err(StreamError::Timeout {
                waited: timeout,
                so_far: self.out.summary(),
            });
        }
        let message = match self.ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return Ok(())
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                self.closed = true;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match message {
            Message::Binary(data) => match parse_frame(&data)? {
                Some((Channel::Stdout, p)) => self.out.stdout.extend_from_slice(p),
                Some((Channel::Stderr, p)) => self.out.stderr.extend_from_slice(p),
                Some((Channel::Error, p)) => {
                    self.out.status_json.push_str(&String::from_utf8_lossy(p))
                }
                Some((c @ (Channel::Stdin | Channel::Resize), _)) => {
                    return Err(StreamError::UnknownChannel(c as u8))
                }
                None => {}
            },
            Message::Text(t) => return Err(StreamError::Text(t.to_string())),
            Message::Close(_) => self.closed = true,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Ok(())
    }
}

/// Opens a WebSocket on a streaming URL offering `protocols` in order of
/// preference; returns it with the subprotocol the server chose.
fn handshake(url: &str, protocols: &[&str]) -> Result<(WebSocket<TcpStream>, String), StreamError> {
    let (ws_url, addr) = ws_url(url)?;
    let io = |source| StreamError::Connect {
        addr: addr.clone(),
        source,
    };
    let tcp = TcpStream::connect(&addr).map_err(io)?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    let mut request = ws_url
        .into_client_request()
        .map_err(StreamError::Handshake)?;
    let offered = HeaderValue::from_str(&protocols.join(", "))
        .map_err(|_| StreamError::Url(url.to_owned()))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", offered);
    let (ws, response) = match tungstenite::client(request, tcp) {
        Ok(r) => r,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            return Err(StreamError::Refused {
                status: r.status().as_u16(),
                body: String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
            })
        }
        Err(tungstenite::HandshakeError::Failure(e)) => return Err(StreamError::Handshake(e)),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            return Err(StreamError::Timeout {
                waited: HANDSHAKE_TIMEOUT,
                so_far: "no handshake response".into(),
            })
        }
    };
    // Short reads from here on, so that callers' deadlines hold.
    ws.get_ref().set_read_timeout(Some(POLL)).map_err(io)?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((ws, protocol))
}

/// What one port-forward session brought back: the bytes on the port's
/// data channel and the text on its error channel.
#[derive(Debug, Default)]
pub struct Forwarded {
    pub data: Vec<u8>,
    pub error: String,
}

/// A CRI PortForward session to `port` (the `v4.channel.k8s.io` port-forward
/// protocol, as kubectl speaks it over WebSocket: channel 0 carries the
/// port's data, channel 1 its errors, and the first message of each is the
/// port, two bytes little-endian): sends `request`, then reads until `done`
/// holds for the data, an error arrives, or the server closes.
pub fn port_forward(
    url: &str,
    port: u16,
    request: &[u8],
    timeout: Duration,
    mut done: impl FnMut(&[u8]) -> bool,
) -> Result<Forwarded, StreamError> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let (mut ws, _) = handshake(&format!("{url}{sep}port={port}"), &[PROTOCOL_V4])?;
    let mut frame = vec![0u8];
    frame.extend_from_slice(request);
    ws.send(Message::binary(frame))?;
    let mut got = Forwarded::default();
    let mut seen_port = [false; 2];
    let deadline = Instant::now() + timeout;
    while !done(&got.data) && got.error.is_empty() {
        if Instant::now() > deadline {
            return Err(StreamError::Timeout {
                waited: timeout,
                so_far: String::from_utf8_lossy(&got.data).into_owned(),
            });
        }
        let message = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                continue
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(e) => return Err(e.into()),
        };
        let Message::Binary(data) = message else {
            if matches!(message, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Some((&channel, mut payload)) = data.split_first() else {
            continue;
        };
        let c = usize::from(channel);
        if c > 1 {
            return Err(StreamError::UnknownChannel(channel));
        }
        if !seen_port[c] {
            // The port announcement, then (rarely) data in the same message.
            seen_port[c] = true;
            payload = payload.get(2..).unwrap_or_default();
        }
        if c == 0 {
            got.data.extend_from_slice(payload);
        } else {
            got.error.push_str(&String::from_utf8_lossy(payload));
        }
    }
    let _ = ws.close(None);
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_channel_in_the_first_byte() {
        assert_eq!(encode_frame(Channel::Stdin, b"ls\n"), b"\x00ls\n");
        assert_eq!(
            parse_frame(b"\x02oops").expect("frame"),
            Some((Channel::Stderr, &b"oops"[..]))
        );
        // The server's "streams are up" notice: a channel and no payload.
        assert_eq!(
            parse_frame(b"\x01").expect("frame"),
            Some((Channel::Stdout, &b""[..]))
        );
        assert_eq!(parse_frame(b"").expect("empty message"), None);
        assert!(matches!(
            parse_frame(b"\x09x"),
            Err(StreamError::UnknownChannel(9))
        ));
    }

    #[test]
    fn resize_is_width_and_height_in_json() {
        let v: serde_json::Value = serde_json::from_slice(&resize_payload(100, 40)).expect("json");
        assert_eq!(v, serde_json::json!({"Width": 100, "Height": 40}));
    }

    #[test]
    fn statuses_give_exit_codes() {
        assert_eq!(
            parse_status(r#"{"metadata":{},"status":"Success"}"#).expect("status"),
            Ended::Exited(0)
        );
        let failed = r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 7], exit code 7","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#;
        assert_eq!(parse_status(failed).expect("status"), Ended::Exited(7));
        let internal = r#"{"metadata":{},"status":"Failure","message":"error executing command in container: no such container","reason":"InternalError","details":{"causes":[{"message":"no such container"}]},"code":500}"#;
        assert_eq!(
            parse_status(internal).expect("status"),
            Ended::Failed("error executing command in container: no such container".into())
        );
        // NonZeroExitCode without a readable ExitCode cause is no exit code.
        let garbled = r#"{"status":"Failure","message":"m","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"seven"}]}}"#;
        assert_eq!(
            parse_status(garbled).expect("status"),
            Ended::Failed("m".into())
        );
        assert!(matches!(
            parse_status("command terminated"),
            Err(StreamError::Status { .. })
        ));
    }

    #[test]
    fn streaming_urls_become_websocket_urls() {
        assert_eq!(
            ws_url("http://127.0.0.1:39315/exec/AbC-12").expect("url"),
            (
                "ws://127.0.0.1:39315/exec/AbC-12".to_owned(),
                "127.0.0.1:39315".to_owned()
            )
        );
        assert_eq!(ws_url("ws://[::1]:80/attach/x").expect("url").1, "[::1]:80");
        assert!(matches!(
            ws_url("https://127.0.0.1:1/exec/x"),
            Err(StreamError::Url(_))
        ));
        assert!(matches!(ws_url("http:///exec"), Err(StreamError::Url(_))));
    }

    /// The server side of the handshake: v4 must be what the client offers.
    // The signature is tungstenite's callback's; its error is a response.
    #[allow(clippy::result_large_err)]
    fn pick_v4(
        req: &tungstenite::handshake::server::Request,
        mut resp: tungstenite::handshake::server::Response,
    ) -> Result<
        tungstenite::handshake::server::Response,
        tungstenite::handshake::server::ErrorResponse,
    > {
        let offered = req.headers().get("Sec-WebSocket-Protocol");
        assert_eq!(offered, Some(&HeaderValue::from_static(PROTOCOL_V4)));
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(PROTOCOL_V4),
        );
        Ok(resp)
    }

    #[test]
    fn only_v5_can_close_stdin() {
        // A loopback server that accepts v4; the client must refuse to
        // send the v5 close signal on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            let mut ws = tungstenite::accept_hdr(tcp, pick_v4).expect("server handshake");
            let stdin = ws.read().expect("stdin frame");
            assert_eq!(stdin, Message::binary(b"\x00hi".to_vec()));
            ws.send(Message::binary(b"\x01hi".to_vec()))
                .expect("stdout frame");
            let mut status = vec![Channel::Error as u8];
            status.extend_from_slice(
                br#"{"metadata":{},"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#,
            );
            ws.send(Message::binary(status)).expect("status frame");
            ws.close(None).expect("close");
            while ws.read().is_ok() {}
        });
        let mut s = Session::connect(&format!("http://{addr}/exec/t")).expect("connect");
        assert_eq!(s.protocol(), PROTOCOL_V4);
        assert!(matches!(s.close_stdin(), Err(StreamError::NoHalfClose(p)) if p == PROTOCOL_V4));
        s.send_stdin(b"hi").expect("send");
        let out = s.run_to_end(Duration::from_secs(10)).expect("run");
        server.join().expect("server");
        assert_eq!(out.stdout, b"hi");
        assert_eq!(out.exit_code, Some(3));
    }
}
