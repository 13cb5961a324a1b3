//! Error text for people: every cause said once.
//!
//! Many errors repeat their source in their own message and also return it from
//! [`Error::source`] (libp2p's transport errors, `std::io::Error` wrapping a custom error, several
//! layers of each). Printing such a chain naively (`{:#}` of an `anyhow::Error`, libp2p's own
//! `DialError` text) shows one cause several times: `Connection refused (os error 111): Connection
//! refused (os error 111): Connection refused (os error 111)`. These functions print each cause
//! once.

use std::error::Error;

use libp2p::swarm::DialError;

/// The texts of `chain` (an error, then its causes) joined with `": "`, leaving out every text
/// that is empty or already contained in what was written before it.
pub fn chain_text<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut text = String::new();
    for error in chain {
        push_new(&mut text, &error.to_string());
    }
    text
}

/// [`chain_text`] of `error` and its `source()` chain.
pub fn error_text(error: &(dyn Error + 'static)) -> String {
    chain_text(causes(error))
}

/// A failed dial, one `<address>: <cause>` per address tried (joined with `"; "`), each cause said
/// once and on one line.
///
/// libp2p's own text of [`DialError::Transport`] prints every address's whole error chain, in which
/// each layer (transport error, DNS wrapper listing its attempts, the I/O error) repeats the one
/// below it.
pub fn dial_error_text(error: &DialError) -> String {
    let DialError::Transport(attempts) = error else {
        return error_text(error);
    };
    if attempts.is_empty() {
        return error.to_string();
    }
    let parts: Vec<String> = attempts.iter().map(|(addr, e)| format!("{addr}: {}", root_cause(e))).collect();
    parts.join("; ")
}

/// The causes of `error`'s chain on one line, outermost first, each `": "`-separated part said
/// once; a header introducing a list of attempts (`Multiple dial errors occurred: - ...`) is left
/// out, its items kept.
fn root_cause(error: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in causes(error) {
        let text = one_line(&e.to_string());
        let pieces: Vec<&str> = text.split(": ").collect();
        for (i, piece) in pieces.iter().enumerate() {
            let header = pieces.get(i + 1).is_some_and(|next| next.starts_with("- "));
            let piece = piece.trim_start_matches("- ").trim();
            if header || piece.is_empty() || parts.iter().any(|p| p == piece) {
                continue;
            }
            parts.push(piece.to_owned());
        }
    }
    if parts.is_empty() { "no cause given".to_owned() } else { parts.join(": ") }
}

/// `error`, then each error of its `source()` chain.
fn causes<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// `text` with every run of whitespace (newlines included) made one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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

    use libp2p::core::transport::TransportError;

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
        assert_eq!(error_text(&outer), format!("connecting: {cause}"));

        let context = anyhow::Error::new(refused()).context("dialing the node");
        assert_eq!(chain_text(context.chain()), format!("dialing the node: {cause}"));
    }

    #[test]
    fn a_dial_error_names_each_address_once_with_its_root_cause() {
        let cause = refused().to_string();
        // libp2p-dns lists every attempt under a header, then exposes the last attempt's cause.
        let listed = Wrapper { text: format!("Multiple dial errors occurred:\n - {cause}"), source: Box::new(refused()) };
        let io = std::io::Error::other(listed);
        let addr: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().unwrap();
        let error = DialError::Transport(vec![(addr.clone(), TransportError::Other(io))]);
        let libp2p_text = error.to_string();
        assert!(libp2p_text.matches(&cause).count() >= 2, "libp2p repeats the cause: {libp2p_text}");
        assert_eq!(dial_error_text(&error), format!("{addr}: {cause}"));

        let other: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/10".parse().unwrap();
        let handshake = Wrapper { text: format!("handshake failed: {cause}"), source: Box::new(refused()) };
        let error = DialError::Transport(vec![
            (addr.clone(), TransportError::Other(std::io::Error::other(refused()))),
            (other.clone(), TransportError::Other(std::io::Error::other(handshake))),
        ]);
        assert_eq!(dial_error_text(&error), format!("{addr}: {cause}; {other}: handshake failed: {cause}"));
    }
}
