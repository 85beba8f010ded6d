//! `phalanx sim SCENARIO.toml [--seed N] [--json OUT] [--trace OUT] [--plot OUT.svg]`: runs a
//! scenario in the deterministic simulator and prints a summary table.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use phalanx_sim::{run, RunOptions, Scenario};

use crate::CliError;

/// Arguments of `phalanx sim`.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// The scenario (TOML; format in docs/scenarios.md, examples in examples/scenarios/).
    pub scenario: PathBuf,
    /// Seed (default: the scenario's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the JSON report here (`-`: standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a Chrome/Perfetto trace here (open in ui.perfetto.dev or chrome://tracing).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Write an SVG of step time and participation over simulated time, faults marked.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress line and no summary table.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs it. Exit status: 0 when the run kept every promise (nothing hung, no wrong result,
/// nothing lost), 1 when it did not (the report says what), 2 for a bad scenario or arguments.
pub fn run_sim(a: SimArgs) -> Result<(), CliError> {
    let scenario = Scenario::load(&a.scenario).map_err(|e| CliError::Usage(e.to_string()))?;
    let seed = a.seed.unwrap_or(scenario.seed);
    let options =
        RunOptions { trace: a.trace.is_some(), progress_every: (!a.quiet).then_some(Duration::from_millis(500)) };
    let out = run(&scenario, seed, &options);
    let report = &out.report;
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(report).map_err(|e| format!("cannot encode the report: {e}"))?;
        write_out(path, &text)?;
    }
    if let (Some(path), Some(trace)) = (&a.trace, &out.trace) {
        write_out(path, &trace.to_json().to_string())?;
    }
    if let Some(path) = &a.plot {
        let svg = phalanx_sim::plot::svg(report).map_err(|e| format!("cannot draw the plot: {e}"))?;
        write_out(path, &svg)?;
    }
    if !a.quiet {
        eprint!("{}", report.summary());
    }
    if report.clean() {
        Ok(())
    } else {
        let file = a.scenario.display();
        Err(CliError::Failed(format!(
            "the run broke a promise (hung {}, wrong {}, lost {}); replay: phalanx sim {file} --seed {seed}",
            report.collectives.hung, report.collectives.wrong_results, report.contributions.lost
        )))
    }
}

fn write_out(path: &PathBuf, text: &str) -> Result<(), String> {
    if path.as_os_str() == "-" {
        println!("{text}");
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
