//! A leader's step 3, call (in phase 5): the upstream call, through the governor. It waits in
//! line for budget, teaches the governor what the answer's headers say, and waits out the
//! refusals worth waiting out, pausing the whole budget, until the retry budget is spent.

use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::Engine;
use super::classify::Outbound;
use super::count::route_name;
use super::leader::Read;
use crate::answer::Refusal;
use crate::entry::EntryMeta;
use crate::error::{Error, ErrorKind};
use crate::fleet::{BudgetTurn, Budgeted, Confirmed};
use crate::governor::{self, Disposition};
use crate::headers::SHOULD_RETRY;
use crate::key::Partition;
use crate::upstream;

pub(super) use super::verified::Verifies;

/// How often a request waiting for a reserved turn in the fleet's line looks whether the
/// turn was made void (see `BudgetTurn::changes`).
const RESERVED_CHECK: Duration = Duration::from_secs(1);

/// What came back from the upstream through the governor.
pub(super) enum Upstreamed {
    /// A 2xx (or 3xx) answer, body not yet read (it may be a stream).
    Success(reqwest::Response),
    /// Any other answer, read whole. When waiting cannot fix it, its headers carry
    /// `x-should-retry: false`: the official SDKs would retry some of these.
    Refused(Refusal),
}

/// Why one attempt did not end the call: the refusal to wait out, or no answer at all.
enum Failed {
    Refused(Refusal),
    Unreachable(Error),
}

impl Engine {
    /// Sends a request through the governor: waits in line for budget, learns the budget from
    /// the answer, and waits out refusals worth waiting out (pausing the whole budget) until
    /// the retry budget is spent; then the last answer is handed on as it came.
    pub(super) async fn send_governed(
        &self,
        out: &Outbound,
        meta: &EntryMeta,
    ) -> Result<Upstreamed, Error> {
        let settings = *self.governor.settings();
        let (route, model) = (Some(meta.route), meta.model.as_deref());
        let mut waited = Duration::ZERO;
        let mut attempt = 0u32;
        loop {
            let (wait, last) = match self.attempt(out, meta).await? {
                Attempt::Done(upstreamed) => return Ok(upstreamed),
                Attempt::Failed(Failed::Refused(refusal)) => {
                    let wait = governor::retry_after(&refusal.headers)
                        .unwrap_or_else(|| governor::backoff(attempt));
                    (wait, Failed::Refused(refusal))
                }
                Attempt::Failed(unreachable) => (governor::backoff(attempt), unreachable),
            };
            // One log line per refusal, saying what is done about it.
            let status = match &last {
                Failed::Refused(refusal) => Some(refusal.status.as_u16()),
                Failed::Unreachable(_) => None,
            };
            if waited + wait > settings.retry_budget {
                tracing::info!(
                    route = route_name(route),
                    status,
                    waited = ?waited,
                    "upstream refused the request; retry budget spent, passed on"
                );
                return match last {
                    Failed::Refused(refusal) => Ok(Upstreamed::Refused(refusal)),
                    Failed::Unreachable(e) => Err(e),
                };
            }
            tracing::info!(
                route = route_name(route),
                status,
                wait = ?wait,
                "upstream refused the request; pausing the budget and retrying"
            );
            self.refusal_absorbed(route, model, status == Some(429));
            self.governor.pause(&out.partition, wait);
            if let Some(fleet) = &self.fleet {
                // Said before any wait: replicas that pace hold their calls from now.
                fleet.pause(&out.partition, wait).await;
            }
            if !settings.pace {
                // No line to pause: this request waits on its own.
                tokio::time::sleep(wait).await;
            }
            waited += wait;
            attempt += 1;
        }
    }

    /// One call: waits in line for budget, sends, and tells what came back.
    async fn attempt(&self, out: &Outbound, meta: &EntryMeta) -> Result<Attempt, Error> {
        let (route, model) = (Some(meta.route), meta.model.as_deref());
        let queued = Instant::now();
        let deadline = queued + self.governor.settings().max_queue_wait;
        let permit = self
            .governor
            .acquire(&out.partition, out.estimate, deadline)
            .await?;
        self.fleet_budget(&out.partition, deadline).await?;
        self.metrics.queue_wait(queued.elapsed());
        let sent = self
            .upstream
            .send(
                &out.method,
                &out.path_and_query,
                &out.headers,
                out.body.clone().into(),
                out.via.as_ref(),
            )
            .await;
        if let Ok(response) = &sent {
            self.learn_from(&out.partition, response, Verifies::Yes)
                .await;
        }
        // After observing: a probe holds the line until the budget is known.
        drop(permit);
        self.upstream_called(route, model, sent.as_ref().ok().map(|r| r.status()));
        let response = match sent {
            Ok(response) => response,
            Err(e) => return Ok(Attempt::Failed(Failed::Unreachable(e))),
        };
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            return Ok(Attempt::Done(Upstreamed::Success(response)));
        }
        let headers = upstream::response_headers(response.headers());
        let body = match self.read_within(response, self.max_stream_bytes).await? {
            Read::Whole(body) => body,
            Read::Larger(..) => {
                return Err(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "the upstream's error answer ({status}) is larger than --max-stream ({} \
                         bytes)",
                        self.max_stream_bytes
                    ),
                ));
            }
        };
        let mut refusal = Refusal {
            status,
            headers,
            body,
        };
        Ok(match governor::classify(status, &refusal.body) {
            Disposition::Final(why) => {
                tracing::info!(
                    route = route_name(route),
                    status = status.as_u16(),
                    why,
                    "upstream refused the request; passed on, not retried"
                );
                refusal
                    .headers
                    .insert(SHOULD_RETRY, HeaderValue::from_static("false"));
                Attempt::Done(Upstreamed::Refused(refusal))
            }
            Disposition::Deliver => Attempt::Done(Upstreamed::Refused(refusal)),
            Disposition::Retry => Attempt::Failed(Failed::Refused(refusal)),
        })
    }
}

impl Engine {
    /// Takes the request's turn in the fleet's line for the budget of `partition` (with
    /// `--redis`), after the replica's own governor let it go, and waits for it: replicas
    /// together keep the pace this replica learned (or was given with `--rpm`), spend what the
    /// upstream said is left and no more, share the pause after a refusal, and go in the
    /// order they asked (see `fleet/tier/budget.rs`). A turn past `deadline` is a full queue, as
    /// the replica's own would be; Redis unreachable, no wait (a turn already reserved is
    /// still waited for).
    pub(super) async fn fleet_budget(
        &self,
        partition: &Partition,
        deadline: Instant,
    ) -> Result<(), Error> {
        let Some(fleet) = self
            .fleet
            .as_ref()
            .filter(|_| self.governor.settings().pace)
        else {
            return Ok(());
        };
        let full = |wait| Error::from(governor::QueueFull { retry_after: wait });
        'ask: loop {
            let longest = deadline.saturating_duration_since(Instant::now());
            let pace = self.governor.request_pace(partition);
            let Some(BudgetTurn {
                turn,
                stepwise,
                changes,
            }) = fleet.budget_turn(partition, pace, longest).await
            else {
                // Redis cannot be used: the replica's own estimate holds requests back again.
                self.governor.fleet_counts_requests(partition, false);
                return Ok(());
            };
            self.governor.fleet_counts_requests(partition, stepwise);
            match turn {
                Budgeted::Later(wait) => return Err(full(wait)),
                Budgeted::Paused(wait) => {
                    if wait > longest {
                        return Err(full(wait));
                    }
                    // In short slices, like the replica's own queue: a longer pause learned
                    // meanwhile counts.
                    tokio::time::sleep(wait.min(Duration::from_millis(250))).await;
                }
                Budgeted::Go(wait) => {
                    if wait.is_zero() {
                        return Ok(());
                    }
                    // Waited for in slices of a second, then confirmed: a turn reserved by
                    // rules since made void is asked for again; a pause, or a window that
                    // begins later than foreseen, is waited out too (the turn stays this
                    // request's). Bounded by the deadline, whatever Redis answers.
                    let now = std::time::SystemTime::now();
                    let at = now.checked_add(wait).unwrap_or(now);
                    let due = Instant::now()
                        .checked_add(wait)
                        .map_or(deadline, |due| due.min(deadline));
                    loop {
                        let now = Instant::now();
                        if now >= deadline {
                            return Ok(());
                        }
                        if now < due {
                            tokio::time::sleep_until(due.min(now + RESERVED_CHECK)).await;
                        }
                        let come = Instant::now() >= due;
                        match (fleet.confirm_turn(partition, at, changes).await, come) {
                            (Some(Confirmed::AskAgain), _) => continue 'ask,
                            (Some(Confirmed::Wait(more)), true) => {
                                let left = deadline.saturating_duration_since(Instant::now());
                                tokio::time::sleep(more.min(left)).await;
                            }
                            // Still waiting for the turn (Redis gone meanwhile: it is taken
                            // when it comes).
                            (_, false) => {}
                            (Some(Confirmed::Go) | None, true) => return Ok(()),
                        }
                    }
                }
            }
        }
    }

    /// Learns from the upstream's answer to a request of `partition`, before its permit is
    /// given back (so the next request in line goes by it): the budget its headers state, for
    /// this replica and for the fleet, and, when the call `verifies`, whether the credential
    /// was accepted.
    pub(super) async fn learn_from(
        &self,
        partition: &Partition,
        response: &reqwest::Response,
        verifies: Verifies,
    ) {
        let refused = response.status() == http::StatusCode::TOO_MANY_REQUESTS;
        let said = self
            .governor
            .observe(partition, response.headers(), refused);
        self.upstream_answered(partition, response.status(), verifies);
        if let (Some(fleet), Some(said)) = (&self.fleet, said) {
            fleet.learn_budget(partition, said).await;
        }
    }
}

/// How one call ended.
enum Attempt {
    /// With an answer to hand on.
    Done(Upstreamed),
    /// With a refusal worth waiting out, or no answer.
    Failed(Failed),
}
