//! The public site's HTML (maud escapes every interpolated value, so nothing
//! a voter or an admin typed is ever rendered as markup).

use crate::chart;
use crate::store::{Poll, PollSummary, Results};
use maud::{html, Markup, DOCTYPE};

/// Shown on every page while the site is read-only.
pub const DEGRADED_BANNER: &str = "The site is read-only for a moment: results may be a few seconds old, and voting resumes shortly.";

/// The stylesheet, inline in every page (allowed by its hash in the CSP).
pub const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}\
a{color:#2456b8}.banner{background:#fff3c4;border:1px solid #e0c050;padding:.6rem 1rem;border-radius:4px}\
.error{background:#fde2e2;border:1px solid #d88;padding:.6rem 1rem;border-radius:4px}\
.notice{background:#e2f5e2;border:1px solid #8c8;padding:.6rem 1rem;border-radius:4px}\
label.option{display:block;padding:.3rem 0}button{padding:.4rem 1rem;font-size:1rem}\
table{border-collapse:collapse}td,th{padding:.25rem .6rem;border-bottom:1px solid #ddd;text-align:left}\
textarea,input[type=text],input[type=password]{width:100%;box-sizing:border-box;font-size:1rem}\
form.inline{display:inline}";

/// The results page's only script (allowed by its hash in the CSP): marks
/// that it ran (`data-reload`, which the browser test checks), then reloads
/// the page every 10 s.
pub const RELOAD_SCRIPT: &str =
    "document.documentElement.dataset.reload='on';setTimeout(function(){location.reload()},10000)";

/// The frame of every page.
pub fn layout(title: &str, degraded: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · JAI polls" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                header { a href="/" { "JAI polls" } }
                @if degraded {
                    p.banner role="status" id="degraded" { (DEGRADED_BANNER) }
                }
                main { (body) }
            }
        }
    }
}

/// An error page's body.
pub fn message(title: &str, text: &str, back: Option<&str>) -> Markup {
    html! {
        h1 { (title) }
        p.error role="alert" { (text) }
        @if let Some(back) = back { p { a href=(back) { "Back" } } }
    }
}

/// The front page: open polls.
pub fn index(polls: &[PollSummary]) -> Markup {
    html! {
        h1 { "Open polls" }
        @if polls.is_empty() {
            p { "No poll is open right now." }
        } @else {
            ul.polls {
                @for poll in polls {
                    li { a href={ "/polls/" (poll.id) } { (poll.title) } }
                }
            }
        }
    }
}

/// What the vote form needs besides the poll.
#[derive(Debug)]
pub struct VoteForm<'a> {
    /// CSRF token bound to the voter cookie.
    pub csrf: &'a str,
    /// This rendering's idempotency key: a resubmitted form counts once.
    pub key: &'a str,
    /// Voting is refused right now (operator degraded mode).
    pub paused: bool,
}

/// The poll page with its vote form.
pub fn poll(poll: &Poll, form: &VoteForm<'_>) -> Markup {
    html! {
        h1 { (poll.title) }
        @if !poll.description.is_empty() { p.description { (poll.description) } }
        @if !poll.is_open {
            p.notice { "This poll is closed." }
        } @else if form.paused {
            p.notice { "Voting is paused for a moment. Please try again shortly." }
        } @else {
            form method="post" action={ "/polls/" (poll.id) "/vote" } {
                input type="hidden" name="csrf" value=(form.csrf);
                input type="hidden" name="key" value=(form.key);
                fieldset {
                    legend { "Your answer" }
                    @for option in poll.visible_options() {
                        label.option {
                            input type="radio" name="option" value=(option.id) required;
                            " " (option.label)
                        }
                    }
                }
                p {
                    button type="submit" { "Vote" }
                    @if poll.allow_revote { " You can change your vote later." }
                }
            }
        }
        p { a href={ "/polls/" (poll.id) "/results" } { "See the results" } }
    }
}

/// Results: counts, percentages and the bar chart; refreshes itself.
pub fn results(results: &Results, voted: Option<&str>) -> Markup {
    let rows: Vec<(String, i64)> = results
        .counts
        .iter()
        .map(|(option, count)| (option.label.clone(), *count))
        .collect();
    html! {
        h1 { (results.poll.title) }
        @if let Some(label) = voted {
            p.notice role="status" id="voted" { "Thank you: your vote for “" (label) "” is counted." }
        }
        (chart::bars(&rows, results.total))
        table.results {
            thead { tr { th { "Option" } th { "Votes" } th { "Share" } } }
            tbody {
                @for (label, count) in &rows {
                    tr { td { (label) } td.count { (count) } td { (chart::percent(*count, results.total)) } }
                }
            }
            tfoot { tr { th { "Total" } th id="total" { (results.total) } th {} } }
        }
        @if !results.poll.is_open { p.notice { "This poll is closed." } }
        p {
            a href={ "/polls/" (results.poll.id) } { "Back to the poll" }
            " · "
            a href={ "/polls/" (results.poll.id) "/results" } { "Refresh" }
        }
        // Progressive enhancement: without JavaScript the Refresh link does the same.
        script { (maud::PreEscaped(RELOAD_SCRIPT)) }
    }
}
