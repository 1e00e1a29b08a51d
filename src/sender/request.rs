//! Send requests (HULFT's 送信要求): another node asks this one for the file
//! of a send profile that lists it in `requests_from`, and gets the
//! profile's `source` (or what is ready in its outbox) through the normal
//! path, then a reply naming the transfers started, or why none was.
//!
//! Every request is a row of the requests ledger first, and is served by
//! the queue poller: one asked of this node (`in`, recorded when its message
//! arrives, then acked), one this node asks (`out`, recorded by `hakobu
//! request`, published here), and `hakobu send` without a path (`local`,
//! this node's own profile). A request's `from` is bound to its broker
//! user like a chunk's (`verify_sender`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::Sender;
use super::claim::{Started, convert_claimed, sized_rows};
use crate::broker::Delivery;
use crate::config::SendProfile;
use crate::domain::{NodeName, TransferId, escape_text};
use crate::error_code::ErrorCode;
use crate::store::{RequestDir, RequestRow, RequestStatus, Status};
use crate::wire::{Message, Request, RequestReply};

/// Publishes of a reply before it is given up (about two minutes).
const REPLY_ATTEMPTS: u32 = 30;

impl Sender {
    /// A request from another node: recorded (once; a redelivery finds its
    /// row), then acked; the poller serves it.
    pub async fn on_request(self: &Arc<Self>, r: Request, d: Delivery) {
        if self.cfg.verify_sender() && d.user_id.as_deref() != Some(r.from.as_str()) {
            warn!(message = "Dead-lettering a request whose sender is not its broker user.",
                request_id = %r.request_id, from = %r.from, user = ?d.user_id, error_code = %ErrorCode::SenderMismatch);
            let _ = d.dead_letter().await;
            return;
        }
        if r.to != self.cfg.node {
            warn!(message = "Ignoring a request addressed to another node.", to = %r.to, request_id = %r.request_id);
            let _ = d.ack().await;
            return;
        }
        let row = RequestRow::new(r.request_id.clone(), RequestDir::In, r.from, r.file_id);
        match self.requests.insert(row).await {
            Ok(new) => {
                if new {
                    info!(message = "Request.", request_id = %r.request_id);
                } else {
                    info!(message = "Duplicate request; already recorded.", request_id = %r.request_id);
                }
                let _ = d.ack().await;
            }
            // Not acked: delivered again after a reconnect.
            Err(e) => {
                error!(message = "State database failed while recording a request.", error = %e, error_code = %e.code())
            }
        }
    }

    /// The reply to a request this node asked: recorded, for `hakobu request`.
    pub async fn on_request_reply(self: &Arc<Self>, r: RequestReply, d: Delivery) {
        if self.cfg.verify_sender() && d.user_id.as_deref() != Some(r.from.as_str()) {
            warn!(message = "Dead-lettering a request reply whose sender is not its broker user.",
                request_id = %r.request_id, from = %r.from, user = ?d.user_id, error_code = %ErrorCode::SenderMismatch);
            let _ = d.dead_letter().await;
            return;
        }
        if r.to != self.cfg.node {
            let _ = d.ack().await;
            return;
        }
        // Free text from another node: a code that is no code is dropped,
        // the sentence escaped and cut.
        let code = r
            .error_code
            .as_deref()
            .and_then(ErrorCode::parse)
            .or((!r.ok).then_some(ErrorCode::MalformedMessage))
            .map(ErrorCode::as_str);
        let sentence = r.error.map(|e| {
            let mut e = escape_text(&e);
            let cut = (0..=e.len().min(2000))
                .rev()
                .find(|&i| e.is_char_boundary(i))
                .unwrap_or(0);
            e.truncate(cut);
            e
        });
        let error = code.map(|c| (c, sentence.as_deref().unwrap_or("")));
        let key = (RequestDir::Out, &r.request_id, &r.from);
        match self.requests.answer(key, error, &r.transfer_ids).await {
            Ok(true) => {
                info!(message = "Request answered.", request_id = %r.request_id, from = %r.from, ok = r.ok, error_code = ?code, transfers = r.transfer_ids.len());
                let _ = d.ack().await;
            }
            Ok(false) => {
                info!(message = "Ignoring a reply to no request of ours waiting for one.", request_id = %r.request_id, from = %r.from);
                let _ = d.ack().await;
            }
            Err(e) => {
                error!(message = "State database failed while recording a request reply.", error = %e, error_code = %e.code())
            }
        }
    }

    /// Takes the queued requests (called by the queue poller).
    pub(super) async fn poll_requests(self: &Arc<Self>) {
        let rows = match self.requests.in_status(RequestStatus::Queued).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(message = "Cannot read queued requests.", error = %e, error_code = %e.code());
                return;
            }
        };
        for row in rows {
            let key = (row.dir, &row.request_id);
            if let Ok(true) = self
                .requests
                .advance(key, RequestStatus::Queued, RequestStatus::Working)
                .await
            {
                let this = self.clone();
                self.tasks
                    .spawn(async move { this.take_request(row).await });
            }
        }
    }

    /// Start-up: requests this node was serving when it stopped are failed
    /// (`request_interrupted`), and the asking nodes told.
    pub(super) async fn interrupt_requests(self: &Arc<Self>) {
        match self.requests.interrupt_working().await {
            Ok(rows) => {
                for row in rows.into_iter().filter(|r| r.dir == RequestDir::In) {
                    warn!(message = "A request was being served when the agent stopped; failing it.", request_id = %row.request_id, error_code = %ErrorCode::RequestInterrupted);
                    let this = self.clone();
                    let why = "the agent stopped while it served the request; ask again";
                    let error = Some((ErrorCode::RequestInterrupted, why.to_string()));
                    self.tasks
                        .spawn(async move { this.reply(&row, error, Vec::new()).await });
                }
            }
            Err(e) => {
                error!(message = "Cannot read the requests under way.", error = %e, error_code = %e.code())
            }
        }
    }

    async fn take_request(self: Arc<Self>, row: RequestRow) {
        if row.dir == RequestDir::Out {
            let msg = Message::Request(Request {
                request_id: row.request_id.clone(),
                file_id: row.file_id.clone(),
                from: self.cfg.node.clone(),
                to: row.peer.clone(),
                requested_at: row.created_at.clone(),
            });
            if !self.publish_to(&row.peer, msg, u32::MAX).await {
                // Stopping: published at the next start.
                let key = (row.dir, &row.request_id);
                let _ = self
                    .requests
                    .advance(key, RequestStatus::Working, RequestStatus::Queued)
                    .await;
            } else {
                info!(message = "Request sent.", request_id = %row.request_id, to = %row.peer, file_id = %row.file_id);
            }
            return;
        }
        let started = self.serve(&row).await;
        let outcome = match (&started.failed, started.tids.is_empty()) {
            (Some(f), _) => Some(f.clone()),
            (None, true) => Some((
                ErrorCode::NothingToSend,
                "nothing to send: no file is ready in the profile's outbox".to_string(),
            )),
            (None, false) => None,
        };
        if let Some((code, why)) = &outcome {
            info!(message = "Request refused or failed.", request_id = %row.request_id, from = %row.peer, error_code = %code, error = %why);
        } else {
            info!(message = "Request served.", request_id = %row.request_id, to = %row.peer, transfers = started.tids.len());
        }
        self.reply(&row, outcome, started.tids).await;
    }

    /// Records a served request's outcome and, for another node's, tells it.
    async fn reply(
        &self,
        row: &RequestRow,
        outcome: Option<(ErrorCode, String)>,
        tids: Vec<TransferId>,
    ) {
        let error = outcome.as_ref().map(|(c, w)| (c.as_str(), w.as_str()));
        let key = (row.dir, &row.request_id, &row.peer);
        if let Err(e) = self.requests.answer(key, error, &tids).await {
            error!(message = "State database failed while recording a request's outcome.", error = %e, error_code = %e.code());
        }
        if row.dir != RequestDir::In {
            return;
        }
        let msg = Message::RequestReply(RequestReply {
            request_id: row.request_id.clone(),
            file_id: row.file_id.clone(),
            from: self.cfg.node.clone(),
            to: row.peer.clone(),
            ok: outcome.is_none(),
            error_code: outcome.as_ref().map(|(c, _)| c.as_str().to_string()),
            error: outcome.map(|(_, w)| w),
            transfer_ids: tids,
        });
        self.publish_to(&row.peer, msg, REPLY_ATTEMPTS).await;
    }

    /// Publishes `msg` to `node` until the broker confirms it, at most
    /// `attempts` times (a reply to a node whose queue never appears is
    /// given up, not retried for ever); false when it was not published.
    async fn publish_to(&self, node: &NodeName, msg: Message, attempts: u32) -> bool {
        let mut backoff = Duration::from_millis(200);
        for attempt in 1.. {
            match self.out.publish(node, msg.clone()).await {
                Ok(()) => return true,
                Err(e) if attempt >= attempts => {
                    warn!(message = "Cannot publish a request message; giving up.", to = %node, attempts, error_code = %e.code(), error = %e);
                    return false;
                }
                Err(e) => {
                    warn!(message = "Cannot publish a request message; retrying.", to = %node, error_code = %e.code(), error = %e);
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        false
    }

    /// Serves a request asked of this node (`in`) or queued by `hakobu
    /// send` (`local`): the checks, then the source or the ready files.
    async fn serve(self: &Arc<Self>, row: &RequestRow) -> Started {
        let refuse = |code: ErrorCode, why: String| Started {
            tids: Vec::new(),
            failed: Some((code, why)),
        };
        let Some(profile) = self.cfg.send_profile(&row.file_id) else {
            return refuse(
                ErrorCode::UnknownFileId,
                format!(
                    "node {} has no send profile for file id {}",
                    self.cfg.node, row.file_id
                ),
            );
        };
        let (peers, request) = match row.dir {
            RequestDir::In if !profile.requests_from.contains(&row.peer) => {
                return refuse(
                    ErrorCode::RequestDenied,
                    format!(
                        "node {} may not ask node {} for file id {}: add it to the send profile's requests_from there",
                        row.peer, self.cfg.node, row.file_id
                    ),
                );
            }
            RequestDir::In => (vec![row.peer.clone()], Some(&row.request_id)),
            _ if row.peer == self.cfg.node => (profile.to.clone(), None),
            _ => (vec![row.peer.clone()], None),
        };
        if peers.is_empty() {
            return refuse(
                ErrorCode::NothingToSend,
                "the send profile has no `to`: give `hakobu send --to NODE`".into(),
            );
        }
        let mut profile = profile.clone();
        profile.to = peers;
        match profile.source.clone() {
            Some(source) => {
                let ids = (request, row.parent_id.as_ref());
                self.send_source(&profile, &source, ids).await
            }
            None => {
                let p = profile.clone();
                let names = tokio::task::spawn_blocking(move || super::watch::ready_now(&p))
                    .await
                    .unwrap_or_default();
                if names.is_empty() {
                    return Started::default();
                }
                // A window at a time, as the watcher claims (`backlog.rs`).
                let ids = (request, row.parent_id.as_ref());
                let mut started = Started::default();
                for batch in names.chunks(super::watch::CLAIM_MAX) {
                    self.wait_for_room(profile.priority).await;
                    let more = self.claim_child(&profile, batch.to_vec(), ids).await;
                    started.tids.extend(more.tids);
                    started.failed = started.failed.or(more.failed);
                }
                started
            }
        }
    }

    /// Sends `source` as a copy: its `before_send` job first (which may
    /// write it), then the copy into the spool, then the rows.
    async fn send_source(
        self: &Arc<Self>,
        profile: &SendProfile,
        source: &Path,
        (request, parent): (Option<&TransferId>, Option<&TransferId>),
    ) -> Started {
        let tid = TransferId::new();
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let job = self
            .before_send(profile, (&tid, &name, source), &profile.to)
            .await;
        let (spool, file_id, src, n, t) = (
            self.spool.clone(),
            profile.file_id.clone(),
            source.to_path_buf(),
            name.clone(),
            tid.clone(),
        );
        let copied =
            tokio::task::spawn_blocking(move || spool.copy_in_as(&file_id, &src, &n, t)).await;
        let copied = copied.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let file = match (copied, job) {
            (Ok(file), job) => (file, job),
            (Err(_), Err(why)) => {
                return Started {
                    tids: Vec::new(),
                    failed: Some((ErrorCode::BeforeSendFailed, why)),
                };
            }
            (Err(e), Ok(())) => {
                let why = format!(
                    "nothing to send: the source {} cannot be read ({e}); let the export write it, then ask again",
                    source.display()
                );
                return Started {
                    tids: Vec::new(),
                    failed: Some((ErrorCode::NothingToSend, why)),
                };
            }
        };
        let (file, job) = file;
        let mut refused = Vec::new();
        let mut pending = None;
        match job {
            // The copy is converted (`convert:`), as a claimed file is.
            Ok(()) => match convert_claimed(profile, vec![file.clone()], &mut refused).await {
                (ok, mut conv) if !ok.is_empty() => pending = conv.pop().flatten(),
                _ => {}
            },
            Err(why) => refused.push((file.clone(), ErrorCode::BeforeSendFailed, why)),
        }
        let (mut rows, failed) = match refused.pop() {
            None => {
                let converted = pending.as_ref().map(|p| &p.converted);
                let status = (Status::Sending, request);
                let rows = sized_rows(profile, &file, &BTreeMap::new(), status, converted);
                (rows, None)
            }
            Some((_, code, why)) => (
                self.failed_rows(profile, &file, request, (code, &why)),
                Some((code, why)),
            ),
        };
        for row in &mut rows {
            row.transfer.parent_id = parent.cloned();
        }
        if let Err(e) = self.ledger.insert_all(rows.clone()).await {
            error!(message = "Cannot record the copy of a source; it is recorded at the next start.", error = %e, error_code = %e.code());
            if let Some(p) = &pending {
                p.discard();
            }
            return Started {
                tids: vec![tid],
                failed: Some((ErrorCode::NothingToSend, e.to_string())),
            };
        }
        if let Some(Err(e)) = pending.as_ref().map(super::convert::Pending::commit) {
            // The publisher puts it in place before reading it.
            warn!(message = "Cannot put a converted source in place in the spool yet.", transfer_id = %tid, error = %e);
        }
        info!(message = "Source copied.", transfer_id = %tid, file_id = %profile.file_id, file_name = %name);
        self.start_rows(&rows);
        Started {
            tids: vec![tid],
            failed,
        }
    }
}
