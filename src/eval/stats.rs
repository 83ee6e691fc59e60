//! Means with their standard errors, the one summary every evaluation figure uses.

/// The mean of `xs` and its standard error (sample standard deviation over `sqrt(n)`; `None`
/// for fewer than two items). NaN items are skipped: a figure over the finite items beats a
/// report that is NaN because one pair was.
pub fn mean_se(xs: &[f64]) -> (f64, Option<f64>, usize) {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return (f64::NAN, None, 0);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, None, n);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, Some((var / n as f64).sqrt()), n)
}

/// The median of the finite values (NaN when there are none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_standard_error_by_hand() {
        // mean 2.5, sample variance 5/3, se = sqrt(5/3 / 4)
        let (m, se, n) = mean_se(&[1.0, 2.0, 3.0, 4.0, f64::NAN]);
        assert_eq!((m, n), (2.5, 4));
        assert!((se.unwrap() - (5.0f64 / 12.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_se(&[7.0]), (7.0, None, 1));
        assert!(mean_se(&[]).0.is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
