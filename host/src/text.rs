//! Text from untrusted sources (recipes, checkpoint headers) made safe to print.
//!
//! A recipe's name, notes, refusal messages and logs reach the terminal; raw, they
//! could clear the screen, move the cursor, forge a `builtin:` label on a line of
//! their own or flood the terminal. Everything such a string holds that is not
//! plain printable text is shown escaped, and the string is cut to a length.

/// Longest recipe string printed, in characters.
pub const MAX_PRINTED: usize = 500;

/// Characters that reorder or hide text on a terminal (bidi overrides, zero-width).
fn is_invisible_control(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `s` with control characters (C0, DEL, C1, bidi and zero-width marks) escaped as
/// `\u{..}` / `\n` / `\t`, cut to `max` characters with a note of what was left out.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 2));
    for (shown, (i, c)) in s.char_indices().enumerate() {
        if shown >= max {
            out.push_str(&format!("... ({} more bytes)", s.len() - i));
            return out;
        }
        if c.is_control() || is_invisible_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`sanitize`] with the default length, for recipe strings.
pub fn untrusted(s: &str) -> String {
    sanitize(s, MAX_PRINTED)
}

/// A multi-line message (an error with its causes) for the terminal: each line
/// sanitized and cut to `max_line` characters, at most `max_lines` lines.
pub fn sanitize_lines(s: &str, max_line: usize, max_lines: usize) -> String {
    let lines: Vec<&str> = s.split('\n').collect();
    let mut out: Vec<String> = lines.iter().take(max_lines).map(|l| sanitize(l, max_line)).collect();
    if lines.len() > max_lines {
        out.push(format!("... ({} more lines)", lines.len() - max_lines));
    }
    out.join("\n")
}

/// A byte count for people: `1536` -> `1.50 KiB`.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.2} {}", units[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_truncates() {
        assert_eq!(sanitize("plain text: ok", 100), "plain text: ok");
        assert_eq!(sanitize("\x1b[2Jhi\nbuiltin: x\r\u{7}", 100), "\\u{1b}[2Jhi\\nbuiltin: x\\r\\u{7}");
        assert_eq!(sanitize("a\u{202e}b\u{9b}c", 100), "a\\u{202e}b\\u{9b}c");
        assert_eq!(sanitize("déjà vu", 100), "déjà vu");
        assert_eq!(sanitize(&"x".repeat(1000), 10), format!("{}... (990 more bytes)", "x".repeat(10)));
        assert!(!sanitize(&"\x1b".repeat(1 << 20), MAX_PRINTED).contains('\x1b'));
        assert_eq!(sanitize_lines("a\x1b\nb\nc", 10, 2), "a\\u{1b}\nb\n... (1 more lines)");
    }
}
