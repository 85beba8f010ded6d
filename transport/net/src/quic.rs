//! QUIC links over quinn with mutual TLS: a path is one connection carrying one or more
//! bidirectional streams, each stream a link of its own, on which the same handshake and frames run as on TCP. The TLS
//! handshake refuses any peer whose certificate was not issued by the cluster CA; the link
//! handshake then binds the rank and checks the cluster secret.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use phalanx_proto::Role;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::driver::{NodeError, NodeHandle};
use crate::link::{authenticate, handshake_for, spawn_link, LinkError};
use crate::tls::{TlsError, TlsIdentity, CLUSTER_SERVER_NAME};

/// Flow-control windows large enough that a loopback or datacentre path is not window-bound.
fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(128 << 20));
    t.send_window(128 << 20);
    t.max_concurrent_bidi_streams(16u32.into());
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))));
    // Probe for jumbo datagrams (loopback, datacentre jumbo frames): fewer packets, fewer
    // syscalls and less per-packet crypto overhead. Starts at the safe 1200 bytes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(16_384);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

fn client_config(tls: &TlsIdentity) -> Result<quinn::ClientConfig, NodeError> {
    let crypto = QuicClientConfig::try_from(tls.client_config()?)
        .map_err(|e| NodeError::Tls(TlsError::Config(e.to_string())))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport_config());
    Ok(c)
}

/// A quinn endpoint bound to `bind`, accepting connections when `serve` is set, dialing with
/// the node's client certificate.
pub(crate) fn endpoint(bind: SocketAddr, tls: &TlsIdentity, serve: bool) -> Result<quinn::Endpoint, NodeError> {
    let mut ep = if serve {
        let crypto = QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|e| NodeError::Tls(TlsError::Config(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        quinn::Endpoint::server(server, bind).map_err(|source| NodeError::Bind { addr: bind, source })?
    } else {
        quinn::Endpoint::client(bind).map_err(|source| NodeError::Bind { addr: bind, source })?
    };
    ep.set_default_client_config(client_config(tls)?);
    Ok(ep)
}

/// Dials `remote`. With `bind`, dials from a dedicated endpoint on that address (one per NIC).
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    tls: &TlsIdentity,
    remote: SocketAddr,
    bind: Option<SocketAddr>,
) -> Result<quinn::Connection, LinkError> {
    let io = |e: &dyn std::fmt::Display| LinkError::Io(std::io::Error::other(e.to_string()));
    let ep = match bind {
        Some(b) => {
            let mut ep = quinn::Endpoint::client(b)?;
            ep.set_default_client_config(client_config(tls).map_err(|e| io(&e))?);
            ep
        }
        None => endpoint.clone(),
    };
    ep.connect(remote, CLUSTER_SERVER_NAME).map_err(|e| io(&e))?.await.map_err(|e| {
        if is_tls_refusal(&e) {
            LinkError::TlsRefused(e.to_string())
        } else {
            io(&e)
        }
    })
}

/// Closes `conn` as soon as any of its links is gone (the others on it go with it, and the
/// dialer redials the whole path). The returned receiver completes then.
pub(crate) fn close_on_first(
    conn: quinn::Connection,
    closers: Vec<tokio::sync::oneshot::Receiver<()>>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (any_tx, mut any_rx) = tokio::sync::mpsc::channel::<()>(closers.len().max(1));
    for closed in closers {
        let any_tx = any_tx.clone();
        tokio::spawn(async move {
            let _ = closed.await;
            let _ = any_tx.send(()).await;
        });
    }
    drop(any_tx);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = any_rx.recv().await;
        conn.close(0u32.into(), b"link closed");
        let _ = done_tx.send(());
    });
    done_rx
}

/// Whether a connection failed because TLS refused a certificate (ours or theirs): QUIC carries
/// TLS alerts as transport error codes 0x100..=0x1ff.
fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return false,
    };
    (0x100..=0x1ff).contains(&code)
}

/// Accepts QUIC connections until the node shuts down. Each connection's first stream becomes
/// a link after the link handshake; TLS failures never reach that far.
pub(crate) async fn accept_loop(node: NodeHandle, endpoint: quinn::Endpoint, handshake_timeout: Duration) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = node.closed() => { endpoint.close(0u32.into(), b"shutdown"); return; }
        };
        let Some(incoming) = incoming else { return };
        let node = node.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address().to_string();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => return crate::driver::refuse(&node, &from, &e),
            };
            // Every stream the dialer opens on this connection is a link of its own.
            loop {
                let (mut send, mut recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return, // connection closed: its links are gone too
                };
                let node = node.clone();
                let conn = conn.clone();
                let from = from.clone();
                tokio::spawn(async move {
                    let hs = handshake_for(&node, Role::Listener, None);
                    match authenticate(&mut recv, &mut send, hs, handshake_timeout).await {
                        Ok((peer, leftover)) => {
                            let closed = spawn_link(&node, recv, send, leftover, peer, "quic", None);
                            let _ = closed.await;
                            conn.close(0u32.into(), b"link closed");
                        }
                        Err(e) => {
                            crate::driver::refuse(&node, &from, &e);
                            conn.close(0u32.into(), b"refused");
                        }
                    }
                });
            }
        });
    }
}
