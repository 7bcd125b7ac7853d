//! The in-process transport: channels between threads of one `custos serve`.
//!
//! ```text
//!  stage ──submit──▶ Sender<M> (the writer's own command queue, so a submission is
//!                               ordered with intake and admin commands)
//!  writer ──publish──▶ Fanout ──bounded──▶ detector subscription  (back-pressure)
//!                             ──unbounded─▶ responder subscription (findings, actions)
//! ```
//!
//! A bounded subscription slows the writer down when its reader falls behind instead of
//! holding more in memory. Readers never wait for the writer on the same thread that the
//! writer waits for, so the two cannot deadlock: a stage submits and reads the outcome
//! later from its receipt or from the committed record.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Answer, Committed, Intake, Publish, Receipt, StageError, Submission, Submitter, Subscription};

/// Submits by sending `wrap(submission, answer)` on the writer's queue.
pub struct ChannelSubmitter<M> {
    queue: Mutex<Sender<M>>,
    wrap: fn(Submission, Answer) -> M,
}

impl<M: Send> ChannelSubmitter<M> {
    pub fn new(queue: Sender<M>, wrap: fn(Submission, Answer) -> M) -> Self {
        Self {
            queue: Mutex::new(queue),
            wrap,
        }
    }
}

impl<M: Send> Submitter for ChannelSubmitter<M> {
    fn submit(&self, submission: Submission) -> Result<Receipt, StageError> {
        let (answer, receipt) = crate::receipt();
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send((self.wrap)(submission, answer))
            .map_err(|_| StageError::Closed)?;
        Ok(receipt)
    }
}

/// A writer queue that carries only submissions (tests, and a writer with no intake).
pub fn queue() -> (ChannelSubmitter<(Submission, Answer)>, ChannelIntake) {
    let (sender, receiver) = mpsc::channel();
    (
        ChannelSubmitter::new(sender, |submission, answer| (submission, answer)),
        ChannelIntake(receiver),
    )
}

/// The writer's end of [`queue`].
pub struct ChannelIntake(Receiver<(Submission, Answer)>);

impl Intake for ChannelIntake {
    fn recv(&mut self, timeout: Duration) -> Result<Option<(Submission, Answer)>, StageError> {
        match self.0.recv_timeout(timeout) {
            Ok(item) => Ok(Some(item)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(StageError::Closed),
        }
    }
}

/// Which records a subscriber wants.
pub type Filter = fn(&Committed) -> bool;

/// Every record.
pub fn everything(_: &Committed) -> bool {
    true
}

/// What the responder reads: findings, action records, and the end of the replay.
pub fn findings_and_actions(record: &Committed) -> bool {
    matches!(
        record,
        Committed::Finding { .. } | Committed::Action { .. } | Committed::Replayed { .. }
    )
}

enum Outlet {
    Bounded(SyncSender<Committed>),
    Unbounded(Sender<Committed>),
}

struct Subscriber {
    outlet: Outlet,
    filter: Filter,
    closed: bool,
}

impl Subscriber {
    /// Hands over `record`; false when the subscription is gone.
    fn deliver(&self, record: Committed) -> bool {
        match &self.outlet {
            Outlet::Bounded(sender) => sender.send(record).is_ok(),
            Outlet::Unbounded(sender) => sender.send(record).is_ok(),
        }
    }
}

/// The writer's publisher: hands each record to every subscriber that wants it.
#[derive(Clone, Default)]
pub struct Fanout {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

impl Fanout {
    pub fn new() -> Self {
        Self::default()
    }

    /// A subscription that holds at most `capacity` records; past it the writer waits.
    pub fn subscribe_bounded(&self, capacity: usize, filter: Filter) -> ChannelSubscription {
        let (sender, receiver) = mpsc::sync_channel(capacity.max(1));
        self.add(Outlet::Bounded(sender), filter);
        ChannelSubscription(receiver)
    }

    /// A subscription that never makes the writer wait (for readers that see few records).
    pub fn subscribe(&self, filter: Filter) -> ChannelSubscription {
        let (sender, receiver) = mpsc::channel();
        self.add(Outlet::Unbounded(sender), filter);
        ChannelSubscription(receiver)
    }

    fn add(&self, outlet: Outlet, filter: Filter) {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Subscriber {
                outlet,
                filter,
                closed: false,
            });
    }

    /// Whether anyone reads what is published (else the writer need not build records).
    pub fn is_empty(&self) -> bool {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Sends `record` to each subscriber that wants it (a clone for all but the last);
    /// drops subscribers that went away.
    pub fn send(&self, record: Committed) {
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The last subscriber that wants it gets the record itself; the others a clone.
        // (No allocation on this path: it runs on the writer thread for every entry.)
        let Some(last) = subscribers.iter().rposition(|subscriber| (subscriber.filter)(&record)) else {
            return;
        };
        let mut gone = false;
        for subscriber in subscribers[..last].iter_mut() {
            if (subscriber.filter)(&record) && !subscriber.deliver(record.clone()) {
                subscriber.closed = true;
                gone = true;
            }
        }
        if !subscribers[last].deliver(record) {
            subscribers[last].closed = true;
            gone = true;
        }
        if gone {
            subscribers.retain(|subscriber| !subscriber.closed);
        }
    }
}

impl Publish for Fanout {
    fn publish(&mut self, record: Committed) -> Result<(), StageError> {
        self.send(record);
        Ok(())
    }
}

/// A subscriber's end of a [`Fanout`].
pub struct ChannelSubscription(Receiver<Committed>);

impl Subscription for ChannelSubscription {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Committed>, StageError> {
        let next = if timeout.is_zero() {
            self.0.try_recv().map_err(|error| match error {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.0.recv_timeout(timeout)
        };
        match next {
            Ok(record) => Ok(Some(record)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(StageError::Closed),
        }
    }
}
