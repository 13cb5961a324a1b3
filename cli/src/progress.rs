//! Progress for people: drawn (with `\r` redraws) on stderr only when stderr is a terminal, so
//! pipes, files and log collectors never receive it.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a [`spinner`] redraws.
const SPINNER_TICK_MS: u64 = 200;

/// A bar of `len` steps drawn with the indicatif `template` on stderr when it is a terminal;
/// a hidden bar (every call a no-op) otherwise.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("#>."));
    }
    bar
}

/// A line without a known end, showing its message (set with `set_message`), on stderr when it is
/// a terminal; hidden otherwise.
pub fn spinner() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
        spinner.set_style(style);
    }
    spinner.enable_steady_tick(std::time::Duration::from_millis(SPINNER_TICK_MS));
    spinner
}
