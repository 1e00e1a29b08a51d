//! The job flow and the status timeline on a transfer's page: every step of
//! the flow this node knows ([`crate::store::Store::chain`]), indented by
//! its depth, each with its nodes, file, status and times, linked to its own
//! page; then every status the transfer's rows took, with the time.

use maud::{Markup, html};

use crate::store::{Chain, Event, Step, StepView};

/// The "Job flow" section: nothing when the transfer is alone in its flow.
pub fn section(chain: &Chain) -> Markup {
    html! {
        section #flow {
            h2 { "Job flow" }
            @if chain.steps.len() <= 1 {
                p.note { "No transfer started this one, and it started none that this node knows of." }
            } @else {
                p.note { "Every step this node knows of, from the first (root " (chain.root.to_string()) ")." }
                ol.flow {
                    @for s in &chain.steps { (step(s, chain)) }
                }
            }
            @for note in chain.notes() {
                p.note { (note) }
            }
        }
    }
}

fn step(s: &Step, chain: &Chain) -> Markup {
    let id = s.transfer_id.to_string();
    let here = s.transfer_id == chain.transfer_id;
    let dash = || "-".to_string();
    let hop = match (&s.from, &s.to) {
        (Some(f), Some(t)) => format!("{f} → {t}"),
        _ => format!("on {}", s.node),
    };
    let seen = match s.view {
        StepView::Local => "",
        StepView::Receipt => " (as its receipt told)",
        StepView::Parent => " (known by its id)",
    };
    html! {
        li.step data-depth=(s.depth) data-id=(id) class=[here.then_some("here")] {
            span.hop { (hop) }
            " "
            span.file {
                (s.file_id.as_ref().map(|f| f.to_string()).unwrap_or_else(dash))
                " "
                (s.file_name.clone().unwrap_or_else(dash))
            }
            " "
            @match s.status {
                Some(st) => (super::view::status(st)),
                None => span.status { "?" },
            }
            @if let Some(code) = &s.error_code { " " code { (code) } }
            " "
            span.times {
                (s.started_at.clone().unwrap_or_else(dash))
                " … "
                (s.finished_at.clone().unwrap_or_else(dash))
            }
            (seen)
            " "
            a.tid href={ "/transfers/" (id) } { (id) }
        }
    }
}

/// The "Timeline" section: each status a row took, oldest first.
pub fn timeline(events: &[Event]) -> Markup {
    html! {
        section #timeline {
            h2 { "Timeline" }
            table {
                thead { tr { th { "Time" } th { "Side" } th { "Peer" } th { "Status" } th { "Code" } } }
                tbody {
                    @for e in events {
                        tr {
                            td { (e.at) }
                            td { (e.direction) }
                            td { (e.peer) }
                            td { (e.status) }
                            td { @if let Some(c) = &e.error_code { code { (c) } } @else { "-" } }
                        }
                    }
                }
            }
        }
    }
}
