//! Glob patterns of token claims: `*` matches any run of characters (`/` and `:` included), `?`
//! one character; everything else is literal. Matching is linear in the text (no backtracking
//! blow-up on hostile patterns or keys).

/// One pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(p: &str) -> Glob {
        Glob(p.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// No wildcard: matches only itself.
    pub fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.is_literal() {
            return self.0 == text;
        }
        if self.0.is_ascii() && text.is_ascii() {
            // the common case, per row of every filtered patch: no allocation
            return wild(self.0.as_bytes(), text.as_bytes(), b'*', b'?');
        }
        let p: Vec<char> = self.0.chars().collect();
        let t: Vec<char> = text.chars().collect();
        wild(&p, &t, '*', '?')
    }
}

/// The classic two-pointer wildcard match of `t` against `p`: O(|p| * |t|) at worst, no
/// recursion.
fn wild<T: PartialEq + Copy>(p: &[T], t: &[T], any_run: T, one: T) -> bool {
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && (p[i] == one || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == any_run {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    while i < p.len() && p[i] == any_run {
        i += 1;
    }
    i == p.len()
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn wildcards() {
        let m = |p: &str, t: &str| Glob::new(p).matches(t);
        assert!(m("*", ""));
        assert!(m("*", "anything/at:all"));
        assert!(m("game_*", "game_12"));
        assert!(!m("game_*", "games"));
        assert!(m("nba:*", "nba:42"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*b*d", "abcd"));
        assert!(!m("*b*d", "abce"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exact2"));
        assert!(m("ü*", "über"));
        assert!(m("?ber", "über"), "? is one character, not one byte");
        // a hostile pattern stays fast
        let long = "a".repeat(5000);
        assert!(!m("*a*a*a*a*a*a*a*a*b", &long));
    }
}
