//! Error text for people: every cause said once.
//!
//! Some errors repeat their source in their own message and also return it from
//! [`Error::source`] (`std::io::Error` wrapping a custom error, libp2p's transport errors, errors
//! of other crates). Printing such a chain naively (`{:#}` of an `anyhow::Error`) shows one cause
//! several times; [`chain_text`] prints each once.

use std::error::Error;

/// The texts of `chain` (an error, then its causes) joined with `": "`, leaving out every text
/// that is empty or already contained in what was written before it.
pub fn chain_text<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut text = String::new();
    for error in chain {
        push_new(&mut text, &error.to_string());
    }
    text
}

/// Appends `part` to `text` after `": "`, unless it is empty or `text` already says it.
fn push_new(text: &mut String, part: &str) {
    let part = part.trim();
    if part.is_empty() || text.contains(part) {
        return;
    }
    if !text.is_empty() {
        text.push_str(": ");
    }
    text.push_str(part);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::fmt;

    use super::*;

    /// An error whose text repeats its source, as libp2p's and io's wrappers do.
    #[derive(Debug)]
    struct Wrapper {
        text: String,
        source: Box<dyn Error + Send + Sync + 'static>,
    }

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.text)
        }
    }

    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.source)
        }
    }

    fn refused() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    #[test]
    fn a_cause_repeated_by_its_wrappers_is_said_once() {
        let inner = refused();
        let cause = inner.to_string();
        let wrapped = Wrapper { text: cause.clone(), source: Box::new(inner) };
        let outer = Wrapper { text: format!("connecting: {cause}"), source: Box::new(wrapped) };
        let chain = std::iter::successors(Some(&outer as &(dyn Error + 'static)), |&e| e.source());
        assert_eq!(chain_text(chain), format!("connecting: {cause}"));

        let context = anyhow::Error::new(refused()).context("dialing the node");
        assert_eq!(chain_text(context.chain()), format!("dialing the node: {cause}"));
    }
}
