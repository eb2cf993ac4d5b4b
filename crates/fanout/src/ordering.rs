//! Per-user order of writes on each backend, in memory.
//!
//! Under the `first` ack policy a client may send its next write while the previous one is still being retried
//! on a flaky backend; without care, a `changePassword` could reach that backend before the `register` it
//! follows (and be refused) or a newer password could be overwritten by an older one. So each backend keeps, per
//! ordering key (the `username` field by default), a FIFO of the deliveries accepted for that key: a delivery's
//! attempts to a backend start only when every earlier delivery for the same key has finished on that backend
//! (delivered or dead letter). Writes for different keys never wait on each other; writes without a key are not
//! ordered. Tickets are taken synchronously when fanout accepts the write, so the order is the acceptance order.
//!
//! Memory: one small entry per delivery in flight; a key's queue is removed when it empties.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The FIFO queues of one backend, by ordering key.
#[derive(Debug, Default)]
pub struct KeyQueues {
    queues: Mutex<HashMap<Box<str>, VecDeque<Slot>>>,
}

#[derive(Debug)]
struct Slot {
    seq: u64,
    wake: Option<oneshot::Sender<()>>,
}

impl KeyQueues {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, VecDeque<Slot>>> {
        // Every critical section below leaves the map consistent, so a poisoned lock is still usable.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next place for `key`. `seq` must be unique among live tickets of this backend.
    pub fn enqueue(self: &Arc<Self>, key: &str, seq: u64) -> Ticket {
        let mut queues = self.lock();
        let queue = queues.entry(key.into()).or_default();
        let wait = if queue.is_empty() {
            queue.push_back(Slot { seq, wake: None });
            None
        } else {
            let (tx, rx) = oneshot::channel();
            queue.push_back(Slot { seq, wake: Some(tx) });
            Some(rx)
        };
        Ticket { queues: self.clone(), key: key.into(), seq, wait }
    }

    /// The sequence numbers queued for `key`, front first.
    #[cfg(test)]
    pub(crate) fn order(&self, key: &str) -> Vec<u64> {
        self.lock().get(key).map(|q| q.iter().map(|s| s.seq).collect()).unwrap_or_default()
    }

    /// Number of keys with deliveries queued or running.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

/// A place in one key's queue on one backend. Dropping it (after the delivery to that backend finished, or
/// because the delivery went away) lets the next delivery for the key go.
#[derive(Debug)]
pub struct Ticket {
    queues: Arc<KeyQueues>,
    key: Box<str>,
    seq: u64,
    wait: Option<oneshot::Receiver<()>>,
}

impl Ticket {
    /// Resolves when every earlier delivery for this key on this backend has finished.
    pub async fn ready(&mut self) {
        if let Some(rx) = self.wait.as_mut() {
            // An error means the sender was dropped, which only happens when our slot was woken or removed.
            let _ = rx.await;
            self.wait = None;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut queues = self.queues.lock();
        let Some(queue) = queues.get_mut(&self.key) else { return };
        let Some(pos) = queue.iter().position(|s| s.seq == self.seq) else { return };
        queue.remove(pos);
        if pos == 0
            && let Some(next) = queue.front_mut()
            && let Some(wake) = next.wake.take()
        {
            let _ = wake.send(());
        }
        if queue.is_empty() {
            queues.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn is_ready(ticket: &mut Ticket) -> bool {
        let mut fut = pin!(ticket.ready());
        matches!(fut.as_mut().poll(&mut Context::from_waker(Waker::noop())), Poll::Ready(()))
    }

    #[test]
    fn tickets_of_one_key_go_in_order_and_keys_are_independent() {
        let q = Arc::new(KeyQueues::default());
        let mut a1 = q.enqueue("ann", 1);
        let mut b1 = q.enqueue("bob", 2);
        let mut a2 = q.enqueue("ann", 3);
        let mut a3 = q.enqueue("ann", 4);
        assert!(is_ready(&mut a1));
        assert!(is_ready(&mut b1), "another key does not wait");
        assert!(!is_ready(&mut a2));
        drop(a1);
        assert!(is_ready(&mut a2));
        assert!(!is_ready(&mut a3));
        drop(a2);
        assert!(is_ready(&mut a3));
        drop(a3);
        drop(b1);
        assert_eq!(q.keys(), 0, "empty queues are removed");
    }

    #[test]
    fn a_ticket_dropped_while_waiting_leaves_the_order_intact() {
        let q = Arc::new(KeyQueues::default());
        let a1 = q.enqueue("ann", 1);
        let a2 = q.enqueue("ann", 2);
        let mut a3 = q.enqueue("ann", 3);
        drop(a2);
        assert!(!is_ready(&mut a3));
        drop(a1);
        assert!(is_ready(&mut a3));
    }
}
