//! The ack policy's decision for one delivery: [`Tally`] collects how the write ended on each backend and
//! decides, as a pure function of those results and the [`AckPolicy`], whether its client can be answered yet
//! and how (docs/design.md section 6 states the rule).

use std::sync::Arc;

use crate::attempt::Answer;
use crate::config::AckPolicy;
use crate::log::{BackendState, BackendView, DeliveryView};
use crate::metrics::DeadLetterReason;

/// How a delivery to one backend ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendResult {
    /// A `201` arrived after `attempts` attempts.
    Delivered {
        /// Attempts made, the successful one included.
        attempts: u32,
        /// The backend's answer.
        answer: Answer,
    },
    /// The backend gave up: a dead letter.
    DeadLetter {
        /// Attempts made.
        attempts: u32,
        /// Why.
        reason: DeadLetterReason,
        /// The last answer, when the last attempt got one.
        answer: Option<Answer>,
    },
}

/// What the client of a write is told (docs/design.md section 6), decided by [`Tally::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not yet known: keep waiting.
    Wait,
    /// The ack policy is met. Under `first` the client gets `answer` (the first `201`); otherwise a summary.
    Acked {
        /// The first `201` answer.
        answer: Answer,
    },
    /// Every backend rejected the write with the same client error: it is passed back as is.
    PassBack {
        /// One of the agreeing answers.
        answer: Answer,
    },
    /// The policy can no longer be met: `502` with a summary.
    Unmet,
    /// The write could not be stored in the outbox: `503`, and nothing was sent.
    Refused,
    /// The NATS store did not confirm the write in time: `503`, and the write may still be delivered (the servers
    /// may have stored it without their answer coming back).
    Unconfirmed,
}

/// The final results of one delivery so far, and the pure rule of when to answer.
#[derive(Debug)]
pub struct Tally {
    required: usize,
    results: Vec<Option<BackendResult>>,
}

impl Tally {
    /// A tally for `pool_size` backends under `policy`.
    pub fn new(policy: AckPolicy, pool_size: usize) -> Self {
        Self { required: policy.required(pool_size), results: vec![None; pool_size] }
    }

    /// Records the final result of backend `index`.
    pub fn record(&mut self, index: usize, result: BackendResult) {
        self.results[index] = Some(result);
    }

    /// The decision given the results recorded so far.
    ///
    /// - Acked as soon as `required` backends delivered.
    /// - While enough backends are still pending to reach `required`: wait.
    /// - Otherwise, if every backend that finished rejected the write with the same `4xx`: wait for the others,
    ///   and when all agree pass that answer back (the client sent something every replica refuses).
    /// - Otherwise: unmet (`502`).
    pub fn decide(&self) -> Decision {
        let n = self.results.len();
        let mut delivered = 0;
        let mut dead = 0;
        let mut first_success = None;
        for r in self.results.iter().flatten() {
            match r {
                BackendResult::Delivered { answer, .. } => {
                    delivered += 1;
                    first_success.get_or_insert(answer);
                }
                BackendResult::DeadLetter { .. } => dead += 1,
            }
        }
        if delivered >= self.required
            && let Some(answer) = first_success
        {
            return Decision::Acked { answer: answer.clone() };
        }
        if n - dead >= self.required {
            return Decision::Wait;
        }
        let mut agreed: Option<&Answer> = None;
        for r in self.results.iter().flatten() {
            let BackendResult::DeadLetter { reason: DeadLetterReason::Rejected, answer: Some(answer), .. } = r else {
                return Decision::Unmet;
            };
            if !answer.status.is_client_error() || agreed.is_some_and(|a| a.status != answer.status) {
                return Decision::Unmet;
            }
            agreed.get_or_insert(answer);
        }
        match agreed {
            Some(answer) if dead == n => Decision::PassBack { answer: answer.clone() },
            Some(_) => Decision::Wait,
            None => Decision::Unmet,
        }
    }
}

impl Tally {
    /// Each backend's part as far as this tally knows (backends not finished yet are pending).
    pub fn view(&self, labels: &[Arc<str>], accepted_at_ms: u64) -> DeliveryView {
        let backends = labels
            .iter()
            .zip(&self.results)
            .map(|(label, r)| {
                let backend = label.to_string();
                match r {
                    None => BackendView::pending(backend),
                    Some(BackendResult::Delivered { attempts, answer }) => BackendView {
                        backend,
                        state: BackendState::Delivered,
                        attempts: *attempts,
                        status: Some(answer.status.as_u16()),
                        outcome: Some("success".to_owned()),
                        reason: None,
                        next_attempt_at: None,
                    },
                    Some(BackendResult::DeadLetter { attempts, reason, answer }) => BackendView {
                        backend,
                        state: BackendState::DeadLetter,
                        attempts: *attempts,
                        status: answer.as_ref().map(|a| a.status.as_u16()),
                        outcome: None,
                        reason: Some(reason.as_str().to_owned()),
                        next_attempt_at: None,
                    },
                }
            })
            .collect();
        DeliveryView { accepted_at_ms, backends }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use bytes::Bytes;

    use super::*;

    fn answer(code: u16) -> Answer {
        Answer {
            status: StatusCode::from_u16(code).expect("status"),
            content_type: None,
            body: Bytes::from_static(b"x"),
        }
    }
    fn ok() -> BackendResult {
        BackendResult::Delivered { attempts: 1, answer: answer(201) }
    }
    fn rejected(code: u16) -> BackendResult {
        BackendResult::DeadLetter { attempts: 1, reason: DeadLetterReason::Rejected, answer: Some(answer(code)) }
    }
    fn exhausted() -> BackendResult {
        BackendResult::DeadLetter { attempts: 100, reason: DeadLetterReason::Exhausted, answer: None }
    }
    fn tally(policy: AckPolicy, results: &[(usize, BackendResult)]) -> Decision {
        let mut t = Tally::new(policy, 3);
        for (i, r) in results {
            t.record(*i, r.clone());
        }
        t.decide()
    }

    #[test]
    fn first_policy() {
        assert_eq!(tally(AckPolicy::First, &[]), Decision::Wait);
        assert_eq!(tally(AckPolicy::First, &[(1, ok())]), Decision::Acked { answer: answer(201) });
        assert_eq!(tally(AckPolicy::First, &[(0, exhausted()), (1, exhausted())]), Decision::Wait);
        assert_eq!(tally(AckPolicy::First, &[(0, exhausted()), (1, exhausted()), (2, exhausted())]), Decision::Unmet);
        assert_eq!(tally(AckPolicy::First, &[(0, rejected(400)), (1, rejected(400))]), Decision::Wait);
        assert_eq!(
            tally(AckPolicy::First, &[(0, rejected(400)), (1, rejected(400)), (2, rejected(400))]),
            Decision::PassBack { answer: answer(400) }
        );
        assert_eq!(
            tally(AckPolicy::First, &[(0, rejected(400)), (1, rejected(404)), (2, rejected(400))]),
            Decision::Unmet
        );
        assert_eq!(
            tally(AckPolicy::First, &[(0, rejected(302)), (1, rejected(302)), (2, rejected(302))]),
            Decision::Unmet
        );
        assert_eq!(tally(AckPolicy::First, &[(0, rejected(400)), (1, ok())]), Decision::Acked { answer: answer(201) });
    }

    #[test]
    fn quorum_and_all_policies() {
        assert_eq!(tally(AckPolicy::Quorum, &[(0, ok())]), Decision::Wait);
        assert!(matches!(tally(AckPolicy::Quorum, &[(0, ok()), (2, ok())]), Decision::Acked { .. }));
        assert_eq!(tally(AckPolicy::Quorum, &[(0, exhausted())]), Decision::Wait);
        assert_eq!(tally(AckPolicy::Quorum, &[(0, exhausted()), (1, exhausted())]), Decision::Unmet);
        assert_eq!(tally(AckPolicy::All, &[(0, ok()), (1, ok())]), Decision::Wait);
        assert!(matches!(tally(AckPolicy::All, &[(0, ok()), (1, ok()), (2, ok())]), Decision::Acked { .. }));
        assert_eq!(tally(AckPolicy::All, &[(0, exhausted())]), Decision::Unmet);
        // One replica refuses what the others took: unmet, not passed back.
        assert_eq!(tally(AckPolicy::All, &[(0, ok()), (1, rejected(404))]), Decision::Unmet);
        // A refusal while others are pending: wait to see whether they all agree.
        assert_eq!(tally(AckPolicy::All, &[(1, rejected(400))]), Decision::Wait);
        assert_eq!(
            tally(AckPolicy::All, &[(0, rejected(400)), (1, rejected(400)), (2, rejected(400))]),
            Decision::PassBack { answer: answer(400) }
        );
    }
}
