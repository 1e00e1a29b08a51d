//! A completion's slot among those run at once (the receiver's
//! `COMPLETING_MAX`), given back while its hook waits for its next run
//! (`retry.rs`) and taken again before that run: a hook failing for a
//! while holds up neither the transfers after it nor other profiles'.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

tokio::task_local! {
    static SLOT: Slot;
}

pub struct Slot {
    permits: Arc<Semaphore>,
    held: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Slot {
    /// A slot already taken from `permits`.
    pub fn new(permits: Arc<Semaphore>, held: OwnedSemaphorePermit) -> Slot {
        Slot {
            permits,
            held: Mutex::new(Some(held)),
        }
    }

    /// Runs `f` holding this slot: hooks run inside it see it.
    pub async fn hold<F: Future>(self, f: F) -> F::Output {
        SLOT.scope(self, f).await
    }
}

/// Before a wait between a hook's runs: gives the slot of the task
/// waiting back (if it has one); what to take it again from.
pub(super) fn release() -> Option<Arc<Semaphore>> {
    SLOT.try_with(|s| {
        let mut held = s.held.lock().unwrap_or_else(|p| p.into_inner());
        held.take().map(|_| s.permits.clone())
    })
    .ok()
    .flatten()
}

/// After the wait, before the next run: takes a slot again.
pub(super) async fn retake(permits: Option<Arc<Semaphore>>) {
    let Some(permits) = permits else { return };
    if let Ok(p) = permits.acquire_owned().await {
        let _ = SLOT.try_with(|s| *s.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_is_given_back_for_the_wait_and_taken_again_after() {
        let permits = Arc::new(Semaphore::new(1));
        let held = permits.clone().acquire_owned().await.unwrap();
        let seen = permits.clone();
        Slot::new(permits.clone(), held)
            .hold(async move {
                assert_eq!(seen.available_permits(), 0);
                let back = release();
                assert_eq!(seen.available_permits(), 1, "given back for the wait");
                retake(back).await;
                assert_eq!(seen.available_permits(), 0, "taken again after it");
            })
            .await;
        assert_eq!(permits.available_permits(), 1, "given back at the end");
        assert!(release().is_none(), "outside a slot there is none to give");
    }
}
