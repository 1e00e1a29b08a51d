//! The terminal's view of a transfer waited for (`hakobu send --wait`,
//! `hakobu request --wait`): a byte bar (indicatif) on a terminal, a line per
//! change of status otherwise.

use crate::store::{SendRow, Status};

/// Shows where a waited-for transfer stands: a byte bar on a terminal, a
/// line per change of status otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: std::cell::RefCell<String>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            ) {
                b.set_style(style);
            }
            b
        });
        Progress {
            bar,
            last: Default::default(),
        }
    }

    pub fn show(&self, rows: &[SendRow]) {
        let line = rows
            .iter()
            .map(|r| format!("{}: {}", r.peer, r.status.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(b) = &self.bar {
            let total: u64 = rows.iter().map(|r| r.size).sum();
            let done: u64 = rows
                .iter()
                .map(|r| {
                    if r.status == Status::Sending || r.status == Status::Queued {
                        r.progress
                    } else {
                        r.size
                    }
                })
                .sum();
            b.set_length(total);
            b.set_position(done);
            b.set_message(line.clone());
        } else if *self.last.borrow() != line {
            eprintln!("{line}");
        }
        *self.last.borrow_mut() = line;
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
