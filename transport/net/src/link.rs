//! A link over any ordered byte stream (TCP connection, QUIC stream, in-memory pipe):
//! authentication, then a reader task that decodes frames and a writer task that encodes them.
//! The link knows nothing of sessions: it moves frames between the socket and the endpoint task.

use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use phalanx_proto::{
    frame::HEADER_LEN, DecodeError, Frame, FrameDecoder, FrameKind, Handshake, HandshakeError, HandshakeStep, LinkId,
    LinkIdentity, RankId, Role,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::faults::{PathFaults, WriteVerdict};
use crate::recv_pool::RecvPool;

/// Bytes read per socket read at least, for headers and small frames.
const READ_CHUNK: usize = 64 << 10;
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

/// Payloads at least this large are read straight into a pooled buffer of their own.
const DIRECT_READ: usize = 64 << 10;
/// Idle receive buffers kept per link.
const POOL_BUFFERS: usize = 64;

/// Reads frames until the stream ends or fails; reports each to the endpoint task.
///
/// Small frames are split off a shared read buffer without copying; large payloads are read
/// directly into a pooled buffer (one copy, from the kernel). Checksums are verified here, so
/// the endpoint only ever sees intact frames.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut buf: BytesMut,
    link: LinkId,
    decoder: FrameDecoder,
    faults: Option<PathFaults>,
    to_endpoint: mpsc::UnboundedSender<crate::driver::Command>,
) {
    let send = |input: LinkInput| to_endpoint.send(crate::driver::Command::Link(input)).is_ok();
    let pool = RecvPool::new(POOL_BUFFERS);
    let discard = || faults.as_ref().is_some_and(|f| f.discard_reads());
    loop {
        // Small frames: decode whatever the buffer holds.
        loop {
            if buf.len() >= HEADER_LEN {
                match decoder.decode_header(&buf) {
                    Ok((_, len, _)) if len as usize >= DIRECT_READ => break,
                    Ok(_) => {}
                    Err(e) => {
                        debug!(%link, error = %e, "fatal decode error");
                        send(LinkInput::DecodeError(link, e));
                        return;
                    }
                }
            }
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
        // A large frame: its header is buffered; read the payload into a buffer of its own.
        if buf.len() >= HEADER_LEN {
            let Ok((header, len, crc)) = decoder.decode_header(&buf) else { unreachable!("checked above") };
            let head = buf.split_to(HEADER_LEN);
            let len = len as usize;
            let mut payload = pool.take(len);
            let have = buf.len().min(len);
            payload.as_mut_slice()[..have].copy_from_slice(&buf[..have]);
            buf.advance(have);
            if have < len && reader.read_exact(&mut payload.as_mut_slice()[have..]).await.is_err() {
                send(LinkInput::Closed(link));
                return;
            }
            if discard() {
                buf.clear();
                continue;
            }
            let input = match FrameDecoder::verify(&head, payload.as_ref(), crc) {
                Ok(()) => LinkInput::Frame(link, Frame { header, payload: payload.freeze(), payload_crc: None }),
                Err(e) => LinkInput::DecodeError(link, e),
            };
            if !send(input) {
                return;
            }
            continue;
        }
        buf.reserve(READ_CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                send(LinkInput::Closed(link));
                return;
            }
            Ok(_) => {
                if discard() {
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
                        // Swap each pair: hold one frame, write it after the next.
                        match held.take() {
                            Some((h, p)) => {
                                write_frame(&mut w, &header, &payload).await?;
                                write_frame(&mut w, &h, &p).await?;
                            }
                            None => held = Some((header, payload)),
                        }
                        if frames.is_empty() {
                            if let Some((h, p)) = held.take() {
                                write_frame(&mut w, &h, &p).await?;
                            }
                            w.flush().await?;
                        }
                        continue;
                    }
                }
            }
            write_frame(&mut w, &header, &payload).await?;
            // A frame held for reordering goes out after this one (reordering was switched off).
            if let Some((h, p)) = held.take() {
                write_frame(&mut w, &h, &p).await?;
            }
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

/// Payloads at least this large skip the write buffer: header and payload go out in one
/// vectored write, without copying the payload.
const DIRECT_WRITE: usize = 64 << 10;

/// Writes one encoded frame: small ones through the buffer, large ones with a vectored write.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, header: &[u8], payload: &[u8]) -> io::Result<()> {
    if payload.len() < DIRECT_WRITE {
        w.write_all(header).await?;
        return w.write_all(payload).await;
    }
    w.flush().await?;
    let inner = w.get_mut();
    let (mut h, mut p) = (header, payload);
    while !h.is_empty() || !p.is_empty() {
        let n = if h.is_empty() {
            inner.write(p).await?
        } else {
            inner.write_vectored(&[io::IoSlice::new(h), io::IoSlice::new(p)]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < h.len() {
            h = &h[n..];
        } else {
            p = &p[n - h.len()..];
            h = &[];
        }
    }
    Ok(())
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
