//! Input validation: every form field is checked here, and every refusal
//! says what was wrong in words a voter or an admin understands.

/// Most options a poll may have.
pub const MAX_OPTIONS: usize = 20;

/// A poll as the admin typed it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPoll {
    /// The question, 1–200 characters.
    pub title: String,
    /// Optional description, at most 2000 characters.
    pub description: String,
    /// One option per line, 2–20 of 1–100 characters each.
    pub options: Vec<String>,
    /// Voters may move their vote.
    pub allow_revote: bool,
}

/// Checks a single-line text field.
pub fn text(field: &str, value: Option<&str>, min: usize, max: usize) -> Result<String, String> {
    let value = value.unwrap_or("").trim();
    let length = value.chars().count();
    if length < min {
        return Err(if min == 1 {
            format!("{field} is required.")
        } else {
            format!("{field} needs at least {min} characters.")
        });
    }
    if length > max {
        return Err(format!(
            "{field} is too long: {length} characters, at most {max}."
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(format!("{field} contains control characters."));
    }
    Ok(value.to_owned())
}

/// Checks the admin's poll form (`options` has one option per line).
pub fn new_poll(
    title: Option<&str>,
    description: Option<&str>,
    options: Option<&str>,
    allow_revote: bool,
) -> Result<NewPoll, String> {
    let title = text("The question", title, 1, 200)?;
    if title.contains('\n') {
        return Err("The question must be a single line.".into());
    }
    let description = text("The description", description, 0, 2000)?;
    let lines: Vec<&str> = options
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    if lines.len() < 2 {
        return Err("A poll needs at least two options, one per line.".into());
    }
    if lines.len() > MAX_OPTIONS {
        return Err(format!(
            "A poll has at most {MAX_OPTIONS} options; this one has {}.",
            lines.len()
        ));
    }
    let mut options = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let option = text(&format!("Option {}", index + 1), Some(line), 1, 100)?;
        if options.contains(&option) {
            return Err(format!("Option {:?} is listed twice.", option));
        }
        options.push(option);
    }
    Ok(NewPoll {
        title,
        description,
        options,
        allow_revote,
    })
}

/// A positive id from a path or form field.
pub fn id(value: Option<&str>) -> Option<i64> {
    value?.trim().parse().ok().filter(|id| *id > 0)
}

/// An idempotency key: 16–64 characters of A–Z, a–z, 0–9, `-` and `_`.
pub fn idempotency_key(value: Option<&str>) -> Result<&str, String> {
    let value = value.unwrap_or("");
    let well_formed = (16..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if well_formed {
        Ok(value)
    } else {
        Err("This form is missing its submission key. Reload the page and vote again.".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_form_is_trimmed_and_checked() {
        let poll = new_poll(
            Some("  Tea or coffee? "),
            None,
            Some("Tea\n\n Coffee \n"),
            true,
        )
        .unwrap();
        assert_eq!(poll.title, "Tea or coffee?");
        assert_eq!(poll.options, ["Tea", "Coffee"]);
        assert_eq!(
            new_poll(Some(""), None, Some("a\nb"), true).unwrap_err(),
            "The question is required."
        );
        assert_eq!(
            new_poll(Some("Q"), None, Some("only one"), true).unwrap_err(),
            "A poll needs at least two options, one per line."
        );
        assert_eq!(
            new_poll(Some("Q"), None, Some("same\nsame"), true).unwrap_err(),
            "Option \"same\" is listed twice."
        );
        let long = "x".repeat(201);
        assert!(new_poll(Some(&long), None, Some("a\nb"), true)
            .unwrap_err()
            .contains("too long: 201 characters"));
        let many = (0..21)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(new_poll(Some("Q"), None, Some(&many), true).is_err());
        assert!(text("Name", Some("a\u{7}b"), 1, 10).is_err());
    }

    #[test]
    fn ids_and_keys() {
        assert_eq!(id(Some("42")), Some(42));
        assert_eq!(id(Some("-1")), None);
        assert_eq!(id(Some("4x")), None);
        assert_eq!(id(None), None);
        assert!(idempotency_key(Some("abcdefghijklmnop")).is_ok());
        assert!(idempotency_key(Some("short")).is_err());
        assert!(idempotency_key(Some("abcdefghijklmnop<")).is_err());
        assert!(idempotency_key(None).is_err());
    }
}
