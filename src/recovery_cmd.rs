//! `phalanx state-source` (hidden; used by tests and benchmarks of live recovery): one healthy
//! rank offering a deterministic training state — one buffer named `params` of `--bytes`
//! bytes generated from `--seed` — to recovering ranks until it is stopped.

use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Args;
use phalanx_net::{Node, NodeConfig};
use phalanx_node::recovery::serve_state;
use phalanx_proto::RankId;
use phalanx_runtime::recovery::StateServer;
use serde_json::json;

use crate::size::parse_size;

/// Arguments of `phalanx state-source`.
#[derive(Args, Debug)]
pub struct StateSourceArgs {
    /// This rank's id on the transport.
    #[arg(long)]
    pub rank: u32,
    /// TCP address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Size of the `params` buffer: 4096, 64MiB, 1GiB, ...
    #[arg(long, value_parser = parse_size)]
    pub bytes: u64,
    /// Seed of the buffer's contents (see [`fill`]).
    #[arg(long)]
    pub seed: u64,
    /// Training step the state is announced at.
    #[arg(long, default_value_t = 0)]
    pub step: u64,
    /// Cluster secret (every link proves it).
    #[arg(long, default_value = "phalanx-dev-secret")]
    pub secret: String,
}

/// Fills `buf` deterministically from `seed`: the little-endian bytes of the splitmix64
/// sequence started at `seed` (a tail shorter than 8 bytes takes the first bytes of the next
/// word). Generated in 4 KiB blocks of words, so it is fast even unoptimised (about 0.3 s per
/// GiB in a debug build); `tests/live_recovery.rs` carries a copy to check against.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed;
    let mut words = [0u64; 512];
    for out in buf.chunks_mut(8 * 512) {
        for w in words.iter_mut() {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *w = (z ^ (z >> 31)).to_le();
        }
        // SAFETY: `words` is 4096 initialised bytes (u64 has no padding, u8 needs no
        // alignment), borrowed only for this copy; `out` is at most 4096 bytes.
        let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 8 * words.len()) };
        out.copy_from_slice(&bytes[..out.len()]);
    }
}

/// Runs `phalanx state-source` until SIGTERM, Ctrl-C or SIGKILL.
pub async fn run(a: StateSourceArgs) -> Result<(), String> {
    let len = usize::try_from(a.bytes).map_err(|_| format!("--bytes {} does not fit in memory", a.bytes))?;
    let started = std::time::Instant::now();
    let mut params = vec![0u8; len];
    fill(&mut params, a.seed);
    let generated_ms = started.elapsed().as_millis() as u64;
    let server =
        StateServer::new(a.step, vec![("params".to_string(), Bytes::from(params))]).map_err(|e| e.to_string())?;
    let mut config = NodeConfig::new(RankId(a.rank), a.secret.into_bytes());
    config.tcp_listen = vec![a.listen];
    let mut node = Node::start(config).await.map_err(|e| e.to_string())?;
    let addr = node.tcp_addrs().first().copied().unwrap_or(a.listen);
    println!(
        "{}",
        json!({"event": "listening", "addr": addr.to_string(), "rank": a.rank, "bytes": a.bytes, "generated_ms": generated_ms})
    );
    let _ = std::io::stdout().flush();
    let shutdown = crate::shutdown_requested();
    let served = serve_state(&mut node, server, shutdown).await.map_err(|e| e.to_string())?;
    println!("{}", json!({"event": "stopped", "chunks": served.chunks, "bytes": served.bytes}));
    Ok(())
}
