//! Rows of the `causeway bench all` summary and the number formats they
//! use. Each scenario module turns its own JSON results into rows (its
//! `summary` function), next to the code that measures them.

use serde_json::Value;

/// One row: what was measured, Causeway's figure, the reference's figure
/// from the same run, and their ratio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The scenario and its sizes.
    pub scenario: String,
    /// Causeway's figure.
    pub causeway: String,
    /// The reference's (or a peer implementation's) figure, or "—".
    pub reference: String,
    /// Causeway's figure over the reference's, or "—".
    pub ratio: String,
}

impl Row {
    /// A row of the four cells.
    pub fn new(scenario: String, causeway: String, reference: String, ratio: String) -> Row {
        Row {
            scenario,
            causeway,
            reference,
            ratio,
        }
    }
}

/// One row per result, made by `row`.
pub fn each(results: &[Value], row: impl Fn(&Value) -> Row) -> Vec<Row> {
    results.iter().map(row).collect()
}

/// The number at `key` of a result (NaN if there is none).
pub fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// `n` rounded, with thousands separators.
pub fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// `ours / theirs` as a ratio: two decimals, or, below 0.1, two
/// significant digits and the fraction it is (`0.0044x (1/228)`), so that
/// a small ratio does not print as `0.00x`.
pub fn ratio(ours: f64, theirs: f64) -> String {
    let x = ours / theirs;
    if !x.is_finite() || x <= 0.0 || x >= 0.1 {
        return format!("{x:.2}x");
    }
    let decimals = (1.0 - x.log10().floor()) as usize;
    format!("{x:.decimals$}x (1/{:.0})", 1.0 / x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ratios_keep_two_significant_digits() {
        assert_eq!(ratio(3.0, 2.0), "1.50x");
        assert_eq!(ratio(1.0, 10.0), "0.10x");
        assert_eq!(ratio(1.52, 346.45), "0.0044x (1/228)");
        assert_eq!(ratio(1.52, 151.8), "0.010x (1/100)");
        assert_eq!(ratio(1.0, 0.0), "infx");
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(-12_345.0), "-12,345");
    }
}
