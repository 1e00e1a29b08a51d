//! Messages in the dead-letter queue, as a scrape may know them without
//! waiting on the broker. An agent hosting the embedded broker reads its
//! queue's depth from memory (the broker's core keeps it in the registry);
//! on RabbitMQ a passive declaration, run in the background at most every
//! [`REFRESH`] and cut off after [`ASK_TIMEOUT`], fills a cache the scrape
//! reads. An agent that only connects to an embedded broker elsewhere does
//! not know it (`hakobu broker status` on the broker's host does).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::broker::DEAD_LETTER_QUEUE;
use crate::config::{BrokerConfig, Config};

/// How old the cached RabbitMQ figure may get before it is asked again.
pub const REFRESH: Duration = Duration::from_secs(15);
/// How long one question to RabbitMQ may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);

struct Cache {
    value: Option<u64>,
    asked: Option<Instant>,
    asking: bool,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    value: None,
    asked: None,
    asking: false,
});

/// The dead letters known now (`None`: unknown); on RabbitMQ, starts a
/// refresh in the background when the cached figure is stale.
pub fn current(cfg: &Config) -> Option<u64> {
    match &cfg.broker {
        BrokerConfig::Embedded(_) => super::registry::global().hosted_dead_letters(),
        BrokerConfig::Rabbitmq(r) => {
            let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
            let stale = c.asked.is_none_or(|t| t.elapsed() >= REFRESH);
            if stale && !c.asking {
                c.asking = true;
                let (r, node) = (r.clone(), cfg.node.to_string());
                tokio::spawn(async move {
                    let asked = tokio::time::timeout(
                        ASK_TIMEOUT,
                        crate::broker::rabbitmq::queue_depths(&r, &node),
                    )
                    .await;
                    let value = match asked {
                        Ok(Ok(depths)) => depths
                            .into_iter()
                            .find(|(q, _)| q == DEAD_LETTER_QUEUE)
                            .and_then(|(_, n)| n)
                            .map(u64::from),
                        _ => None,
                    };
                    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
                    c.value = value;
                    c.asked = Some(Instant::now());
                    c.asking = false;
                });
            }
            c.value
        }
    }
}
