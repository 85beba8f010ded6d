//! The `phalanx` command: demo, bench, and the process-level tools built on the library.

mod bench;
mod bench_collective;
mod bench_membership;
mod coordinator_cmd;
mod demo;
mod demo_membership;
mod demo_training;
mod experiment_cmd;
mod launch_cmd;
mod mlp;
mod node_cmd;
mod recovery_cmd;
mod sim_cmd;
mod size;
mod train_worker;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// How a command failed: bad arguments (exit status 2, like clap's own errors) or a failure
/// while running (exit status 1).
#[derive(Debug)]
pub enum CliError {
    /// The arguments make no sense; nothing was done.
    Usage(String),
    /// The command ran and failed.
    Failed(String),
}

impl From<String> for CliError {
    fn from(e: String) -> Self {
        CliError::Failed(e)
    }
}

/// Phalanx: a communication runtime for distributed training that keeps going while links and
/// ranks fail.
#[derive(Parser, Debug)]
#[command(name = "phalanx", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Three ranks on loopback streaming data while paths fail, relay and heal; then elastic ranks with an embedded coordinator.
    Demo(demo::DemoArgs),
    /// Benchmarks in the baselines' format: p2p and the collectives.
    Bench(bench::BenchArgs),
    /// Run a scenario in the deterministic failure-injection simulator.
    Sim(sim_cmd::SimArgs),
    /// Run one transport rank as a process, driven by stdin commands (JSON lines out).
    Node(node_cmd::NodeArgs),
    /// Run one member of the Raft coordinator group (durable log in --data-dir).
    Coordinator(coordinator_cmd::CoordinatorArgs),
    /// Experiments with figures: `semisync` compares synchronous DP, DiLoCo and streaming DiLoCo.
    Experiment(experiment_cmd::ExperimentArgs),
    /// Start N local ranks of a training command, restarting ranks that die (like torchrun).
    Launch(launch_cmd::LaunchArgs),
    /// Talk to the coordinator group: print the view, join, leave, report a failure, begin an epoch.
    Membership(coordinator_cmd::MembershipArgs),
    /// One rank of a benchmark (spawned by `phalanx bench`).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
    /// One rank of a collective benchmark (spawned by `phalanx bench`).
    #[command(hide = true)]
    CollWorker(bench_collective::CollWorkerArgs),
    /// One rank of the training demo (spawned by `phalanx demo`).
    #[command(hide = true)]
    TrainWorker(train_worker::TrainWorkerArgs),
    /// One healthy rank serving a deterministic training state to recovering ranks (tests).
    #[command(hide = true)]
    StateSource(recovery_cmd::StateSourceArgs),
}

/// Keeps freed memory in the process instead of handing it back to the kernel at once.
///
/// Collectives allocate and free buffers of tens of MiB every step; with glibc's defaults each
/// such buffer is a fresh `mmap` (or a heap top that is trimmed on free), so every step pays
/// for faulting in and zeroing every page again. Measured here (64 MiB all-reduce, world 2,
/// TCP): 153–171 ms with the defaults, 92–94 ms with these settings (docs/performance.md).
/// Trainers linking the libraries get the same by setting `MALLOC_TRIM_THRESHOLD_`,
/// `MALLOC_TOP_PAD_` and `MALLOC_MMAP_THRESHOLD_` or by using a caching allocator.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("PHALANX_LOG").unwrap_or_else(|_| EnvFilter::new("error")))
        .with_writer(std::io::stderr)
        .init();
    // The simulator is single-threaded and needs no async runtime.
    let cli = match cli.command {
        Command::Sim(a) => exit_with(sim_cmd::run_sim(a)),
        other => Cli { command: other },
    };
    // A process that only communicates (a benchmark rank, a state source) runs its node and
    // its command on one thread by default: every message passes the caller, the endpoint task
    // and the link tasks, and on a multi-threaded runtime each hand-off between them can be a
    // cross-thread wake-up (a futex each way); one thread measured 1.2-1.7x faster at the
    // sizes tried (docs/performance.md). A process that also computes (`node`, `train-worker`) keeps
    // the multi-threaded runtime: on one thread its computation would hold up the transport's
    // heartbeats and acknowledgements, and its communicator's background task. PHALANX_THREADS=N
    // overrides it for every command (1: one thread; more: that many workers).
    let threads = std::env::var("PHALANX_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0);
    let communicates_only =
        matches!(cli.command, Command::BenchWorker(_) | Command::CollWorker(_) | Command::StateSource(_));
    let one_thread = threads == Some(1) || (threads.is_none() && communicates_only);
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(n) = threads.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("phalanx: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // On the multi-threaded runtime the command is `block_on`'s own future, which runs on the
    // main thread, apart from the workers that run the node's tasks: a command that computes
    // for long (`node` filling a 64 MiB contribution in a debug build) cannot hold up a worker
    // and the transport tasks queued on it (spawning it there starved a peer's heartbeats past
    // the 1.5 s link timeout in `tests/collectives_processes.rs`, once in two CI runs). On the
    // current-thread runtime it is a spawned task like the node's: `block_on`'s future polled
    // between them made the 4 KiB all-reduce bimodal (21 or 53 us per run, against 21 us).
    let command = async move {
        match cli.command {
            Command::Demo(a) => {
                if a.ranks < 4 || a.every == 0 || a.fragments == 0 || !(a.lr > 0.0 && a.lr.is_finite()) {
                    return Err(CliError::Usage(
                        "--ranks must be at least 4, --every and --fragments at least 1, --lr positive".into(),
                    ));
                }
                demo::run(a).await.map_err(CliError::from)
            }
            Command::Bench(a) => bench::run(a).await,
            Command::Node(a) => node_cmd::run(a).await.map_err(CliError::from),
            Command::Coordinator(a) => coordinator_cmd::run(a).await,
            Command::Membership(a) => coordinator_cmd::membership(a).await,
            Command::Launch(a) => launch_cmd::run(a).await,
            Command::Experiment(a) => experiment_cmd::run(a).await,
            Command::BenchWorker(a) => bench::worker(a).await.map_err(CliError::from),
            Command::CollWorker(a) => bench_collective::worker(a).await.map_err(CliError::from),
            Command::TrainWorker(a) => train_worker::run(a).await.map_err(CliError::from),
            Command::StateSource(a) => recovery_cmd::run(a).await.map_err(CliError::from),
            Command::Sim(_) => unreachable!("handled above"),
        }
    };
    let result = if one_thread {
        runtime.block_on(async move {
            tokio::spawn(command)
                .await
                .unwrap_or_else(|e| Err(CliError::Failed(format!("the command's task failed: {e}"))))
        })
    } else {
        runtime.block_on(command)
    };
    // Do not wait for background tasks (dialers, link tasks) to wind down.
    runtime.shutdown_background();
    exit_with(result)
}

/// Resolves on SIGTERM or Ctrl-C (the long-running commands stop cleanly on either).
pub async fn shutdown_requested() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Exits with the status `result` calls for (0, 1 for a failure, 2 for bad usage).
fn exit_with(result: Result<(), CliError>) -> ! {
    match result {
        Ok(()) => std::process::exit(0),
        Err(CliError::Usage(e)) => {
            eprintln!("phalanx: {e}");
            std::process::exit(2);
        }
        Err(CliError::Failed(e)) => {
            eprintln!("phalanx: {e}");
            std::process::exit(1);
        }
    }
}
