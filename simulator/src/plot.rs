//! `--plot`: an SVG of step time and of the share of ranks in each step over simulated time,
//! with every fault marked by a vertical line.

use plotters::prelude::*;

use crate::report::Report;

/// Draws `report`'s steps as an SVG document.
pub fn svg(report: &Report) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(360);
        let end = report.sim_time_s.max(1e-9);
        let max_step = report.steps.iter().map(|s| s.step_s).fold(0.0f64, f64::max).max(1e-9) * 1.1;
        let title = format!("{} — seed {}, {} ranks", report.scenario, report.seed, report.ranks);
        let mut c = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..max_step)
            .map_err(|e| e.to_string())?;
        c.configure_mesh().x_desc("simulated time (s)").y_desc("step time (s)").draw().map_err(|e| e.to_string())?;
        for (_, t) in &report.fault_marks {
            c.draw_series(LineSeries::new([(*t, 0.0), (*t, max_step)], RED.mix(0.5))).map_err(|e| e.to_string())?;
        }
        c.draw_series(LineSeries::new(report.steps.iter().map(|s| (s.t_s, s.step_s)), &BLUE))
            .map_err(|e| e.to_string())?
            .label("step time")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        c.draw_series(report.steps.iter().map(|s| Circle::new((s.t_s, s.step_s), 2, BLUE.filled())))
            .map_err(|e| e.to_string())?;
        c.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;

        let mut p = ChartBuilder::on(&bottom)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..1.05)
            .map_err(|e| e.to_string())?;
        p.configure_mesh()
            .x_desc("simulated time (s)")
            .y_desc("ranks in the step (share)")
            .draw()
            .map_err(|e| e.to_string())?;
        for (kind, t) in &report.fault_marks {
            p.draw_series(LineSeries::new([(*t, 0.0), (*t, 1.05)], RED.mix(0.5))).map_err(|e| e.to_string())?;
            p.draw_series([Text::new(kind.clone(), (*t, 1.0), ("sans-serif", 11).into_font().color(&RED))])
                .map_err(|e| e.to_string())?;
        }
        let n = report.ranks.max(1) as f64;
        p.draw_series(LineSeries::new(report.steps.iter().map(|s| (s.t_s, s.participants as f64 / n)), &GREEN))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}
