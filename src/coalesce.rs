//! The coalescing publisher: messages for the same node that wait at the same
//! moment travel as one broker message (a [`Message::Batch`]), so that a burst
//! of small files or of receipts costs the broker one publish, one confirm
//! and one delivery, not one of each per file. A message that waits alone
//! goes out at once, as itself: coalescing adds no latency. Chunks of large
//! files do not come through here; they have their own window (`sender::publish`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::broker::{Broker, BrokerError};
use crate::wire::{MAX_BATCH, Message};

/// Most payload bytes one coalesced message carries (chunk bodies; headers
/// and receipts are small beside them).
pub const MAX_BYTES: usize = 1 << 20;
/// Coalesced messages per node waiting for their confirms at once; what
/// arrives meanwhile gathers into the next one.
const IN_FLIGHT: usize = 4;

pub struct Coalescer {
    broker: Arc<dyn Broker>,
    /// One publishing task per node, fed through its queue.
    nodes: Mutex<HashMap<String, mpsc::UnboundedSender<Item>>>,
}

struct Item {
    msg: Message,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

impl Coalescer {
    pub fn new(broker: Arc<dyn Broker>) -> Arc<Coalescer> {
        Arc::new(Coalescer {
            broker,
            nodes: Mutex::new(HashMap::new()),
        })
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Ends each node's publishing task once what it was handed is
    /// published (a later `publish` would start a new one). For the end of
    /// an agent's stop, after the receipts under way are sent.
    pub fn close(&self) {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Publishes `msg` to `node`'s queue, together with whatever else waits
    /// for that node. Resolves once the broker confirmed it; an error means
    /// unknown, not lost (see [`Broker::publish`]): publish again.
    pub async fn publish(&self, node: &str, msg: Message) -> Result<(), BrokerError> {
        let (done, confirmed) = oneshot::channel();
        let queue = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .entry(node.to_string())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(run(self.broker.clone(), node.to_string(), rx));
                    tx
                })
                .clone()
        };
        let stopped = || BrokerError::Connection("the publishing task stopped".into());
        queue.send(Item { msg, done }).map_err(|_| stopped())?;
        confirmed.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Publishes what `rx` brings for `node`: whatever is waiting when a slot
/// frees becomes one message.
async fn run(broker: Arc<dyn Broker>, node: String, mut rx: mpsc::UnboundedReceiver<Item>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut held: Option<Item> = None;
    loop {
        let first = match held.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.msg.body_len();
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            let Ok(item) = rx.try_recv() else { break };
            if bytes + item.msg.body_len() > MAX_BYTES {
                held = Some(item);
                break;
            }
            bytes += item.msg.body_len();
            items.push(item);
        }
        let (mut msgs, dones): (Vec<Message>, Vec<_>) =
            items.into_iter().map(|i| (i.msg, i.done)).unzip();
        let msg = if msgs.len() == 1 {
            msgs.swap_remove(0)
        } else {
            Message::batch(msgs)
        };
        let published = broker.publish(&node, msg.encode()).await;
        tokio::spawn(async move {
            let result = match published {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            for done in dones {
                let _ = done.send(result.clone());
            }
            drop(slot);
        });
    }
}
