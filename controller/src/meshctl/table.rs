//! Text output: aligned tables (kubectl style), ages ("12s ago") and byte counts.

/// Renders `rows` under `headers` as left-aligned columns separated by three spaces, with no
/// trailing spaces. Every line ends with a newline. Rows shorter than the header are padded
/// with empty cells.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().take(columns).enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map_or("", String::as_str);
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// An age in seconds as kubectl prints it, plus " ago": `12s ago`, `5m3s ago`, `2h7m ago`,
/// `3d4h ago`. A negative age (the other clock is ahead) is `just now`.
pub fn ago(seconds: i64) -> String {
    if seconds < 0 {
        return "just now".to_owned();
    }
    let (m, s) = (seconds / 60, seconds % 60);
    let (h, m) = (m / 60, m % 60);
    let (d, h) = (h / 24, h % 24);
    let age = match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if m < 10 => format!("{m}m{s}s"),
        (0, 0, _) => format!("{m}m"),
        (0, _, _) => format!("{h}h{m}m"),
        _ if d < 7 => format!("{d}d{h}h"),
        _ => format!("{d}d"),
    };
    format!("{age} ago")
}

/// A byte count with a binary unit: `0 B`, `999 B`, `1.5 KiB`, `12.0 MiB`.
pub fn bytes(count: i64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if count.unsigned_abs() < 1024 {
        return format!("{count} B");
    }
    #[allow(clippy::cast_precision_loss)] // one decimal is shown
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_without_trailing_spaces() {
        let text = render(
            &["NAME", "READY", "NODES"],
            &[
                vec!["cluster-b".into(), "True".into(), "2".into()],
                vec!["c".into(), String::new(), "10".into()],
                vec!["short-row".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME        READY   NODES\n\
             cluster-b   True    2\n\
             c                   10\n\
             short-row\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(render(&["A", "B"], &[]), "A   B\n");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(ago(0), "0s ago");
        assert_eq!(ago(12), "12s ago");
        assert_eq!(ago(60), "1m0s ago");
        assert_eq!(ago(303), "5m3s ago");
        assert_eq!(ago(1_500), "25m ago");
        assert_eq!(ago(7_620), "2h7m ago");
        assert_eq!(ago(3 * 86_400 + 4 * 3_600 + 5), "3d4h ago");
        assert_eq!(ago(30 * 86_400), "30d ago");
        assert_eq!(ago(-3), "just now");
    }

    #[test]
    fn byte_counts_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1_023), "1023 B");
        assert_eq!(bytes(1_536), "1.5 KiB");
        assert_eq!(bytes(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
