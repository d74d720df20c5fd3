//! The Prometheus text exposition format (version 0.0.4), written by hand.
//!
//! ```text
//!  # HELP walcast_joins_total Channel join requests handled.
//!  # TYPE walcast_joins_total counter
//!  walcast_joins_total 3
//!  walcast_slot_wal_status{slot="walcast",status="reserved"} 1
//! ```
//!
//! Invariants:
//! - Every family gets exactly one `# HELP` and one `# TYPE` line, before its
//!   samples; callers pass each family once.
//! - Label values are escaped (`\\`, `\"`, `\n`) and help texts (`\\`, `\n`),
//!   so any slot name renders as valid text.
//! - Floats print without exponent; infinities as `+Inf`/`-Inf`, NaN as `NaN`.
//! - Histograms print cumulative `_bucket` lines in bound order ending with
//!   `le="+Inf"` (equal to `_count`), then `_sum` and `_count`, in seconds.

use std::fmt::Write as _;

use super::histogram::HistogramSnapshot;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets on restart); names end in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// An exact unsigned integer (counters, sizes).
    Uint(u64),
    /// An exact signed integer (gauges that may be -1).
    Int(i64),
    /// A float (seconds, ratios).
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Uint(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Uint(u64::from(v))
    }
}

/// Builds one exposition in a `String`.
#[derive(Debug, Default)]
pub struct TextWriter {
    out: String,
}

impl TextWriter {
    /// An empty exposition.
    pub fn new() -> TextWriter {
        TextWriter { out: String::with_capacity(8 << 10) }
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind.as_str());
        self.out.push('\n');
    }

    /// One sample line of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(label);
                self.out.push_str("=\"");
                for c in text.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.value(value.into());
        self.out.push('\n');
    }

    fn value(&mut self, value: Value) {
        // Writing to a String cannot fail.
        let _ = match value {
            Value::Uint(v) => write!(self.out, "{v}"),
            Value::Int(v) => write!(self.out, "{v}"),
            Value::Float(v) if v.is_nan() => write!(self.out, "NaN"),
            Value::Float(v) if v == f64::INFINITY => write!(self.out, "+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => write!(self.out, "-Inf"),
            Value::Float(v) => write!(self.out, "{v}"),
        };
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], value);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Into<Value>) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    /// A histogram family of durations, in seconds.
    pub fn histogram_seconds(&mut self, name: &str, help: &str, snapshot: &HistogramSnapshot) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut le = String::with_capacity(16);
        for &(bound_micros, count) in &snapshot.cumulative {
            le.clear();
            let _ = write!(le, "{}", bound_micros as f64 / 1e6);
            self.sample(&bucket, &[("le", &le)], count);
        }
        self.sample(&bucket, &[("le", "+Inf")], snapshot.count);
        self.sample(&format!("{name}_sum"), &[], snapshot.sum_micros as f64 / 1e6);
        self.sample(&format!("{name}_count"), &[], snapshot.count);
    }

    /// The exposition.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::super::histogram::LatencyHistogram;
    use super::*;

    /// A parsed sample: name, labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Checks every line against the format: comments are `# HELP name …` or
    /// `# TYPE name kind`; samples are `name{label="value",…} value`.
    /// Returns (name, labels, value) per sample.
    fn parse(text: &str) -> Vec<Sample> {
        let is_name = |s: &str| {
            !s.is_empty()
                && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let keyword = parts.next().unwrap();
                let name = parts.next().unwrap();
                assert!(is_name(name), "{line}");
                match keyword {
                    "HELP" => assert!(!parts.next().unwrap_or("").contains('\n')),
                    "TYPE" => assert!(matches!(parts.next(), Some("counter" | "gauge" | "histogram")), "{line}"),
                    _ => panic!("unknown comment {line}"),
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let mut labels = Vec::new();
                    let mut chars = body.chars().peekable();
                    while chars.peek().is_some() {
                        let label: String = chars.by_ref().take_while(|&c| c != '=').collect();
                        assert!(is_name(&label), "{line}");
                        assert_eq!(chars.next(), Some('"'), "{line}");
                        let mut text = String::new();
                        loop {
                            match chars.next().expect("unterminated label value") {
                                '\\' => match chars.next() {
                                    Some('\\') => text.push('\\'),
                                    Some('"') => text.push('"'),
                                    Some('n') => text.push('\n'),
                                    other => panic!("bad escape {other:?} in {line}"),
                                },
                                '"' => break,
                                c => text.push(c),
                            }
                        }
                        labels.push((label, text));
                        if chars.peek() == Some(&',') {
                            chars.next();
                        }
                    }
                    (name, labels)
                }
            };
            assert!(is_name(name), "{line}");
            samples.push((name.to_owned(), labels, value));
        }
        samples
    }

    #[test]
    fn families_samples_and_escaping() {
        let mut w = TextWriter::new();
        w.counter("walcast_joins_total", "Joins.\nSecond line with a \\ backslash.", 3);
        w.gauge("walcast_lag_seconds", "Lag.", 0.25);
        w.gauge("walcast_max_keep_bytes", "Max.", -1i64);
        w.gauge("walcast_inf", "Inf.", f64::INFINITY);
        w.family("walcast_slot_wal_status", Kind::Gauge, "Status.");
        w.sample("walcast_slot_wal_status", &[("slot", "we\"ird\\slot\n"), ("status", "reserved")], true);
        let text = w.finish();
        assert!(text.starts_with(
            "# HELP walcast_joins_total Joins.\\nSecond line with a \\\\ backslash.\n\
             # TYPE walcast_joins_total counter\nwalcast_joins_total 3\n"
        ));
        assert!(text.contains("walcast_lag_seconds 0.25\n"));
        assert!(text.contains("walcast_max_keep_bytes -1\n"));
        assert!(text.contains("walcast_inf +Inf\n"));
        assert!(text.contains("walcast_slot_wal_status{slot=\"we\\\"ird\\\\slot\\n\",status=\"reserved\"} 1\n"));
        let samples = parse(&text);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[4].1[0], ("slot".to_owned(), "we\"ird\\slot\n".to_owned()));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn histogram_lines() {
        let h = LatencyHistogram::default();
        h.observe_micros(300);
        h.observe_micros(1_500);
        h.observe_micros(9_000_000);
        let mut w = TextWriter::new();
        w.histogram_seconds("walcast_delivery_latency_seconds", "Latency.", &h.snapshot());
        let text = w.finish();
        assert!(text.contains("# TYPE walcast_delivery_latency_seconds histogram\n"));
        assert!(text.contains("walcast_delivery_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("walcast_delivery_latency_seconds_bucket{le=\"0.002\"} 2\n"));
        assert!(text.contains("walcast_delivery_latency_seconds_bucket{le=\"2.5\"} 2\n"));
        assert!(text.contains("walcast_delivery_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("walcast_delivery_latency_seconds_count 3\n"));
        assert!(text.contains("walcast_delivery_latency_seconds_sum 9.0018\n"));
        let samples = parse(&text);
        let buckets: Vec<f64> = samples.iter().filter(|s| s.0.ends_with("_bucket")).map(|s| s.2).collect::<Vec<_>>();
        assert_eq!(buckets.len(), 13);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative");
        let bounds: Vec<&str> =
            samples.iter().filter(|s| s.0.ends_with("_bucket")).map(|s| s.1[0].1.as_str()).collect();
        assert_eq!(
            bounds,
            ["0.0005", "0.001", "0.002", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"]
        );
    }
}
