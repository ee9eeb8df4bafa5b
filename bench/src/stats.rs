//! Samples and the figures reported from them: median, p99 and ratios.

/// Samples of one figure (latencies in nanoseconds, or any other unit).
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    /// Adds a sample.
    pub fn push(&mut self, v: u64) {
        self.0.push(v);
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The q-quantile (0..=1) by nearest rank; 0 with no samples.
    pub fn quantile(&self, q: f64) -> u64 {
        let mut v = self.0.clone();
        v.sort_unstable();
        if v.is_empty() {
            return 0;
        }
        let rank = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    /// The median.
    pub fn median(&self) -> u64 {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> u64 {
        self.quantile(0.99)
    }
}

/// a / b as text ("1.23×"), or "-" when it means nothing (b is zero or either is
/// unknown).
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = a / b;
            // Two significant digits at least, so 1 ms against 1 s is not "0.00×".
            let digits = if r >= 0.1 || r == 0.0 {
                2
            } else {
                (-r.log10()).ceil() as usize + 1
            };
            format!("{r:.digits$}×")
        }
        _ => "-".into(),
    }
}

/// Formats nanoseconds for people.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 100.0 {
        format!("{ns:.1} ns")
    } else if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut s = Samples::default();
        for v in 1..=100 {
            s.push(v);
        }
        assert_eq!(s.median(), 50);
        assert_eq!(s.p99(), 99);
        assert_eq!(Samples::default().median(), 0);
    }

    #[test]
    fn ratios_and_units() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "-");
        assert_eq!(ratio(Some(1.0), Some(1000.0)), "0.0010×");
        assert_eq!(ratio(Some(0.0), Some(1000.0)), "0.00×");
        assert_eq!(ratio(None, Some(1.0)), "-");
        assert_eq!(fmt_ns(1500.0), "1.5 µs");
        assert_eq!(fmt_ns(2_500_000.0), "2.50 ms");
        assert_eq!(fmt_ns(1_002_000_000.0), "1.002 s");
    }
}
