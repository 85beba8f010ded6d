//! TCP links: connect (optionally from a chosen local address) and accept.

use std::net::SocketAddr;
use std::time::Duration;

use phalanx_proto::Role;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::driver::NodeHandle;
use crate::link::{authenticate, handshake_for, spawn_link};

/// Opens a TCP connection to `remote`, from `bind` when given, with Nagle off.
pub(crate) async fn connect(remote: SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let socket = if remote.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(b) = bind {
        socket.bind(b)?;
    }
    let stream = socket.connect(remote).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Accepts connections until the node shuts down; each is authenticated before it becomes a
/// link. A connection that fails authentication is closed and logged; nothing else changes.
pub(crate) async fn accept_loop(node: NodeHandle, listener: TcpListener, handshake_timeout: Duration) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = node.closed() => return,
        };
        let Ok((stream, from)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            let hs = handshake_for(&node, Role::Listener, None);
            match authenticate(&mut r, &mut w, hs, handshake_timeout).await {
                Ok((peer, leftover)) => {
                    // The link lives on in its own tasks; nothing to wait for here.
                    drop(spawn_link(&node, r, w, leftover, peer, "tcp", None));
                }
                Err(e) => crate::driver::refuse(&node, &from.to_string(), &e),
            }
        });
    }
}
