//! Median, minimum and maximum of repeated measurements (the machine is shared and noisy, so
//! every drain runs several times and the tables print the spread).

/// The spread of a set of measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// How many measurements.
    pub n: usize,
}

/// The spread of `values` (NaNs are left out); `None` when there is none.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_even_and_empty() {
        assert_eq!(
            spread(&[3.0, 1.0, 2.0]),
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0,
                n: 3
            })
        );
        let even = spread(&[10.0, 4.0, 1.0, 7.0]).expect("a spread");
        assert_eq!((even.median, even.min, even.max, even.n), (5.5, 1.0, 10.0, 4));
        let one = spread(&[42.0]).expect("a spread");
        assert_eq!((one.median, one.min, one.max), (42.0, 42.0, 42.0));
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN]), None);
        assert_eq!(spread(&[f64::NAN, 2.0]).map(|s| s.n), Some(1));
    }
}
