//! The win rate and its 95% interval.

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Wilson score interval of a proportion `p` over `n` trials at 95%; a tie counts half a
/// win, so `p` need not be a whole number of wins over `n`. Wilson rather than the normal
/// approximation because test sets are small and win rates near 0 or 1 are common, where
/// p +- z sqrt(p(1-p)/n) leaves [0, 1] or collapses to a point.
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_values() {
        // statsmodels.stats.proportion.proportion_confint(8, 10, method="wilson")
        let (lo, hi) = wilson(0.8, 10);
        assert!((lo - 0.490_162).abs() < 1e-5 && (hi - 0.943_318).abs() < 1e-5, "{lo} {hi}");
        let (lo, hi) = wilson(0.0, 5);
        assert!(lo == 0.0 && (hi - 0.434_482).abs() < 1e-5, "{hi}");
        assert_eq!(wilson(0.5, 0), (0.0, 1.0));
    }
}
