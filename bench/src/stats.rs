//! Latency samples → percentiles and rates.

use std::time::Duration;

/// Latencies of one run and how long it took.
pub struct Samples {
    pub latencies_us: Vec<f64>,
    pub elapsed: Duration,
}

impl Samples {
    pub fn new(mut latencies_us: Vec<f64>, elapsed: Duration) -> Self {
        latencies_us.sort_by(f64::total_cmp);
        Self {
            latencies_us,
            elapsed,
        }
    }

    /// The `p`-th percentile (0–100), nearest rank.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1]
    }

    pub fn ops_per_s(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Samples::new(
            (1..=100).map(f64::from).rev().collect(),
            Duration::from_secs(2),
        );
        assert_eq!(s.percentile(50.0), 50.0);
        assert_eq!(s.percentile(99.0), 99.0);
        assert_eq!(s.percentile(100.0), 100.0);
        assert_eq!(s.ops_per_s(), 50.0);
    }
}
