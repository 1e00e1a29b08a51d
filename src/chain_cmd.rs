//! `hakobu history --chain ID`: a transfer's whole job flow as this node
//! knows it ([`crate::store::Store::chain`]), as an indented tree or one JSON
//! object; and the parent a `hakobu send` records (`--parent`, or
//! `HAKOBU_TRANSFER_ID` when a hook runs it).

use std::io::Write;

use anyhow::anyhow;

use crate::config::Config;
use crate::domain::{TransferId, escape_text};
use crate::error_code::ErrorCode;
use crate::store::{Chain, Step, StepView, Store};

/// The environment variable hooks get, naming the transfer that runs them.
pub const PARENT_ENV: &str = "HAKOBU_TRANSFER_ID";

/// The parent of a transfer `hakobu send` starts: `--parent ID`, none with
/// `--parent none`, else `HAKOBU_TRANSFER_ID` when it is set and not empty
/// (a hook's). A value that is not a transfer id is refused (`bad_parent_id`).
pub fn parent(arg: Option<&str>) -> anyhow::Result<Option<TransferId>> {
    let env = std::env::var(PARENT_ENV).ok();
    resolve(arg, env.as_deref())
}

fn resolve(arg: Option<&str>, env: Option<&str>) -> anyhow::Result<Option<TransferId>> {
    let code = ErrorCode::BadParentId;
    match arg {
        Some("none") => Ok(None),
        Some(id) => TransferId::parse(id).map(Some).map_err(|_| {
            anyhow!(
                "{code}: --parent {:?} is not a transfer id; give the id `hakobu history` shows, or `--parent none`",
                escape_text(id)
            )
        }),
        None => match env.filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(id) => TransferId::parse(id).map(Some).map_err(|_| {
                anyhow!(
                    "{code}: {PARENT_ENV}={:?} in the environment is not a transfer id; unset it, or give `--parent ID` or `--parent none`",
                    escape_text(id)
                )
            }),
        },
    }
}

/// Prints the flow of `id`. Exit codes as the command line's: 2 for an id
/// that is not a transfer id or that this node does not know, 1 when the
/// state database fails.
pub async fn run(
    cfg: &Config,
    store: &Store,
    id: &str,
    json: bool,
) -> Result<(), (u8, anyhow::Error)> {
    let unknown = ErrorCode::UnknownTransfer;
    let tid = TransferId::parse(id).map_err(|_| {
        (
            2,
            anyhow!(
                "{unknown}: {:?} is not a transfer id; copy one from `hakobu history`",
                escape_text(id)
            ),
        )
    })?;
    let chain = store
        .chain(&cfg.node, &tid)
        .await
        .map_err(|e| (1, anyhow!("{}: {e}", e.code())))?
        .ok_or_else(|| {
            (
                2,
                anyhow!(
                    "{unknown}: no transfer {tid} in the history of {} (node {}); run `hakobu history --chain` on a node the transfer went through",
                    cfg.state_dir.display(),
                    cfg.node
                ),
            )
        })?;
    let mut out = std::io::stdout().lock();
    // A reader that stops early (`| head`) is not an error.
    let _ = if json {
        writeln!(out, "{}", serde_json::to_string(&chain).unwrap_or_default())
    } else {
        write_tree(&mut out, &chain)
    };
    Ok(())
}

/// One line per step, indented by its depth.
fn write_tree(out: &mut impl Write, chain: &Chain) -> std::io::Result<()> {
    writeln!(
        out,
        "flow of {} as {} knows it (root {}):",
        chain.transfer_id, chain.node, chain.root
    )?;
    for s in &chain.steps {
        writeln!(out, "{}{}", "  ".repeat(s.depth + 1), line(s))?;
    }
    for note in chain.notes() {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

fn line(s: &Step) -> String {
    let dash = || "-".to_string();
    // Names and times may have come from the network: escaped.
    let text = |v: &Option<String>| v.as_deref().map(escape_text).unwrap_or_else(dash);
    let hop = match (&s.from, &s.to) {
        (Some(f), Some(t)) => format!("{f} → {t}"),
        _ => format!("on {}", s.node),
    };
    let status = s
        .status
        .map(|st| st.as_str().to_string())
        .unwrap_or_else(dash);
    let status = match &s.error_code {
        Some(code) => format!("{status} ({})", escape_text(code)),
        None => status,
    };
    match s.view {
        StepView::Parent => format!(
            "{}  {hop}  (a parent this node has no record of)",
            s.transfer_id
        ),
        StepView::Receipt => format!(
            "{}  {hop}  {}  {}  {status}  (as {}'s receipt reported)",
            s.transfer_id,
            s.file_id
                .as_ref()
                .map(|f| f.to_string())
                .unwrap_or_else(dash),
            text(&s.file_name),
            s.node
        ),
        StepView::Local => format!(
            "{}  {hop}  {}  {}  {status}  {} .. {}",
            s.transfer_id,
            s.file_id
                .as_ref()
                .map(|f| f.to_string())
                .unwrap_or_else(dash),
            text(&s.file_name),
            text(&s.started_at),
            text(&s.finished_at)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_comes_from_the_flag_then_the_hook_environment() {
        let id = TransferId::new();
        let other = TransferId::new().to_string();
        assert_eq!(resolve(None, None).unwrap(), None);
        assert_eq!(resolve(None, Some("")).unwrap(), None);
        assert_eq!(resolve(None, Some(id.as_str())).unwrap(), Some(id.clone()));
        assert_eq!(resolve(Some("none"), Some(id.as_str())).unwrap(), None);
        assert_eq!(
            resolve(Some(id.as_str()), Some(&other)).unwrap(),
            Some(id.clone())
        );
        let e = resolve(None, Some("x\u{1b}[2J")).unwrap_err().to_string();
        assert!(e.starts_with("bad_parent_id: HAKOBU_TRANSFER_ID"), "{e}");
        assert!(!e.contains('\u{1b}'), "escaped: {e}");
        let e = resolve(Some("42"), None).unwrap_err().to_string();
        assert!(e.starts_with("bad_parent_id: --parent"), "{e}");
    }
}
