//! `svidcar wait`: blocks until the local sidecar says it is ready, for images that
//! cannot use native sidecars (`svidcar wait && exec app`). Plain blocking HTTP/1.1 on
//! the admin port: nothing to start, nothing to clean up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::anyhow;

/// How often `/ready` is asked.
const INTERVAL: Duration = Duration::from_millis(200);

/// The longest one answer may take (a stuck admin port must not hang the wait).
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks `GET /ready` every [`INTERVAL`] until it answers 200 or `timeout` passes; the
/// error names the last answer.
pub fn run(admin: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        let last = match ask(admin) {
            Ok((200, _)) => {
                println!("svidcar at {admin} is ready");
                return Ok(());
            }
            Ok((code, body)) => format!("{code} {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() + INTERVAL > end {
            return Err(anyhow!(
                "svidcar at {admin} not ready after {}: last answer: {last}",
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(INTERVAL);
    }
}

/// One `GET /ready`: (status, body).
fn ask(admin: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, ASK_TIMEOUT)?;
    s.set_read_timeout(Some(ASK_TIMEOUT))?;
    s.set_write_timeout(Some(ASK_TIMEOUT))?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    s.take(64 * 1024).read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.chars().take(200).collect()))
}
