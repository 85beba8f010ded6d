//! The training part of `phalanx demo` (issue #6): an embedded coordinator and `--ranks` local
//! rank processes (`phalanx train-worker`) in two "data centres" on loopback train the small
//! model of [`crate::mlp`] semi-synchronously — synchronous inside each data centre, streaming
//! DiLoCo between the two (see [`crate::train_worker`]) — while the demo injects faults: a straggler
//! from the start, a rank SIGKILLed and restarted (it rejoins and recovers the state from its
//! peers), and the link between the data centres cut and restored. It shows progress every
//! second and ends with a summary and an SVG plot of loss and events over time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use phalanx_node::coordinator::{run_coordinator, ServerConfig};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::bench::BenchCompression;
use crate::train_worker::OuterAlgorithm;

const SECRET: &str = "phalanx-demo-training";

/// How the training demo runs.
#[derive(Clone, Debug)]
pub struct TrainingDemo {
    /// Rank processes (split evenly over two data centres).
    pub ranks: usize,
    /// Inner steps.
    pub steps: u64,
    /// Inner steps between syncs of one fragment.
    pub every: u64,
    /// Fragments of streaming DiLoCo.
    pub fragments: usize,
    /// What runs across the data centres.
    pub algorithm: OuterAlgorithm,
    /// Inner learning rate.
    pub lr: f32,
    /// Inject faults.
    pub faults: bool,
    /// Where to write the SVG plot.
    pub plot: PathBuf,
    /// The data, initialisation and optimizer settings.
    pub learning: Learning,
    /// Print only the summary (no progress lines, no plot); for `phalanx experiment`.
    pub quiet: bool,
}

/// What is trained and how: the demo's defaults, or an experiment's budget.
#[derive(Clone, Debug)]
pub struct Learning {
    /// Training examples per rank.
    pub shard: usize,
    /// Varies every seed of the run (initialisation, shards, batch order); 0: the demo's.
    pub seed: u64,
    /// Seed `s` shifts each seed by `s` times this.
    pub seed_stride: u64,
    /// Cosine learning-rate decay to 0 over the run (else constant).
    pub cosine: bool,
    /// Outer optimizer (default: DiLoCo's 0.7 and 0.9).
    pub outer_lr: Option<f32>,
    /// Outer Nesterov momentum.
    pub outer_momentum: Option<f32>,
    /// The straggler sleeps this long on every `straggle_every`-th step.
    pub straggle_ms: u64,
    /// See `straggle_ms`.
    pub straggle_every: u64,
    /// How outer gradients cross the WAN.
    pub compression: BenchCompression,
}

impl Default for Learning {
    /// The demo's: 1,024 examples a rank, constant lr, DiLoCo's outer defaults, a straggler
    /// sleeping 40 ms every third step.
    fn default() -> Learning {
        Learning {
            shard: 1024,
            seed: 0,
            seed_stride: 1000,
            cosine: false,
            outer_lr: None,
            outer_momentum: None,
            straggle_ms: 40,
            straggle_every: 3,
            compression: BenchCompression::Int8,
        }
    }
}

/// How a training run ended ([`run`] fails unless every rank trained to the end, agrees on
/// the model and balanced its ledgers).
#[derive(Clone, Debug)]
pub struct TrainingOutcome {
    /// Eval loss of the synced model (the same on every rank).
    pub eval_loss: f64,
    /// Bytes sent by all ranks, and across the WAN (transport counters, every epoch).
    pub bytes: u64,
    /// See `bytes`.
    pub wan_bytes: u64,
    /// Rounds that failed, and of those, rounds that ran out of time (their deadline passed).
    pub failed_rounds: u64,
    /// See `failed_rounds`.
    pub deadline_rounds: u64,
    /// Cross-DC and in-DC contributions: offered, applied, carried at the end, dropped.
    pub contributions: [u64; 4],
    /// Wall time.
    pub wall_s: f64,
}

fn free_addr() -> Result<SocketAddr, String> {
    phalanx_net::free_loopback_addr().map_err(|e| format!("no free port: {e}"))
}

struct Worker {
    dc: u32,
    host: String,
    listen: SocketAddr,
    state: SocketAddr,
    straggle_ms: u64,
    starts: u32,
    child: Option<Child>,
    done: Option<Value>,
    recovered: Option<Value>,
}

/// Runs the training demo; an error if training did not finish on every rank or a fault was
/// not survived.
pub async fn run(demo: TrainingDemo) -> Result<TrainingOutcome, String> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("phalanx-demo-training-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let coordinators = vec![(1u64, free_addr()?)];
    let mut config = ServerConfig::new(1, coordinators.clone(), dir.join("coordinator"), SECRET.as_bytes().to_vec());
    config.tick = Duration::from_millis(20);
    config.failure_timeout = Duration::from_secs(3);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(run_coordinator(config, |_| {}, async {
        let _ = stopped.await;
    }));
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let per_dc = demo.ranks.div_ceil(2);
    let mut workers = Vec::new();
    for i in 0..demo.ranks {
        workers.push(Worker {
            dc: (i / per_dc) as u32,
            host: format!("worker-{i}"),
            listen: free_addr()?,
            state: free_addr()?,
            straggle_ms: if demo.faults && i == 1 { demo.learning.straggle_ms } else { 0 },
            starts: 0,
            child: None,
            done: None,
            recovered: None,
        });
    }
    if !demo.quiet {
        describe(&demo);
    }
    let (tx, mut lines) = mpsc::unbounded_channel::<(usize, Value)>();
    let l = &demo.learning;
    let seeds = l.seed * l.seed_stride;
    let spawn = |w: &mut Worker, i: usize| -> Result<(), String> {
        w.starts += 1;
        let coord = format!("1={}", coordinators[0].1);
        let mut cmd = Command::new(&exe);
        cmd.arg("train-worker")
            .args(["--coordinators", &coord, "--secret", SECRET, "--dc", &w.dc.to_string(), "--host", &w.host])
            .args(["--listen", &w.listen.to_string(), "--state-listen", &w.state.to_string()])
            .args(["--incarnation", &(u64::from(w.starts) * 1000 + i as u64).to_string()])
            .args(["--start-world", &demo.ranks.to_string(), "--steps", &demo.steps.to_string()])
            .args(["--every", &demo.every.to_string(), "--fragments", &demo.fragments.to_string()])
            .args(["--algorithm", demo.algorithm.name(), "--lr", &demo.lr.to_string()])
            .args(["--straggle-ms", &w.straggle_ms.to_string(), "--report-every", "10"])
            .args(["--straggle-every", &l.straggle_every.to_string(), "--shard", &l.shard.to_string()])
            .args(["--init-seed", &(7 + seeds).to_string(), "--data-seed", &(100 + i as u64 + seeds).to_string()])
            // A restarted process draws other batches than its first life.
            .args(["--batch-seed", &(i as u64 + seeds + 100_000 * u64::from(w.starts - 1)).to_string()])
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(dir.join(format!("worker-{i}-{}.log", w.starts)))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .kill_on_drop(true);
        if l.cosine {
            cmd.arg("--cosine");
        }
        cmd.args(["--compression", &format!("{:?}", l.compression).to_lowercase()]);
        if let Some(x) = l.outer_lr {
            cmd.args(["--outer-lr", &x.to_string()]);
        }
        if let Some(x) = l.outer_momentum {
            cmd.args(["--outer-momentum", &x.to_string()]);
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start a worker: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((i, v));
                }
            }
        });
        w.child = Some(child);
        Ok(())
    };
    for (i, w) in workers.iter_mut().enumerate() {
        spawn(w, i)?;
    }

    let victim = demo.ranks - 1;
    let (mut killed_at, mut restart_at, mut cut_at): (Option<Instant>, Option<Instant>, Option<Instant>) =
        (None, None, None);
    let mut events: Vec<(f64, String)> = Vec::new();
    let mut latest: BTreeMap<usize, Value> = BTreeMap::new();
    let mut loss_points: Vec<(f64, f64)> = Vec::new();
    let (mut round_failures, mut deadline_failures) = (0u64, 0u64);
    let mut max_epoch = 0u64;
    // Faults are checked four times a second (a short run must not outpace them); progress is
    // printed once a second.
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u64;
    let say = |line: String| {
        if !demo.quiet {
            println!("{line}");
        }
    };
    // Four minutes, plus time for long runs (the experiment's are 2,000 steps and more).
    let deadline = started + Duration::from_secs(240) + Duration::from_millis(50 * demo.steps);
    let t = |at: Instant| at.duration_since(started).as_secs_f64();
    loop {
        tokio::select! {
            Some((i, v)) = lines.recv() => {
                match v["event"].as_str() {
                    Some("step") => {
                        max_epoch = max_epoch.max(v["epoch"].as_u64().unwrap_or(0));
                        latest.insert(i, v);
                    }
                    Some("epoch") | Some("joined") => {
                        let e = v["epoch"].as_u64().unwrap_or(0);
                        if e > max_epoch {
                            max_epoch = e;
                            events.push((t(Instant::now()), format!("epoch {e}: world {}", v["world"])));
                        }
                    }
                    Some("recovered") => {
                        say(format!("  worker {i} rejoined at step {} and recovered {} bytes of state from {} peers in {} ms",
                            v["step"], v["bytes"], v["sources"], v["ms"]));
                        events.push((t(Instant::now()), "recovered".into()));
                        workers[i].recovered = Some(v);
                    }
                    Some("round_failed") => {
                        say(format!("  worker {i}: a {} round failed at step {}: {}", v["scope"].as_str().unwrap_or("?"), v["step"], v["error"].as_str().unwrap_or("?")));
                        round_failures += 1;
                        deadline_failures += u64::from(v["deadline"].as_bool() == Some(true));
                    }
                    Some("done") => workers[i].done = Some(v),
                    _ => {}
                }
            }
            _ = ticker.tick() => {
                // Worker exits: done, or died — restart (a supervisor's job).
                for (i, w) in workers.iter_mut().enumerate() {
                    let status = match w.child.as_mut().map(|c| c.try_wait()) {
                        Some(Ok(Some(s))) => s,
                        _ => continue,
                    };
                    w.child = None;
                    if status.success() {
                        continue;
                    }
                    if w.starts >= 4 {
                        return Err(format!("worker {i} keeps failing ({status}); logs in {}", dir.display()));
                    }
                    if i == victim && killed_at.is_some() && restart_at.is_none() {
                        continue; // the planned kill: restarted below after a pause
                    }
                    say(format!("  worker {i} exited ({status}); restarting it"));
                    spawn(w, i)?;
                }
                let steps: Vec<u64> = latest.values().filter_map(|v| v["step"].as_u64()).collect();
                let max_step = steps.iter().copied().max().unwrap_or(0);
                let losses: Vec<f64> = latest.values().filter_map(|v| v["loss"].as_f64()).collect();
                let loss = if losses.is_empty() { f64::NAN } else { losses.iter().sum::<f64>() / losses.len() as f64 };
                let bytes: u64 = latest.values().filter_map(|v| v["bytes"].as_u64()).sum();
                let wan: u64 = latest.values().filter_map(|v| v["wan_bytes"].as_u64()).sum();
                let world = latest.values().filter(|v| v["epoch"].as_u64() == Some(max_epoch)).filter_map(|v| v["world"].as_u64()).max().unwrap_or(0);
                let live = workers.iter().filter(|w| w.child.is_some()).count();
                if loss.is_finite() {
                    loss_points.push((t(Instant::now()), loss));
                }
                ticks += 1;
                if ticks % 4 == 1 {
                    say(format!("  t {:>5.1} s  step {:>4}/{}  loss {:.3}  epoch {}  world {}  live processes {}/{}  sent {:.1} MB (WAN {:.2} MB)",
                        t(Instant::now()), max_step, demo.steps, loss, max_epoch, world, live, demo.ranks, bytes as f64 / 1e6, wan as f64 / 1e6));
                }
                // The faults, by progress.
                if demo.faults {
                    if killed_at.is_none() && max_step * 10 >= demo.steps * 3 {
                        if let Some(c) = workers[victim].child.as_mut() {
                            let _ = c.start_kill();
                        }
                        killed_at = Some(Instant::now());
                        events.push((t(Instant::now()), format!("SIGKILL worker {victim}")));
                        say(format!("  fault: SIGKILL worker {victim}"));
                    }
                    if let (Some(k), None) = (killed_at, restart_at) {
                        if k.elapsed() >= Duration::from_millis(1500) {
                            if let Some(mut c) = workers[victim].child.take() {
                                let _ = c.wait().await;
                            }
                            spawn(&mut workers[victim], victim)?;
                            restart_at = Some(Instant::now());
                            events.push((t(Instant::now()), format!("restart worker {victim}")));
                            say(format!("  fault: worker {victim} restarted; it rejoins and recovers the state from its peers"));
                        }
                    }
                    if cut_at.is_none() && restart_at.is_some() && max_step * 10 >= demo.steps * 6 {
                        for w in &workers {
                            if let Some(pid) = w.child.as_ref().and_then(|c| c.id()) {
                                signal_usr1(pid);
                            }
                        }
                        cut_at = Some(Instant::now());
                        events.push((t(Instant::now()), "WAN cut 1.5 s".into()));
                        say("  fault: the link between the data centres is cut for 1.5 s".into());
                    }
                }
                if workers.iter().all(|w| w.done.is_some() && w.child.is_none()) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("the training demo did not finish in time; logs in {}", dir.display()));
                }
            }
        }
    }
    let _ = stop.send(());
    let _ = coordinator.await;

    // Summary.
    let done: Vec<&Value> = workers.iter().filter_map(|w| w.done.as_ref()).collect();
    let eval: Vec<f64> = done.iter().filter_map(|v| v["eval_loss"].as_f64()).collect();
    let eval_loss = eval.first().copied().unwrap_or(f64::NAN);
    let agree = eval.iter().all(|e| (e - eval_loss).abs() < 1e-9);
    let sum = |k: &str| done.iter().filter_map(|v| v[k].as_u64()).sum::<u64>();
    // Every rank's accounting: offered = applied + carried + dropped, inside its DC and across.
    let balanced = done.iter().all(|v| {
        let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
        n("offered") == n("applied") + n("pending") + n("dropped")
            && n("dc_offered") == n("dc_applied") + n("dc_pending") + n("dc_dropped")
    });
    // Each process's last count (a killed process's counts die with it).
    let last = |k: &str| -> u64 {
        workers
            .iter()
            .enumerate()
            .map(|(i, w)| w.done.as_ref().or(latest.get(&i)).and_then(|v| v[k].as_u64()).unwrap_or(0))
            .sum()
    };
    let (bytes, wan) = (last("bytes"), last("wan_bytes"));
    let outcome = TrainingOutcome {
        eval_loss,
        bytes,
        wan_bytes: wan,
        failed_rounds: round_failures,
        deadline_rounds: deadline_failures,
        contributions: [
            sum("offered") + sum("dc_offered"),
            sum("applied") + sum("dc_applied"),
            sum("pending") + sum("dc_pending"),
            sum("dropped") + sum("dc_dropped"),
        ],
        wall_s: started.elapsed().as_secs_f64(),
    };
    say(format!(
        "summary: {} ranks trained {} steps in {:.1} s; eval loss {:.4} (chance {:.4}), the same on every rank: {}; \
         {} epochs; {:.1} MB sent, {:.2} MB across the WAN; cross-DC contributions (leaders) offered {}, applied {}, \
         still carried at the end {}, dropped {}; gradient-round contributions offered {}, applied {}, dropped (late) {}; every ledger \
         balanced: {}; failed rounds {}",
        done.len(),
        demo.steps,
        started.elapsed().as_secs_f64(),
        eval_loss,
        4f64.ln(),
        agree,
        max_epoch,
        bytes as f64 / 1e6,
        wan as f64 / 1e6,
        sum("offered"),
        sum("applied"),
        sum("pending"),
        sum("dropped"),
        sum("dc_offered"),
        sum("dc_applied"),
        sum("dc_dropped"),
        balanced,
        round_failures
    ));
    if demo.faults {
        let rejoined = workers[victim].recovered.is_some() && workers[victim].done.is_some();
        say(format!(
            "faults survived: straggler (worker 1) — yes; SIGKILL + restart of worker {victim} — {}; WAN cut — {}",
            if rejoined { "rejoined with state recovered from peers, trained to the end" } else { "NO" },
            match (cut_at.is_some(), sum("late_rounds")) {
                (false, _) => "not reached".to_string(),
                (true, 0) => "the rounds waited for the link (the cut was shorter than failure detection); nothing \
                              carried"
                    .to_string(),
                (true, n) =>
                    format!("the leaders' rounds went on with a quorum; {n} late contributions carried, then applied"),
            }
        ));
        if !rejoined || cut_at.is_none() {
            return Err(format!("a fault was not survived; logs in {}", dir.display()));
        }
    }
    if done.len() != demo.ranks || !agree || !balanced || eval_loss.is_nan() || eval_loss > 0.9 * 4f64.ln() {
        return Err(format!(
            "training did not end well: {} of {} ranks done, agree {agree}, ledgers balanced {balanced}, eval loss \
             {eval_loss}; logs in {}",
            done.len(),
            demo.ranks,
            dir.display()
        ));
    }
    if demo.quiet {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(outcome);
    }
    match plot(&loss_points, &events, &demo) {
        Ok(svg) => match std::fs::write(&demo.plot, svg) {
            Ok(()) => println!("plot: {}", demo.plot.display()),
            Err(e) => println!("plot not written ({}: {e})", demo.plot.display()),
        },
        Err(e) => println!("plot not drawn: {e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

/// What the run is, printed before it starts.
fn describe(demo: &TrainingDemo) {
    println!();
    if demo.algorithm == OuterAlgorithm::Sync {
        println!(
            "training: {} rank processes in 2 data centres, a two-layer perceptron (real gradients); synchronous data \
             parallel over all ranks (the baseline: gradients all-reduced across the WAN every step), lr {}; \
             embedded coordinator",
            demo.ranks, demo.lr
        );
    } else {
        println!(
            "training: {} rank processes in 2 data centres, a two-layer perceptron (real gradients), lr {}; inside each \
             data centre synchronous data parallel (quorum rounds every step), between them {} by the DCs' leaders \
             (H {}{}, {} outer gradients, quorum rounds); embedded coordinator",
            demo.ranks,
            demo.lr,
            demo.algorithm.name(),
            demo.every,
            if demo.algorithm == OuterAlgorithm::StreamingDiloco {
                format!(", {} fragments", demo.fragments)
            } else {
                String::new()
            },
            format!("{:?}", demo.learning.compression).to_lowercase()
        );
    }
    if demo.faults {
        println!("faults: rank process 1 straggles; one rank is SIGKILLed and restarted at ~30 %; the WAN is cut for 1.5 s at ~60 %");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn signal_usr1(pid: u32) {
    // SAFETY: kill(2) with a child's pid and a signal number; no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGUSR1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn signal_usr1(_pid: u32) {}

/// Loss over time with the events marked.
fn plot(points: &[(f64, f64)], events: &[(f64, String)], demo: &TrainingDemo) -> Result<String, String> {
    use plotters::prelude::*;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let end = points.iter().map(|p| p.0).chain(events.iter().map(|e| e.0)).fold(1.0f64, f64::max);
        let top = points.iter().map(|p| p.1).fold(0.1f64, f64::max) * 1.1;
        let title = format!(
            "phalanx demo: {} ranks in 2 DCs, sync inside each, {} across (H {})",
            demo.ranks,
            demo.algorithm.name(),
            demo.every
        );
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..top)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("time (s)")
            .y_desc("training loss (mean over ranks)")
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (t, label)) in events.iter().enumerate() {
            c.draw_series(LineSeries::new([(*t, 0.0), (*t, top)], RED.mix(0.5))).map_err(|e| e.to_string())?;
            // Staggered, so labels of events close in time do not overlap.
            let y = top * (0.96 - 0.05 * (k % 4) as f64);
            c.draw_series([Text::new(label.clone(), (*t, y), ("sans-serif", 11).into_font().color(&RED))])
                .map_err(|e| e.to_string())?;
        }
        c.draw_series(LineSeries::new(points.iter().copied(), &BLUE)).map_err(|e| e.to_string())?;
        c.draw_series(points.iter().map(|p| Circle::new(*p, 2, BLUE.filled()))).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}
