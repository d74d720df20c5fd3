//! Measurements and output of a load run: latency histograms (overall and
//! per second), the per-second samples of the monitor, the final table on
//! stdout, the JSON file and the SVG plot.
//!
//! Latencies are kept in µs in HDR histograms (3 significant digits overall,
//! 2 per second). commit→receive uses the relay's `commit_timestamp`, which is
//! truncated to the millisecond: each value is 0–1 ms *above* the true one.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Largest latency recorded (µs): one hour.
const MAX_US: u64 = 3_600_000_000;
/// Most per-second buckets kept.
const MAX_SECONDS: usize = 3_600;

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, sigfig).expect("static histogram bounds are valid")
}

/// One second of deliveries.
#[derive(Debug, Clone)]
pub struct SecondLatencies {
    /// commit→receive (µs).
    pub commit: Histogram<u64>,
    /// write-call→receive (µs).
    pub write: Histogram<u64>,
    /// Deliveries received in this second.
    pub deliveries: u64,
}

/// Latencies of every delivery.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// commit→receive (µs).
    pub commit: Histogram<u64>,
    /// write-call→receive (µs).
    pub write: Histogram<u64>,
    /// commit→socket (µs): until the frame reached the client's socket.
    pub socket: Histogram<u64>,
    /// Per second since writes started.
    pub seconds: Vec<SecondLatencies>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies { commit: histogram(3), write: histogram(3), socket: histogram(3), seconds: Vec::new() }
    }
}

impl Latencies {
    fn second(&mut self, second: usize) -> &mut SecondLatencies {
        let second = second.min(MAX_SECONDS);
        while self.seconds.len() <= second {
            self.seconds.push(SecondLatencies { commit: histogram(2), write: histogram(2), deliveries: 0 });
        }
        &mut self.seconds[second]
    }

    /// Records one delivery received in `second` (since writes started).
    pub fn record(&mut self, second: usize, commit_us: Option<u64>, write_us: Option<u64>) {
        let s = self.second(second);
        s.deliveries += 1;
        if let Some(us) = commit_us {
            s.commit.saturating_record(us.max(1));
        }
        if let Some(us) = write_us {
            s.write.saturating_record(us.max(1));
        }
        if let Some(us) = commit_us {
            self.commit.saturating_record(us.max(1));
        }
        if let Some(us) = write_us {
            self.write.saturating_record(us.max(1));
        }
    }

    /// Records a write→receive latency known only after the run (DELETE events).
    pub fn record_write(&mut self, second: usize, write_us: u64) {
        self.second(second).write.saturating_record(write_us.max(1));
        self.write.saturating_record(write_us.max(1));
    }
}

/// p50/p95/p99/max of a histogram, in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quantiles {
    /// Values.
    pub count: u64,
    /// Median (ms).
    pub p50: f64,
    /// 95th percentile (ms).
    pub p95: f64,
    /// 99th percentile (ms).
    pub p99: f64,
    /// Largest (ms).
    pub max: f64,
}

impl Quantiles {
    /// Of a µs histogram.
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        if h.is_empty() {
            return Quantiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Quantiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "p50_ms": self.p50, "p95_ms": self.p95, "p99_ms": self.p99, "max_ms": self.max})
    }
}

/// One second of the monitor.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since writes started (negative while connecting).
    pub t_s: f64,
    /// Writes committed so far.
    pub writes: u64,
    /// Deliveries received so far.
    pub deliveries: u64,
    /// Relay CPU over the last interval (% of one core).
    pub relay_cpu_pct: Option<f64>,
    /// Relay VmRSS (KiB).
    pub relay_rss_kb: Option<u64>,
    /// Walsender CPU over the last interval (% of one core).
    pub walsender_cpu_pct: Option<f64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn` of the relay's slot.
    pub slot_lag_bytes: Option<i64>,
}

impl Sample {
    fn json(&self) -> Value {
        json!({
            "t_s": self.t_s, "writes": self.writes, "deliveries": self.deliveries,
            "relay_cpu_pct": self.relay_cpu_pct, "relay_rss_kb": self.relay_rss_kb,
            "walsender_cpu_pct": self.walsender_cpu_pct, "slot_lag_bytes": self.slot_lag_bytes,
        })
    }
}

/// A finished report: config, results and checks, printable and serializable.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `(name, value)` of the configuration, in order.
    pub config: Vec<(String, Value)>,
    /// `(name, value)` of the results, in order (table rows).
    pub results: Vec<(String, Value, String)>,
    /// Per-second latency rows: (second, deliveries, commit q, write q).
    pub seconds: Vec<(usize, u64, Quantiles, Quantiles)>,
    /// Monitor samples.
    pub samples: Vec<Sample>,
    /// Notes printed under the table.
    pub notes: Vec<String>,
    /// Whether every check passed.
    pub passed: bool,
}

impl Report {
    /// Adds a result row: JSON key, JSON value, and how the table shows it.
    pub fn result(&mut self, key: &str, value: Value, shown: impl Into<String>) {
        self.results.push((key.to_owned(), value, shown.into()));
    }

    /// Adds latency rows for a histogram.
    pub fn latency(&mut self, key: &str, label: &str, q: Quantiles) {
        let shown = if q.count == 0 {
            "no samples".to_owned()
        } else {
            format!("p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1} ms  (n={})", q.p50, q.p95, q.p99, q.max, q.count)
        };
        self.results.push((key.to_owned(), q.json(), format!("{label}\u{0}{shown}")));
    }

    /// Fills the per-second rows from the latencies.
    pub fn set_seconds(&mut self, latencies: &Latencies) {
        self.seconds = latencies
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.deliveries, Quantiles::of(&s.commit), Quantiles::of(&s.write)))
            .collect();
    }

    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "walcast load");
        for (k, v) in &self.config {
            let shown = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "  {k:<24} {shown}");
        }
        let _ = writeln!(out);
        for (key, _, shown) in &self.results {
            let (label, text) = shown.split_once('\u{0}').unwrap_or((key.as_str(), shown.as_str()));
            let _ = writeln!(out, "  {label:<28} {text}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        let _ = writeln!(out, "  result: {}", if self.passed { "PASS" } else { "FAIL" });
        out
    }

    /// The JSON document.
    pub fn json(&self) -> Value {
        let config: serde_json::Map<String, Value> = self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let results: serde_json::Map<String, Value> =
            self.results.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
        let seconds: Vec<Value> = self
            .seconds
            .iter()
            .map(|(s, n, c, w)| json!({"second": s, "deliveries": n, "commit_to_receive": c.json(), "write_to_receive": w.json()}))
            .collect();
        json!({
            "config": config,
            "results": results,
            "per_second": seconds,
            "samples": self.samples.iter().map(Sample::json).collect::<Vec<_>>(),
            "notes": self.notes,
            "passed": self.passed,
        })
    }

    /// Writes the JSON document to `path` (creating its directory).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        create_parent(path)?;
        std::fs::write(path, serde_json::to_vec_pretty(&self.json()).unwrap_or_default())
    }

    /// Writes the latency plot to `path` (creating its directory).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_svg(&self, path: &Path, title: &str) -> std::io::Result<()> {
        create_parent(path)?;
        std::fs::write(path, svg(&self.seconds, title))
    }
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

/// Picks one value of a per-second row for a plotted series.
type SeriesValue = fn(&(usize, u64, Quantiles, Quantiles)) -> Option<f64>;

/// An SVG line plot of commit→receive p50/p95/p99 (and write→receive p99,
/// dashed) per second.
pub fn svg(seconds: &[(usize, u64, Quantiles, Quantiles)], title: &str) -> String {
    let (w, h) = (900.0_f64, 420.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let points: Vec<_> = seconds.iter().filter(|s| s.2.count > 0 || s.3.count > 0).collect();
    let x_max = points.iter().map(|s| s.0 as f64 + 1.0).fold(1.0, f64::max);
    let y_top = points.iter().map(|s| s.2.p99.max(s.3.p99)).fold(1.0, f64::max);
    let y_max = nice(y_top * 1.1);
    let x = |s: f64| left + (w - left - right) * s / x_max;
    let y = |ms: f64| top + (h - top - bottom) * (1.0 - (ms / y_max).min(1.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{left}" y="22" font-size="14">{}</text>"#, escape(title));
    // Axes and grid.
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            yy + 4.0,
            trim(v)
        );
    }
    let ticks = (x_max as usize).clamp(1, 10);
    for i in 0..=ticks {
        let s = x_max * i as f64 / ticks as f64;
        let xx = x(s);
        let _ =
            writeln!(out, r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, h - bottom + 16.0, trim(s));
    }
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#333"/><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        h - bottom,
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since writes started</text>"#,
        (left + w - right) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">latency (ms)</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    let series: [(&str, &str, &str, SeriesValue); 4] = [
        ("commit→receive p50", "#1f77b4", "", |s| (s.2.count > 0).then_some(s.2.p50)),
        ("commit→receive p95", "#ff7f0e", "", |s| (s.2.count > 0).then_some(s.2.p95)),
        ("commit→receive p99", "#d62728", "", |s| (s.2.count > 0).then_some(s.2.p99)),
        ("write→receive p99", "#555555", r#" stroke-dasharray="5,4""#, |s| (s.3.count > 0).then_some(s.3.p99)),
    ];
    for (i, (label, color, dash, value)) in series.iter().enumerate() {
        let pts: Vec<String> =
            points.iter().filter_map(|s| value(s).map(|v| format!("{:.1},{:.1}", x(s.0 as f64 + 0.5), y(v)))).collect();
        if !pts.is_empty() {
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                pts.join(" ")
            );
        }
        let lx = left + 10.0 + 190.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            top - 8.0,
            lx + 24.0,
            top - 8.0,
            lx + 28.0,
            top - 4.0,
            escape(label)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A round axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    let v = v.max(1.0);
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn trim(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_summarise_and_plot() {
        let mut l = Latencies::default();
        for i in 1..=100u64 {
            l.record(0, Some(i * 1000), Some(i * 900));
            l.record(2, Some(i * 2000), None);
        }
        l.record_write(2, 5_000);
        let q = Quantiles::of(&l.commit);
        assert_eq!(q.count, 200);
        assert!((q.max - 200.0).abs() < 0.5, "{q:?}");
        let mut report = Report::default();
        report.set_seconds(&l);
        assert_eq!(report.seconds.len(), 3);
        assert_eq!(report.seconds[1].1, 0);
        let svg = svg(&report.seconds, "a <test>");
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("a &lt;test&gt;"));
        report.latency("commit_to_receive", "commit→receive", q);
        report.passed = true;
        assert!(report.table().contains("p99"));
        assert_eq!(report.json()["results"]["commit_to_receive"]["count"], 200);
        assert_eq!(nice(7.3), 10.0);
        assert_eq!(nice(130.0), 200.0);
    }
}
