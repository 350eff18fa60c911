//! What a scenario reports: measures with units and the goals we steer by.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// The goal, e.g. ">= 150000"; None where the figure is context, not a goal.
    pub goal: Option<Goal>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    pub fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(g) => v >= g,
            Goal::AtMost(g) => v <= g,
        }
    }

    pub fn text(self) -> String {
        match self {
            Goal::AtLeast(g) => format!(">= {}", human(g)),
            Goal::AtMost(g) => format!("<= {}", human(g)),
        }
    }
}

pub fn human(v: f64) -> String {
    if v.abs() >= 100.0 {
        let s = format!("{:.0}", v);
        // thousands separators for readability
        let (neg, digits) = s
            .strip_prefix('-')
            .map_or((false, s.as_str()), |d| (true, d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if neg {
            format!("-{out}")
        } else {
            out
        }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub setup: String,
    pub measures: Vec<Measure>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl Scenario {
    pub fn new(name: &'static str, setup: String) -> Self {
        Scenario {
            name,
            setup,
            measures: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    pub fn add(&mut self, name: &str, value: f64, unit: &'static str, goal: Option<Goal>) {
        eprintln!(
            "bench: {} / {name}: {} {unit}{}",
            self.name,
            human(value),
            goal.map(|g| format!(
                " (goal {}: {})",
                g.text(),
                if g.met(value) { "met" } else { "NOT met" }
            ))
            .unwrap_or_default()
        );
        self.measures.push(Measure {
            name: name.to_string(),
            value,
            unit,
            goal,
        });
    }

    pub fn note(&mut self, n: impl Into<String>) {
        let n = n.into();
        eprintln!("bench: {} / note: {n}", self.name);
        self.notes.push(n);
    }
}

/// The median of a non-empty sample.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_and_formatting() {
        assert!(Goal::AtLeast(10.0).met(10.0) && !Goal::AtLeast(10.0).met(9.9));
        assert!(Goal::AtMost(2.0).met(1.0) && !Goal::AtMost(2.0).met(2.1));
        assert_eq!(human(1234567.0), "1,234,567");
        assert_eq!(human(-1234.0), "-1,234");
        assert_eq!(human(12.345), "12.3");
        assert_eq!(human(1.234), "1.23");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
