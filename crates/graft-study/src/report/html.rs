//! The report's `index.html`: one static page with the tables and every chart, styled inline, referring only to
//! files in the report directory (no scripts, no fonts, nothing fetched from a network), so it opens offline and can
//! be copied or attached as a directory.

use std::fmt::Write;

use super::plots::{Chart, Section};
use super::summary::{Cell, Summary};
use super::table::{curve_metrics, kind_title, row_label, ColumnFormat};
use super::Figure;

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// Tables wider than the page (a study with many metrics) scroll inside their box instead of running off the page.
const STYLE: &str = "body{font-family:sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}\
div.wide{overflow-x:auto}\
table{border-collapse:collapse;margin:1em 0;font-size:14px}\
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}\
th:first-child,td:first-child{text-align:left}\
th{background:#f3f3f3}td.best{font-weight:bold;background:#e8f0fb}tr.baseline td:first-child{font-style:italic}\
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}\
.note{font-size:13px;color:#555}";

fn cell_html(fmt: &ColumnFormat, cell: Option<&Cell>) -> String {
    match cell {
        Some(c) if c.best => format!("<td class=\"best\">{}</td>", escape(&fmt.cell(c))),
        Some(c) => format!("<td>{}</td>", escape(&fmt.cell(c))),
        None => "<td>-</td>".into(),
    }
}

/// A title as the first sentence of a caption: a full stop added unless it ends a question or sentence already.
fn sentence(title: &str) -> String {
    if title.ends_with(['.', '?', '!']) {
        title.to_string()
    } else {
        format!("{title}.")
    }
}

/// The page. `inputs` are the results files as given on the command line.
pub fn page(summary: &Summary, charts: &[Chart], figures: &[Figure], inputs: &[String]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>graft report</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>graft report</h1>\n"
    );
    let _ = writeln!(
        s,
        "<p class=\"note\">{} result lines from {} ({} superseded by later lines for the same run). Cells: mean +- \
         bootstrap standard error over runs (n = runs), {} balanced resamples, seed {}. Best value per column in \
         bold: higher is better for accuracy and F1, lower for loss, time and memory. Peak memory of a training run is \
         what training holds at its peak (parameters, gradients, optimiser state, activations kept for backward; \
         counted by graft's allocator on the CPU), of other runs the process's peak resident set.</p>",
        summary.lines_read,
        escape(&inputs.join(", ")),
        summary.superseded,
        summary.resamples,
        summary.seed
    );
    for t in &summary.tables {
        let formats: Vec<ColumnFormat> = t.metrics.iter().map(|m| t.format(m)).collect();
        let _ = writeln!(
            s,
            "<h2>{}</h2>\n<div class=\"wide\"><table>\n<tr><th>experiment</th>",
            escape(kind_title(t.kind))
        );
        for (m, f) in t.metrics.iter().zip(&formats) {
            let _ = write!(s, "<th>{}</th>", escape(&f.header(&m.label)));
        }
        s.push_str("</tr>\n");
        for r in &t.rows {
            let class = if r.baseline { " class=\"baseline\"" } else { "" };
            let _ = write!(s, "<tr{class}><td>{}</td>", escape(&row_label(&r.experiment, r.baseline)));
            for (m, f) in t.metrics.iter().zip(&formats) {
                s.push_str(&cell_html(f, r.cell(&m.key)));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</table></div>\n");
    }
    let metrics = curve_metrics(&summary.curves);
    if !metrics.is_empty() {
        s.push_str(
            "<h2>Interpolation barriers</h2>\n<p class=\"note\">Largest excess over the straight line between the \
             endpoints (loss above it, accuracy/F1 below it); 0 or less: no barrier.</p>\n<div class=\"wide\"><table>\n<tr><th>interpolation</th>",
        );
        let formats: Vec<ColumnFormat> = metrics
            .iter()
            .map(|m| {
                let means = summary.curves.iter().filter(|c| c.metric == m.key).filter_map(|c| c.barrier.as_ref());
                ColumnFormat::for_column(m, means.map(|b| b.estimate.mean))
            })
            .collect();
        for (m, f) in metrics.iter().zip(&formats) {
            let _ = write!(s, "<th>{}</th>", escape(&f.header(&format!("{} barrier", m.label))));
        }
        s.push_str("</tr>\n");
        let mut experiments: Vec<&str> = Vec::new();
        for c in &summary.curves {
            if !experiments.contains(&c.experiment.as_str()) {
                experiments.push(&c.experiment);
            }
        }
        for e in experiments {
            let _ = write!(s, "<tr><td>{}</td>", escape(e));
            for (m, f) in metrics.iter().zip(&formats) {
                let b = summary.curves.iter().find(|c| c.experiment == e && c.metric == m.key);
                s.push_str(&cell_html(f, b.and_then(|c| c.barrier.as_ref())));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</table></div>\n");
    }
    let mut section: Option<Section> = None;
    for c in charts {
        if section != Some(c.section) {
            section = Some(c.section);
            let _ = writeln!(s, "<h2>{}</h2>", escape(c.section.title()));
        }
        let name = escape(&c.name);
        let _ = writeln!(
            s,
            "<figure id=\"{name}\"><img src=\"plots/{name}.png\" alt=\"{title}\">\
             <figcaption><b>{title}</b> {caption} (<a href=\"plots/{name}.svg\">SVG</a>)</figcaption></figure>",
            title = escape(&sentence(&c.title)),
            caption = escape(&c.caption)
        );
    }
    if !figures.is_empty() {
        let _ = writeln!(s, "<h2>{}</h2>", escape(Section::Snr.title()));
    }
    for f in figures {
        let name = escape(&f.name);
        let _ = writeln!(
            s,
            "<figure id=\"{name}\"><img src=\"plots/{name}.png\" alt=\"{title}\">\
             <figcaption><b>{title}.</b> {caption} (<a href=\"plots/{name}.svg\">SVG</a>)</figcaption></figure>",
            title = escape(&f.title),
            caption = escape(&f.caption)
        );
    }
    let _ = writeln!(
        s,
        "<p class=\"note\">Made by graft {} (<code>graft report</code>).</p>\n</body>\n</html>",
        env!("CARGO_PKG_VERSION")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
