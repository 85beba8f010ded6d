//! A link over any ordered byte stream (TCP connection, QUIC stream, in-memory pipe):
//! authentication, then a reader task that decodes frames and a writer task that encodes them.
//! The link knows nothing of sessions: it moves frames between the socket and the endpoint task.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use phalanx_proto::{
    DecodeError, Frame, FrameDecoder, FrameKind, Handshake, HandshakeError, HandshakeStep, LinkId, LinkIdentity,
    RankId, Role,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::faults::{PathFaults, WriteVerdict};

/// Bytes read per socket read at least (the buffer grows to a whole frame when one is larger).
const READ_CHUNK: usize = 256 << 10;
/// Write buffer for small frames; large payloads bypass it.
const WRITE_BUFFER: usize = 256 << 10;

/// Why a link could not be set up.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer failed authentication or spoke another protocol.
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    /// The peer closed the connection during the handshake (often: it refused our
    /// credentials).
    #[error("peer closed the connection during the handshake (it may have refused our credentials)")]
    ClosedDuringHandshake,
    /// TLS refused the peer's certificate, or the peer refused ours.
    #[error("TLS refused the connection: {0}")]
    TlsRefused(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
}

/// Runs the authentication handshake. Returns the authenticated peer and any bytes that arrived
/// after it (the first frames).
pub(crate) async fn authenticate<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut hs: Handshake,
    timeout: Duration,
) -> Result<(LinkIdentity, BytesMut), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let run = async {
        writer.write_all(&hs.hello()).await?;
        writer.flush().await?;
        let mut buf = BytesMut::with_capacity(256);
        loop {
            if !buf.is_empty() {
                match hs.handle_bytes(&mut buf)? {
                    HandshakeStep::Continue(out) => {
                        if !out.is_empty() {
                            writer.write_all(&out).await?;
                            writer.flush().await?;
                        }
                    }
                    HandshakeStep::Authenticated { peer, send } => {
                        if !send.is_empty() {
                            writer.write_all(&send).await?;
                            writer.flush().await?;
                        }
                        return Ok((peer, buf));
                    }
                }
            }
            if reader.read_buf(&mut buf).await? == 0 {
                return Err(LinkError::ClosedDuringHandshake);
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(LinkError::HandshakeTimeout(timeout)),
    }
}

/// What link tasks tell the endpoint task.
#[derive(Debug)]
pub(crate) enum LinkInput {
    Frame(LinkId, Frame),
    DecodeError(LinkId, DecodeError),
    Closed(LinkId),
}

/// Reads frames until the stream ends or fails; reports each to the endpoint task.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut buf: BytesMut,
    link: LinkId,
    decoder: FrameDecoder,
    faults: Option<PathFaults>,
    to_endpoint: mpsc::UnboundedSender<crate::driver::Command>,
) {
    let send = |input: LinkInput| to_endpoint.send(crate::driver::Command::Link(input)).is_ok();
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if !send(LinkInput::Frame(link, frame)) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_recoverable() => {
                    if !send(LinkInput::DecodeError(link, e)) {
                        return;
                    }
                }
                Err(e) => {
                    debug!(%link, error = %e, "fatal decode error");
                    send(LinkInput::DecodeError(link, e));
                    return;
                }
            }
        }
        let need = decoder.bytes_needed(&buf).saturating_sub(buf.len());
        buf.reserve(need.max(READ_CHUNK));
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                send(LinkInput::Closed(link));
                return;
            }
            Ok(_) => {
                if faults.as_ref().is_some_and(|f| f.discard_reads()) {
                    buf.clear();
                }
            }
        }
    }
}

/// Writes frames from `frames` until the channel closes (the endpoint dropped the link) or the
/// socket fails.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    writer: W,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    link: LinkId,
    faults: Option<PathFaults>,
    to_endpoint: mpsc::UnboundedSender<crate::driver::Command>,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let mut held: Option<([u8; phalanx_proto::frame::HEADER_LEN], Bytes)> = None;
    let result: io::Result<()> = async {
        while let Some(frame) = frames.recv().await {
            let header = frame.encode_header();
            let mut payload = frame.payload;
            if let Some(f) = &faults {
                let delay = f.delay();
                if !delay.is_zero() {
                    w.flush().await?;
                    tokio::time::sleep(delay).await;
                }
                let is_data = frame.header.kind == FrameKind::Data;
                match f.on_write(is_data, (header.len() + payload.len()) as u64, payload.len()) {
                    WriteVerdict::Write => {}
                    WriteVerdict::Discard => continue,
                    WriteVerdict::Corrupt(i) => {
                        let mut copy = BytesMut::from(&payload[..]);
                        copy[i] ^= 0x20;
                        payload = copy.freeze();
                    }
                    WriteVerdict::Hold => {
                        if let Some((h, p)) = held.take() {
                            w.write_all(&header).await?;
                            w.write_all(&payload).await?;
                            w.write_all(&h).await?;
                            w.write_all(&p).await?;
                        } else {
                            held = Some((header, payload));
                        }
                        if frames.is_empty() {
                            if let Some((h, p)) = held.take() {
                                w.write_all(&h).await?;
                                w.write_all(&p).await?;
                            }
                            w.flush().await?;
                        }
                        continue;
                    }
                }
            }
            w.write_all(&header).await?;
            w.write_all(&payload).await?;
            if frames.is_empty() {
                w.flush().await?;
            }
        }
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        let _ = to_endpoint.send(crate::driver::Command::Link(LinkInput::Closed(link)));
    }
}

/// Starts the reader and writer tasks of an authenticated link and registers it with the
/// endpoint task. Returns a receiver that completes when the link is gone.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_link<R, W>(
    node: &crate::driver::NodeHandle,
    reader: R,
    writer: W,
    leftover: BytesMut,
    peer: LinkIdentity,
    kind: &'static str,
    faults: Option<PathFaults>,
) -> tokio::sync::oneshot::Receiver<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let link = node.allocate_link_id();
    let span = tracing::info_span!("link", rank = %node.rank(), %link, peer = %peer.rank, kind);
    let (frame_tx, frame_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let decoder = FrameDecoder::new(node.max_payload());
    let to_endpoint = node.command_sender();
    let reader_task = tokio::spawn(
        read_loop(reader, leftover, link, decoder, faults.clone(), to_endpoint.clone()).instrument(span.clone()),
    );
    tokio::spawn(write_loop(writer, frame_rx, link, faults, to_endpoint.clone()).instrument(span));
    let _ = to_endpoint.send(crate::driver::Command::LinkUp {
        link,
        peer,
        writer: frame_tx,
        reader: reader_task.abort_handle(),
        closed: closed_tx,
    });
    closed_rx
}

/// The rank a dialer expects on the other end.
pub(crate) fn handshake_for(node: &crate::driver::NodeHandle, role: Role, expected: Option<RankId>) -> Handshake {
    Handshake::new(role, node.identity(), expected, node.secret(), node.nonce())
}
