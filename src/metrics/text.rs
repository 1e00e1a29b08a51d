//! The Prometheus text format, version 0.0.4: each family's `# HELP` and
//! `# TYPE` lines once, then its samples; label values escaped (`\\`,
//! `\"`, `\n`), HELP text escaped (`\\`, `\n`); values as Prometheus
//! reads them (`+Inf`, `-Inf`, `NaN`, integers without a fraction).

use std::fmt::Write;

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
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

/// The exposition being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

impl Text {
    /// Starts the family `name`: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample of the current family (`name` may carry a histogram
    /// suffix such as `_bucket`).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format quotes it.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A value as the format writes it.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped_and_numbers_written_as_prometheus_reads_them() {
        let mut t = Text::default();
        t.family("x_total", Kind::Counter, "a \\ b\nc");
        t.sample("x_total", &[("file_id", "a\"b\\c\nd"), ("k", "v")], 3.0);
        t.sample("x_total", &[], 0.25);
        let s = t.finish();
        assert_eq!(
            s,
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\n\
             x_total{file_id=\"a\\\"b\\\\c\\nd\",k=\"v\"} 3\nx_total 0.25\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(1.7e9), "1700000000");
        assert_eq!(number(1e20), "100000000000000000000");
    }
}
