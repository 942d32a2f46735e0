//! The results bar chart, as server-rendered SVG (no JavaScript needed).

use maud::{html, Markup};

/// Tenths of a percent of `count` in `total`, rounded down.
pub fn per_mille(count: i64, total: i64) -> i64 {
    if total <= 0 {
        0
    } else {
        count.max(0) * 1000 / total
    }
}

/// `per_mille` as text, e.g. `33.3%`.
pub fn percent(count: i64, total: i64) -> String {
    let tenths = per_mille(count, total);
    format!("{}.{}%", tenths / 10, tenths % 10)
}

const WIDTH: i64 = 640;
const LABEL_WIDTH: i64 = 200;
const ROW: i64 = 34;

/// A horizontal bar per option; labels are escaped like any other text.
pub fn bars(rows: &[(String, i64)], total: i64) -> Markup {
    let height = ROW * rows.len().max(1) as i64;
    let bar_space = WIDTH - LABEL_WIDTH - 110;
    html! {
        svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img"
            viewBox={ "0 0 " (WIDTH) " " (height) } width=(WIDTH) height=(height) {
            title { "Results" }
            @for (index, (label, count)) in rows.iter().enumerate() {
                @let y = index as i64 * ROW;
                @let width = bar_space * per_mille(*count, total) / 1000;
                text x="0" y=(y + 22) font-size="14" { (truncate(label, 26)) }
                rect x=(LABEL_WIDTH) y=(y + 6) width=(width.max(1)) height="22" rx="3" fill="#3b6fd8" {}
                text x=(LABEL_WIDTH + width + 8) y=(y + 22) font-size="14" {
                    (count) " (" (percent(*count, total)) ")"
                }
            }
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(max - 1).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_down_and_survive_zero() {
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(2, 3), "66.6%");
        assert_eq!(percent(0, 0), "0.0%");
        assert_eq!(percent(5, 5), "100.0%");
    }

    #[test]
    fn labels_are_escaped_in_the_svg() {
        let svg = bars(&[("<script>x</script>".into(), 1)], 1).into_string();
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert!(!svg.contains("<script>"), "{svg}");
    }
}
