//! One connection's publishing ([`Session`]): the checks in their documented order, the id's
//! entry (answered from the store, waiting for a publish of the same id in flight, or a new
//! record), and the hand-over to the writer's queue.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use governor::clock::Clock;
use governor::DefaultDirectRateLimiter;
use serde_json::Value;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::config::{truncate, TopicPolicy};
use super::job::{Answer, InFlight, Job, JobKind, Outcome, Slot, TrackedId};
use super::publisher::Inner;
use super::store::{content_hash, Entry, Scope};
use super::wire::{Ack, Nack, NackCode, PublishRequest, Reply, MAX_ID_BYTES, MAX_KEY_BYTES};
use crate::auth::glob::Glob;
use crate::metrics::PUBLISH_UNLISTED_TOPIC;

/// Who publishes on a connection. Without tokens: the default (no principal, no claims, every
/// listed topic). With tokens it comes from the verified token (`Access::publish_context`).
#[derive(Debug, Clone, Default)]
pub struct PublishContext {
    /// Scopes the ids (two principals may use the same id) and is written in a header.
    pub principal: Option<String>,
    /// The token's claims, for pinned fields (`None`: pins are not checked).
    pub claims: Option<serde_json::Map<String, Value>>,
    /// Names or globs of the listed topics the token allows (`None`: every listed topic; empty:
    /// none).
    pub topics: Option<Vec<Glob>>,
}

impl PublishContext {
    /// Whether `topic` (a listed topic) may be published to.
    pub fn allows(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(topic)))
    }

    /// Why `topic` (a listed topic) may not be published to; `None`: it may.
    fn refuses(&self, topic: &str) -> Option<String> {
        if self.allows(topic) {
            return None;
        }
        let allowed = self.topics.as_deref().unwrap_or_default();
        if allowed.is_empty() {
            return Some(format!(
                "the token allows publishing to no topic (its grants have no `publish` list), so not `{topic}`"
            ));
        }
        let mut list = allowed
            .iter()
            .map(Glob::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        truncate(&mut list, 256);
        Some(format!(
            "topic `{topic}` is not among the topics the token may publish to (`publish`): {list}"
        ))
    }
}

/// The answer of one publish, to be written to the client. `'static + Send`, so a connection task
/// can keep many in a `FuturesUnordered` (at most `max_in_flight` are unanswered).
pub type PublishFuture = BoxFuture<'static, Reply>;

/// A refused publish: the topic label of its metrics and the nack.
type Rejected = Box<(String, Nack)>;

/// One connection's publishing: its in-flight bound, rate limits and identity. Dropping it (a
/// disconnect) cancels nothing already handed over: those records are still produced and their
/// outcomes recorded, so a retry on the next connection gets the original ack.
pub struct Session {
    pub(super) inner: Arc<Inner>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) limiters: HashMap<String, DefaultDirectRateLimiter>,
    pub(super) ctx: PublishContext,
}

/// A publish that passed the checks.
struct Checked {
    policy: Arc<TopicPolicy>,
    id: Option<Value>,
    id_json: Option<String>,
    key: Option<String>,
    payload: Vec<u8>,
    hash: u64,
    permit: OwnedSemaphorePermit,
}

#[derive(Clone, Copy)]
enum Role {
    /// This publish produces the record (or recovers it).
    First,
    /// Another publish of the id is in flight; this one gets its outcome.
    Concurrent,
}

impl Session {
    /// Replaces who publishes (a refreshed token): later publishes are checked and scoped with
    /// `ctx`; those already handed over keep their answers. The rate limits and the in-flight
    /// bound stay the connection's.
    pub fn set_context(&mut self, ctx: PublishContext) {
        self.ctx = ctx;
    }

    /// Publishes and waits for the answer.
    pub async fn publish(&self, req: PublishRequest) -> Result<Ack, Nack> {
        self.submit(req).await.into_result()
    }

    /// Checks the publish and hands it over at once, so a connection's records are produced in
    /// the order of its calls; returns the future of its answer. The record is produced whether
    /// or not the future is polled; the future resolves within the ack timeout.
    pub fn submit(&self, req: PublishRequest) -> PublishFuture {
        let start = Instant::now();
        match self.check(req).and_then(|c| self.hand_over(c, start)) {
            Ok(f) => f,
            Err(rejected) => {
                let (label, nack) = *rejected;
                tracing::debug!(
                    topic = %label,
                    id = %nack.id.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                    code = nack.code.as_str(),
                    "publish refused"
                );
                self.count(&label, nack.code.as_str());
                futures::future::ready(Reply::Nack(nack)).boxed()
            }
        }
    }

    /// Answers a publish refused before it could be read (an HTTP body that is not a publish),
    /// counted as the checks count theirs.
    pub fn refuse(&self, topic: &str, nack: Nack) -> Reply {
        let label = if self.inner.config.topics.contains_key(topic) {
            topic
        } else {
            PUBLISH_UNLISTED_TOPIC
        };
        self.count(label, nack.code.as_str());
        Reply::Nack(nack)
    }

    fn count(&self, topic_label: &str, outcome: &str) {
        self.inner
            .shared
            .metrics
            .publish
            .publishes
            .with_label_values(&[topic_label, outcome])
            .inc();
    }

    /// The checks, in the documented order: bad_request (id), bad_request (topic), forbidden
    /// (topic), unavailable (closing), bad_request (key, value), too_large, rate_limited,
    /// too_many_in_flight, invalid, forbidden (pin).
    fn check(&self, req: PublishRequest) -> Result<Checked, Rejected> {
        let inner = &self.inner;
        let id = req.id;
        let reject = |label: &str, code: NackCode, msg: String| {
            Err(Box::new((
                label.to_string(),
                Nack::new(id.clone(), code, msg),
            )))
        };
        let unlisted = PUBLISH_UNLISTED_TOPIC;
        let id_json = match &id {
            None => None,
            Some(Value::String(s)) if s.is_empty() => {
                return reject(
                    unlisted,
                    NackCode::BadRequest,
                    "id must not be empty".into(),
                )
            }
            Some(v @ (Value::String(_) | Value::Number(_))) => {
                let j = v.to_string();
                if j.len() > MAX_ID_BYTES {
                    return reject(
                        unlisted,
                        NackCode::BadRequest,
                        format!("id is longer than {MAX_ID_BYTES} bytes"),
                    );
                }
                Some(j)
            }
            Some(_) => {
                return reject(
                    unlisted,
                    NackCode::BadRequest,
                    "id must be a string or a number".into(),
                )
            }
        };
        if req.topic.is_empty() {
            return reject(unlisted, NackCode::BadRequest, "topic is required".into());
        }
        let Some(policy) = inner.config.topics.get(&req.topic).cloned() else {
            let mut t = req.topic;
            truncate(&mut t, 256);
            return reject(
                unlisted,
                NackCode::Forbidden,
                format!("topic `{t}` is not writable"),
            );
        };
        let label = policy.name.as_str();
        if let Some(reason) = self.ctx.refuses(label) {
            return reject(label, NackCode::Forbidden, reason);
        }
        if inner.closing.load(Ordering::Acquire) {
            return reject(label, NackCode::Unavailable, "shutting down".into());
        }
        let key = match req.key {
            Value::Null => None,
            Value::String(k) if k.len() <= MAX_KEY_BYTES => Some(k),
            Value::String(_) => {
                return reject(
                    label,
                    NackCode::BadRequest,
                    format!("key is longer than {MAX_KEY_BYTES} bytes"),
                )
            }
            _ => return reject(label, NackCode::BadRequest, "key must be a string".into()),
        };
        if req.value.is_null() {
            return reject(label, NackCode::BadRequest, "value is required".into());
        }
        // serialising a JSON value cannot fail
        let payload = serde_json::to_vec(&req.value).unwrap_or_default();
        let size = payload.len() + key.as_ref().map_or(0, String::len);
        if size > policy.max_bytes {
            return reject(
                label,
                NackCode::TooLarge,
                format!(
                    "key and value are {size} bytes; `{label}` takes at most {}",
                    policy.max_bytes
                ),
            );
        }
        if let Some(limiter) = self.limiters.get(label) {
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(inner.clock.now());
                let mut n = Nack::new(
                    id.clone(),
                    NackCode::RateLimited,
                    format!(
                        "more than {}/s (burst {}) to `{label}` on this connection",
                        policy.rate_per_sec, policy.burst
                    ),
                );
                n.retry_after_ms = Some(retry_after_ms(wait));
                return Err(Box::new((label.to_string(), n)));
            }
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return reject(
                label,
                NackCode::TooManyInFlight,
                format!(
                    "{} publishes of this connection are unanswered",
                    inner.config.max_in_flight
                ),
            );
        };
        if let Err(reason) = policy.check_schema(&req.value) {
            return reject(label, NackCode::Invalid, reason);
        }
        if let Err(reason) = policy.check_pin(&req.value, self.ctx.claims.as_ref()) {
            return reject(label, NackCode::Forbidden, reason);
        }
        let hash = content_hash(key.as_deref(), &req.value);
        Ok(Checked {
            policy,
            id,
            id_json,
            key,
            payload,
            hash,
            permit,
        })
    }

    /// The id's entry decides: an answer from the store, a wait for the same id in flight, or a
    /// job for the writer (a new record, or a pending one to recover).
    fn hand_over(&self, c: Checked, start: Instant) -> Result<PublishFuture, Rejected> {
        let inner = &self.inner;
        let shared = &inner.shared;
        let label = c.policy.name.clone();
        let deadline = start + inner.config.ack_timeout;
        let unavailable = |id: &Option<Value>, msg: &str| -> Rejected {
            Box::new((
                label.clone(),
                Nack::new(id.clone(), NackCode::Unavailable, msg),
            ))
        };
        let conflict = |id: &Option<Value>| -> Rejected {
            Box::new((
                label.clone(),
                Nack::new(
                    id.clone(),
                    NackCode::BadRequest,
                    "this id was already used for a different record",
                ),
            ))
        };

        let Some(id_json) = c.id_json.clone() else {
            // no id: produced once per request, nothing remembered
            let in_flight = self.in_flight(&label, &c.id)?;
            let partition = self.partition_for(&c, None)?;
            let (tx, rx) = watch::channel(None);
            let slot = Arc::new(Slot { hash: c.hash, tx });
            let job = Job {
                kind: JobKind::Produce,
                topic: Arc::from(label.as_str()),
                partition,
                key: c.key,
                payload: c.payload,
                hash: c.hash,
                deadline,
                answer: Answer::new(None, slot, shared.clone()),
                pending: None,
                _in_flight: in_flight,
            };
            if inner.jobs_tx.try_send(job).is_err() {
                return Err(unavailable(&c.id, "the publish queue is full"));
            }
            return Ok(self.answer(rx, Role::First, label, c.id, c.permit, start, deadline));
        };

        let scope = Scope::new(&label, self.ctx.principal.as_deref(), &id_json);
        // one lock makes "in flight, or else remembered" one decision: the delivery callback
        // records an outcome in the index and takes the id out of flight under it
        let mut ids = shared.ids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = ids.inflight.get(&scope) {
            if slot.hash != c.hash {
                return Err(conflict(&c.id));
            }
            let rx = slot.tx.subscribe();
            drop(ids);
            return Ok(self.answer(rx, Role::Concurrent, label, c.id, c.permit, start, deadline));
        }
        let kind = match ids.index.get(&scope) {
            Some(Entry::Done {
                hash,
                partition,
                offset,
                ..
            }) => {
                drop(ids);
                if hash != c.hash {
                    return Err(conflict(&c.id));
                }
                self.count(&label, "duplicate");
                shared
                    .metrics
                    .publish
                    .duplicates
                    .with_label_values(&[label.as_str(), "stored"])
                    .inc();
                let ack = Ack {
                    id: c.id,
                    topic: label,
                    partition,
                    offset,
                    duplicate: true,
                };
                return Ok(futures::future::ready(Reply::Ack(ack)).boxed());
            }
            Some(e @ Entry::Pending { hash, .. }) => {
                if hash != c.hash {
                    return Err(conflict(&c.id));
                }
                JobKind::Recover(e)
            }
            None => JobKind::Produce,
        };
        let in_flight = self.in_flight(&label, &c.id)?;
        let partition = match &kind {
            JobKind::Recover(Entry::Pending { partition, .. }) => *partition,
            _ => self.partition_for(&c, Some(&id_json))?,
        };
        let (tx, rx) = watch::channel(None);
        let slot = Arc::new(Slot { hash: c.hash, tx });
        ids.inflight.insert(scope.clone(), slot.clone());
        drop(ids);
        let tracked = TrackedId {
            scope,
            id_json,
            principal: self.ctx.principal.clone(),
        };
        let job = Job {
            kind,
            topic: Arc::from(label.as_str()),
            partition,
            key: c.key,
            payload: c.payload,
            hash: c.hash,
            deadline,
            answer: Answer::new(Some(tracked), slot, shared.clone()),
            pending: None,
            _in_flight: in_flight,
        };
        if inner.jobs_tx.try_send(job).is_err() {
            // dropping the job took the id out of the map; nobody can have been waiting on it
            return Err(unavailable(&c.id, "the publish queue is full"));
        }
        Ok(self.answer(rx, Role::First, label, c.id, c.permit, start, deadline))
    }

    fn in_flight(&self, label: &str, id: &Option<Value>) -> Result<InFlight, Rejected> {
        match self.inner.global.clone().try_acquire_owned() {
            Ok(p) => Ok(InFlight::new(p, &self.inner.shared.metrics)),
            Err(_) => Err(Box::new((
                label.to_string(),
                Nack::new(
                    id.clone(),
                    NackCode::Unavailable,
                    "too many publishes are waiting for the broker",
                ),
            ))),
        }
    }

    /// The key's partition (Kafka's default partitioner); without a key, the id's; without
    /// either, round robin.
    fn partition_for(&self, c: &Checked, id_json: Option<&str>) -> Result<i32, Rejected> {
        let shared = &self.inner.shared;
        let count = shared
            .partitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&c.policy.name)
            .copied();
        let Some(n) = count else {
            shared.refresh.notify_one();
            return Err(Box::new((
                c.policy.name.clone(),
                Nack::new(
                    c.id.clone(),
                    NackCode::Unavailable,
                    format!("topic `{}` is not available on the broker", c.policy.name),
                ),
            )));
        };
        Ok(match (&c.key, id_json) {
            (Some(k), _) => super::partition::for_key(k.as_bytes(), n),
            (None, Some(i)) => super::partition::for_key(i.as_bytes(), n),
            (None, None) => {
                (self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % n.max(1) as u32) as i32
            }
        })
    }

    /// The future that waits for the outcome (until the deadline) and counts the answer.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        mut rx: watch::Receiver<Option<Outcome>>,
        role: Role,
        label: String,
        id: Option<Value>,
        permit: OwnedSemaphorePermit,
        start: Instant,
        deadline: Instant,
    ) -> PublishFuture {
        let metrics = self.inner.shared.metrics.clone();
        let timeout = self.inner.config.ack_timeout;
        async move {
            let _permit = permit;
            let outcome = match tokio::time::timeout_at(
                deadline.into(),
                rx.wait_for(Option::is_some),
            )
            .await
            {
                Ok(Ok(o)) => o
                    .clone()
                    .unwrap_or_else(|| Outcome::Failed("the publish was abandoned".into())),
                Ok(Err(_)) => Outcome::Failed("the publish was abandoned".into()),
                Err(_) => {
                    tracing::debug!(
                        topic = %label,
                        id = %id.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                        "publish failed: no acknowledgement within the ack timeout"
                    );
                    Outcome::Failed(format!(
                        "no acknowledgement from the broker within {} ms",
                        timeout.as_millis()
                    ))
                }
            };
            let p = &metrics.publish;
            match outcome {
                Outcome::Written {
                    partition,
                    offset,
                    recovered,
                } => {
                    let duplicate = recovered || matches!(role, Role::Concurrent);
                    if duplicate {
                        let result = if recovered { "recovered" } else { "concurrent" };
                        p.duplicates
                            .with_label_values(&[label.as_str(), result])
                            .inc();
                        p.publishes
                            .with_label_values(&[label.as_str(), "duplicate"])
                            .inc();
                    } else {
                        p.publishes
                            .with_label_values(&[label.as_str(), "ack"])
                            .inc();
                        p.ack_seconds
                            .with_label_values(&[label.as_str()])
                            .observe(start.elapsed().as_secs_f64());
                    }
                    Reply::Ack(Ack {
                        id,
                        topic: label,
                        partition,
                        offset,
                        duplicate,
                    })
                }
                Outcome::Failed(message) => {
                    p.publishes
                        .with_label_values(&[label.as_str(), "unavailable"])
                        .inc();
                    Reply::Nack(Nack::new(
                        id,
                        NackCode::Unavailable,
                        format!("{message}; retry with the same id"),
                    ))
                }
            }
        }
        .boxed()
    }
}

/// The `retry_after_ms` of a `rate_limited` nack: the limiter's wait rounded up to a whole
/// millisecond (at least 1), so that a client waiting exactly that long finds a token.
fn retry_after_ms(wait: std::time::Duration) -> u64 {
    let ms = wait.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_so_waiting_that_long_is_enough() {
        assert_eq!(retry_after_ms(Duration::ZERO), 1);
        assert_eq!(retry_after_ms(Duration::from_micros(300)), 1);
        assert_eq!(retry_after_ms(Duration::from_micros(1_500)), 2);
        assert_eq!(retry_after_ms(Duration::from_millis(200)), 200);
        assert_eq!(retry_after_ms(Duration::from_nanos(200_000_001)), 201);
    }

    fn ctx(topics: Option<&[&str]>) -> PublishContext {
        PublishContext {
            topics: topics.map(|t| t.iter().map(|p| Glob::new(p)).collect()),
            ..PublishContext::default()
        }
    }

    #[test]
    fn the_token_topics_allow_by_name_or_glob_and_refusals_name_the_rule() {
        assert_eq!(
            ctx(None).refuses("bets"),
            None,
            "no token: every listed topic"
        );
        let c = ctx(Some(&["bets", "game_*"]));
        assert_eq!(c.refuses("bets"), None);
        assert_eq!(c.refuses("game_7"), None);
        let r = c.refuses("balances").unwrap();
        assert!(
            r.contains("`balances`") && r.contains("`publish`") && r.contains("bets, game_*"),
            "{r}"
        );
        let r = ctx(Some(&[])).refuses("bets").unwrap();
        assert!(r.contains("no `publish` list"), "{r}");
    }
}
