//! `graft report RESULTS... -o REPORT_DIR`: bootstrap tables, charts and an HTML page from results lines.

use std::path::PathBuf;

use super::{emit, Global};
use crate::error::Result;
use crate::report::{bootstrap::DEFAULT_RESAMPLES, generate, Options};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Results files (JSONL, one result line each; see docs/results-format.md). Lines for the same run in later files
    /// or later lines replace earlier ones.
    #[arg(required = true)]
    results: Vec<PathBuf>,
    /// Report directory: created, or replaced if it holds an earlier graft report.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Bootstrap resamples per estimate.
    #[arg(long, default_value_t = DEFAULT_RESAMPLES, value_parser = super::resamples_arg)]
    resamples: usize,
    /// PNG resolution as a multiple of the chart's layout size: 1 (screen), 2 (print) or 3; the SVG is the same
    /// whatever the value.
    #[arg(long, value_name = "N", default_value_t = crate::report::render::PRINT_SCALE,
          value_parser = crate::report::render::parse_scale)]
    dpi: u32,
    /// Print the summary as JSON (the contents of summary.json plus "dir") instead of the markdown tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, _global: &Global) -> Result<()> {
    let options = Options { seed: args.seed, resamples: args.resamples, png_scale: args.dpi };
    let report = generate(&args.results, &args.output, &options)?;
    for (old, new) in &report.superseded {
        eprintln!("graft: note: {old} is replaced by {new} (same run)");
    }
    if args.json {
        let mut doc = serde_json::to_value(report.document()).expect("report summaries serialise");
        if let serde_json::Value::Object(map) = &mut doc {
            map.insert("dir".into(), serde_json::Value::String(report.dir.display().to_string()));
        }
        return emit(&(doc.to_string() + "\n"));
    }
    emit(&render_text(&report))
}

/// The report as the terminal shows it: the markdown tables and where the files are.
pub fn render_text(report: &crate::report::Report) -> String {
    let dir = report.dir.display();
    let mut text = report.markdown.clone();
    text.push_str(&format!(
        "\nreport: {dir}/index.html\ntables: {dir}/report.md, {dir}/summary.csv, {dir}/summary.json\nplots: {} charts (PNG + SVG) in {dir}/plots\n",
        report.plots.len()
    ));
    text
}
