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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(-12_345.0), "-12,345");
    }
}
