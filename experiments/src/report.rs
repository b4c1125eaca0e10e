//! `all`: runs every experiment with its defaults and writes `report.md` linking the plots.

use crate::common::{Stopwatch, Summary};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// A one-line description of this machine: CPU model and cores.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{model}, {cores} cores available")
}

/// Writes `report.md` into `out` from the experiments' summaries.
pub fn write(out: &Path, summaries: &[Summary], command: &str, clock: &Stopwatch) -> Result<()> {
    let mut s = String::new();
    let _ = writeln!(s, "# CryptoNN-rs: experiment results\n");
    let _ = writeln!(
        s,
        "Generated on {} by `{command}` on {} in {:.1} minutes. Every figure below comes from \
         the CSV files next to this report; each experiment's own command reproduces it alone.\n",
        today(),
        machine(),
        clock.secs() / 60.0
    );
    let _ = writeln!(s, "| experiment | time | files |\n|---|---|---|");
    for m in summaries {
        let files: Vec<String> = m
            .csv
            .iter()
            .chain(m.figures.iter())
            .map(|f| format!("[{f}]({f})"))
            .collect();
        let _ = writeln!(
            s,
            "| [{n}](#{n}) | {:.1} s | {} |",
            m.seconds,
            files.join(", "),
            n = m.name
        );
    }
    for m in summaries {
        let _ = writeln!(s, "\n## {}\n\n{}\n", m.name, m.description);
        for f in m.figures.iter().filter(|f| f.ends_with(".png")) {
            // A plot links its SVG; a picture without one (the leakage grids) links itself.
            let svg = f.trim_end_matches(".png").to_string() + ".svg";
            let target = if m.figures.contains(&svg) { &svg } else { f };
            let _ = writeln!(s, "[![{f}]({f})]({target})\n");
        }
        for t in &m.tables {
            let _ = writeln!(s, "{}", t.to_markdown());
        }
        let _ = writeln!(s, "Took {:.1} s. Alone: `{}`.", m.seconds, m.command);
    }
    let path = out.join("report.md");
    std::fs::write(&path, s).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_has_the_right_shape() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
        assert_eq!(&d[4..5], "-");
    }
}
