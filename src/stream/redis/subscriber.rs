//! The task that listens on the `{p}:events` channel for this node.
//!
//! Owns the pub/sub connection: parses each message into a notice for the
//! applier, notices when the connection is gone (the stream of messages
//! ends, or a ping goes unanswered), and reconnects with backoff. After
//! every reconnection it asks the applier for a full resync, *after*
//! subscribing: a change made before the subscription is in what the
//! resync reads, one made after it arrives as a notice, so none falls
//! between (one may come both ways; the applier skips what it holds).
//! Must not touch the hub or write to Redis.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;
use redis::aio::PubSub;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::applier::Apply;
use super::notice;
use crate::redis::conn::subscribe;

/// How often an idle channel is checked with a ping, and how long the
/// ping may take.
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub struct Subscriber {
    pub client: redis::Client,
    pub shared: Arc<Shared>,
    pub applier: mpsc::UnboundedSender<Apply>,
    pub cancel: CancellationToken,
    /// Tests hold the channel down with it, as a network fault would.
    pub paused: watch::Receiver<bool>,
}

impl Subscriber {
    /// Serves `first` (subscribed by `connect`, which resyncs itself), then
    /// reconnects whenever the channel is lost, until cancelled.
    pub async fn run(mut self, first: PubSub) {
        let mut current = Some(first);
        let mut backoff = BACKOFF_MIN;
        let channel = self.shared.keys.channel();
        loop {
            let pubsub = match current.take() {
                Some(pubsub) => pubsub,
                None => {
                    if !self.wait_unpaused().await {
                        return;
                    }
                    match subscribe(&self.client, &channel).await {
                        Ok(pubsub) => {
                            tracing::info!("Redis streams: channel back; catching up");
                            let _ = self.applier.send(Apply::ResyncAll(None));
                            pubsub
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "Redis streams: cannot subscribe yet");
                            tokio::select! {
                                _ = self.cancel.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
            };
            backoff = BACKOFF_MIN;
            self.shared.health.subscribed.store(true, Ordering::Relaxed);
            let cancelled = self.listen(pubsub).await;
            self.shared
                .health
                .subscribed
                .store(false, Ordering::Relaxed);
            if cancelled {
                return;
            }
            tracing::warn!(
                "Redis streams: lost the channel; serving local replicas until it is back"
            );
        }
    }

    /// Forwards notices until the connection is lost (false) or the engine
    /// stops (true).
    async fn listen(&mut self, pubsub: PubSub) -> bool {
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return true,
                changed = self.paused.changed() => {
                    if changed.is_err() || *self.paused.borrow() {
                        return false;
                    }
                }
                msg = messages.next() => {
                    let Some(msg) = msg else { return false };
                    match notice::parse(msg.get_payload_bytes()) {
                        Some(notice) => {
                            let _ = self.applier.send(Apply::Notice(notice));
                        }
                        None => tracing::warn!(
                            channel = msg.get_channel_name(),
                            "Redis streams: ignoring a message this build does not understand"
                        ),
                    }
                }
                _ = ping.tick() => {
                    let answered = tokio::time::timeout(PING_TIMEOUT, sink.ping::<Value>()).await;
                    if !matches!(answered, Ok(Ok(_))) {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits while paused; false if cancelled meanwhile.
    async fn wait_unpaused(&mut self) -> bool {
        loop {
            if !*self.paused.borrow_and_update() {
                return true;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                changed = self.paused.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}
