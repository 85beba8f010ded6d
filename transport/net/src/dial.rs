//! Dialers: keep one configured path connected, redialing with backoff when it drops.

use std::time::Duration;

use phalanx_proto::Role;
use tracing::{debug, Instrument};

use crate::driver::{LinkKind, NodeHandle, PathSpec};
use crate::link::{authenticate, handshake_for, spawn_link, LinkError};
use crate::tls::TlsIdentity;

pub(crate) struct Dialer {
    pub node: NodeHandle,
    pub path: PathSpec,
    pub quic: Option<(quinn::Endpoint, TlsIdentity)>,
    pub quic_streams: u32,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub redial_initial: Duration,
    pub redial_max: Duration,
}

impl Dialer {
    pub async fn run(self) {
        let span =
            tracing::info_span!("dial", rank = %self.node.rank(), peer = %self.path.peer, remote = %self.path.remote);
        async move {
            let mut backoff = self.redial_initial;
            loop {
                // A cut path is not dialed until it is restored (or the node shuts down).
                tokio::select! {
                    _ = self.path.faults.wait_restored() => {}
                    _ = self.node.closed() => return,
                }
                match self.connect_once().await {
                    Ok(closed) => {
                        backoff = self.redial_initial;
                        // Wait until the link is gone, then dial again.
                        let _ = closed.await;
                        debug!("link closed; redialing");
                    }
                    Err(e) => {
                        debug!(error = %e, "dial failed");
                        if matches!(
                            e,
                            LinkError::Handshake(_) | LinkError::ClosedDuringHandshake | LinkError::TlsRefused(_)
                        ) {
                            crate::driver::refuse(&self.node, &self.path.remote.to_string(), &e);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.node.closed() => return,
                }
                backoff = (backoff * 2).min(self.redial_max);
            }
        }
        .instrument(span)
        .await
    }

    async fn connect_once(&self) -> Result<tokio::sync::oneshot::Receiver<()>, LinkError> {
        let hs = handshake_for(&self.node, Role::Dialer, Some(self.path.peer));
        let faults = Some(self.path.faults.clone());
        match self.path.kind {
            LinkKind::Tcp => {
                let stream =
                    tokio::time::timeout(self.connect_timeout, crate::tcp::connect(self.path.remote, self.path.bind))
                        .await
                        .map_err(|_| {
                            LinkError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))
                        })??;
                let (mut r, mut w) = stream.into_split();
                let (peer, leftover) = authenticate(&mut r, &mut w, hs, self.handshake_timeout).await?;
                Ok(spawn_link(&self.node, r, w, leftover, peer, "tcp", faults))
            }
            LinkKind::Quic => {
                let Some((endpoint, tls)) = &self.quic else {
                    return Err(LinkError::Io(std::io::Error::other("QUIC path without TLS credentials")));
                };
                let conn = tokio::time::timeout(
                    self.connect_timeout,
                    crate::quic::connect(endpoint, tls, self.path.remote, self.path.bind),
                )
                .await
                .map_err(|_| LinkError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))??;
                // One connection, `quic_streams` streams: each stream is a link of its own.
                let mut closers = Vec::new();
                let mut hs = Some(hs);
                for _ in 0..self.quic_streams.max(1) {
                    let (mut send, mut recv) =
                        conn.open_bi().await.map_err(|e| LinkError::Io(std::io::Error::other(e.to_string())))?;
                    let hs = hs.take().unwrap_or_else(|| handshake_for(&self.node, Role::Dialer, Some(self.path.peer)));
                    let (peer, leftover) = authenticate(&mut recv, &mut send, hs, self.handshake_timeout).await?;
                    closers.push(spawn_link(&self.node, recv, send, leftover, peer, "quic", faults.clone()));
                }
                Ok(crate::quic::close_on_first(conn, closers))
            }
        }
    }
}
