//! The admin interface's HTML. Every form carries the session's CSRF token.

use crate::admin_store::PollStats;
use crate::store::Poll;
use maud::{html, Markup};

/// The admin frame: the public layout plus a nav bar with logout.
pub fn frame(title: &str, degraded: bool, csrf: &str, body: Markup) -> Markup {
    crate::pages::layout(
        title,
        degraded,
        html! {
            nav {
                a href="/" { "Dashboard" } " · " a href="/polls/new" { "New poll" } " · "
                form.inline method="post" action="/logout" {
                    input type="hidden" name="csrf" value=(csrf);
                    button type="submit" { "Log out" }
                }
            }
            (body)
        },
    )
}

/// The login form.
pub fn login(csrf: &str, error: Option<&str>) -> Markup {
    html! {
        h1 { "Admin login" }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            p { label { "User name" input type="text" name="username" autocomplete="username" required; } }
            p { label { "Password" input type="password" name="password" autocomplete="current-password" required; } }
            p { button type="submit" { "Log in" } }
        }
    }
}

/// The dashboard: statistics and the degraded-mode switch.
pub fn dashboard(polls: &[PollStats], operator_degraded: bool, csrf: &str) -> Markup {
    html! {
        h1 { "Dashboard" }
        section {
            h2 { "Degraded mode" }
            p {
                @if operator_degraded { "On: the site is read-only and refuses votes politely." }
                @else { "Off: votes are accepted." }
            }
            form method="post" action="/degraded" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="on" value=(if operator_degraded { "0" } else { "1" });
                button type="submit" id="toggle-degraded" {
                    @if operator_degraded { "Switch degraded mode off" } @else { "Switch degraded mode on" }
                }
            }
        }
        h2 { "Polls" }
        table.stats {
            thead { tr { th { "Poll" } th { "State" } th { "Votes" } th { "Submissions" } th { "Views" } } }
            tbody {
                @for poll in polls {
                    tr {
                        td { a href={ "/polls/" (poll.id) } { (poll.title) } }
                        td { @if poll.is_open { "open" } @else { "closed" } }
                        td { (poll.votes) } td { (poll.submissions) } td { (poll.views) }
                    }
                }
            }
        }
    }
}

/// What the poll form shows (kept on a validation error so nothing typed is lost).
#[derive(Debug, Default)]
pub struct PollDraft<'a> {
    /// The question.
    pub title: &'a str,
    /// The description.
    pub description: &'a str,
    /// One option per line.
    pub options: &'a str,
    /// Re-votes allowed.
    pub allow_revote: bool,
}

/// The new-poll form.
pub fn new_poll(draft: &PollDraft<'_>, error: Option<&str>, csrf: &str) -> Markup {
    html! {
        h1 { "New poll" }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action="/polls" {
            input type="hidden" name="csrf" value=(csrf);
            p { label { "Question" input type="text" name="title" value=(draft.title) maxlength="200" required; } }
            p { label { "Description (optional)" textarea name="description" rows="3" { (draft.description) } } }
            p { label { "Options, one per line" textarea name="options" rows="6" required { (draft.options) } } }
            p { label { input type="checkbox" name="allow_revote" value="1" checked[draft.allow_revote]; " Voters may change their vote" } }
            p { button type="submit" { "Create poll" } }
        }
    }
}

/// The edit page of one poll.
pub fn edit_poll(poll: &Poll, error: Option<&str>, csrf: &str) -> Markup {
    let base = format!("/polls/{}", poll.id);
    html! {
        h1 { "Edit: " (poll.title) }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action=(base) {
            input type="hidden" name="csrf" value=(csrf);
            p { label { "Question" input type="text" name="title" value=(poll.title) maxlength="200" required; } }
            p { label { "Description" textarea name="description" rows="3" { (poll.description) } } }
            p { label { input type="checkbox" name="allow_revote" value="1" checked[poll.allow_revote]; " Voters may change their vote" } }
            p { button type="submit" { "Save" } }
        }
        form method="post" action={ (base) "/open" } {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="open" value=(if poll.is_open { "0" } else { "1" });
            p {
                "This poll is " (if poll.is_open { "open" } else { "closed" }) ". "
                button type="submit" { @if poll.is_open { "Close it" } @else { "Open it" } }
            }
        }
        h2 { "Options" }
        ul {
            @for option in &poll.options {
                li {
                    (option.label)
                    @if option.removed { " (removed)" } @else {
                        " "
                        form.inline method="post" action={ (base) "/options/" (option.id) "/remove" } {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Remove" }
                        }
                    }
                }
            }
        }
    }
}
