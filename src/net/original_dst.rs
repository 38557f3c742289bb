//! Where a redirected connection was going: the destination before the nat table's
//! REDIRECT rewrote it (`SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The original destination of `stream`, accepted on `local`; `None` when the kernel
/// tracks none (no nat rules in this namespace). A connection made straight to the
/// listener reports its own local address: callers compare.
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> io::Result<Option<SocketAddr>> {
    let sock = socket2::SockRef::from(stream);
    // An IPv4 connection on a dual-stack socket shows as ::ffff:a.b.c.d and answers
    // only the IPv4 option.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let res = if v4 {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match res {
        Ok(addr) => Ok(addr.as_socket()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
