//! The relay loop, written once for every source: source -> decode -> route -> dedup -> sink ->
//! acknowledge -> checkpoint -> confirm back to the source.
//!
//! - Order: a source hands events over in its publishing order; they are sent to one sink in that
//!   order, so per partition (and so per key) Kafka holds them in that order.
//! - Durability: a source makes a position durable only when [`crate::checkpoint`] says so: after
//!   Kafka acknowledged, or the dead letters durably hold, or the dedup found in Kafka, every event
//!   up to it.
//! - Back-pressure: at most `max_in_flight` records, and about `max_in_flight_bytes` of them, are
//!   unacknowledged; reading pauses beyond that.
//! - Recovery: any transient error ends the session; the next session starts from the durable
//!   position, and [`Dedup`] skips what Kafka already has. After a lost delivery, what the session
//!   had sent is sent again one record at a time ([`Frontier`]), so that a record the broker
//!   refuses is found and dead-lettered alone.
//! - Shutdown: stop reading, flush, wait for what is in flight (bounded), confirm, close.

use crate::checkpoint::{Checkpoint, UnitId};
use crate::config::{OnPoison, SourceConfig};
use crate::deadletter::{DeadLetter, DeadLetters};
use crate::error::{Kind, RelayError};
use crate::event::{Body, Position, SourceEvent};
use crate::kafka::{KafkaConfig, RecordTimestamp};
use crate::sink::dedup::Dedup;
use crate::sink::partition::partition_for;
use crate::sink::{mac_fields, Delivered, Delivery, Record, Sink};
use crate::source::{Identity, Source, Step};
use crate::telemetry::{seconds_since, unix_micros_now, Metrics, PartitionLabels};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use pg_outbox_envelope::Event;
use prometheus_client::metrics::counter::Counter;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a graceful shutdown waits for records in flight; what is still unacknowledged then
/// is not confirmed, and is replayed by the next session.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How far a session that lost a delivery had sent, kept across the sessions of the process.
///
/// A broker refuses a whole batch for one record it will never take (one that fails the topic's
/// schema, a timestamp out of range), and librdkafka's gapless guarantee then stops the producer:
/// sent the same way again, the batch would fail forever, with the stream behind it. So the
/// sessions after a lost delivery send every record up to the highest position the failed session
/// had sent alone ([`Record::alone`]: one in flight, its verdict about it only). A refused record
/// is then dead-lettered on its own, and past the frontier records flow at full speed again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frontier(Option<(String, Position)>);

impl Frontier {
    /// Where records of `source` stop being sent alone, if they are.
    fn of(&self, source: &str) -> Option<Position> {
        self.0
            .as_ref()
            .filter(|(name, _)| name == source)
            .map(|(_, p)| *p)
    }

    /// A session of `source` that had sent up to `sent` lost a delivery.
    fn lost(&mut self, source: &str, sent: Option<Position>) {
        let top = sent.max(self.of(source));
        self.0 = top.map(|p| (source.to_string(), p));
    }
}

/// Routing, partitioning, the restart dedup and dead letters for one session.
pub struct Pipeline<'a, K: Sink, D: DeadLetters> {
    kafka: &'a KafkaConfig,
    source: &'a SourceConfig,
    metrics: &'a Metrics,
    sink: &'a mut K,
    dead: D,
    dedup: Dedup,
    /// The source's, taken when the loop starts.
    identity: Identity,
    shutdown: CancellationToken,
    /// Events to topics that cannot be written to yet (missing, or not authorized), per topic in
    /// order: they wait, each at most `poison_retry`, while the rest of the stream flows.
    parked: HashMap<String, VecDeque<Parked>>,
    /// A pause of the relay this long ends the session (see fence.rs).
    pause_limit: Duration,
    frontier: &'a mut Frontier,
    /// Records up to this position are sent alone (from the frontier, this session).
    alone_until: Option<Position>,
    /// The highest position handed to the sink (this session).
    sent_max: Option<Position>,
    /// Unproven messages passed over since the last log line about them, and when that was.
    unproven: (u64, Option<tokio::time::Instant>),
    /// Per topic and partition, the counters of the records sent there (this session).
    series: HashMap<String, HashMap<i32, Arc<Series>>>,
}

/// At most one log line about unproven messages in this long, whatever their number.
const UNPROVEN_LOG_EVERY: Duration = Duration::from_secs(10);

/// How often a topic that could not be written to is looked up again while events wait for it.
const PARKED_RETRY: Duration = Duration::from_millis(500);

/// Where one event goes.
enum Route {
    /// Handed to the sink: the delivery to wait for, the record's size, and where it went.
    Sent(Delivery, usize, Arc<Series>),
    /// Nothing to wait for: Kafka already has it, it was dead-lettered, or it is no event.
    Done,
    /// Its topic cannot be written to yet (named): the event waits, and events to other topics
    /// go on.
    Park(String),
}

/// An event waiting for its topic: its checkpoint unit, the bytes it holds, and when it stops
/// waiting and is dead-lettered.
struct Parked {
    event: SourceEvent,
    unit: UnitId,
    size: usize,
    deadline: tokio::time::Instant,
}

/// The bytes an event holds while it waits.
fn body_size(event: &SourceEvent) -> usize {
    match &event.body {
        Body::Envelope(content) => content.len(),
        Body::Row(row) => {
            row.payload.len() + row.topic.len() + row.key.as_ref().map_or(0, String::len)
        }
        Body::Unproven { reason } => reason.len(),
    }
}

/// The dead letter of an event that was decoded once already.
fn letter_of(event: &SourceEvent, reason: String) -> DeadLetter {
    match &event.body {
        Body::Envelope(content) => match Event::decode(content) {
            Ok(e) => DeadLetter::of_event(event.position, &e, reason),
            Err(_) => DeadLetter::raw(event.position, content, reason),
        },
        Body::Row(row) => DeadLetter::of_event(event.position, &row.as_event(), reason),
        Body::Unproven { .. } => DeadLetter::raw(event.position, &[], reason),
    }
}

/// A record handed to the sink: its checkpoint unit, when its event started (Unix µs, for the
/// latency), its size in bytes, its topic and partition (for the counters), and its delivery: the
/// future to wait for ([`Delivery`]), then the outcome ([`Delivered`]).
struct InFlight<T> {
    unit: UnitId,
    since: i64,
    size: usize,
    to: Arc<Series>,
    delivery: T,
}

/// One partition's sent and published counters, looked up once per session: the loop counts each
/// record without building its labels or locking the metric family again.
struct Series {
    labels: PartitionLabels,
    sent: Counter,
    published: Counter,
}

impl InFlight<Delivery> {
    /// The same record once its delivery has an outcome.
    async fn landed(self) -> InFlight<Delivered> {
        InFlight {
            unit: self.unit,
            since: self.since,
            size: self.size,
            to: self.to,
            delivery: self.delivery.await,
        }
    }
}

impl<'a, K: Sink, D: DeadLetters> Pipeline<'a, K, D> {
    pub fn new(
        kafka: &'a KafkaConfig,
        source: &'a SourceConfig,
        metrics: &'a Metrics,
        sink: &'a mut K,
        dead: D,
        frontier: &'a mut Frontier,
    ) -> Self {
        Pipeline {
            kafka,
            source,
            metrics,
            sink,
            dead,
            dedup: Dedup::default(),
            identity: Identity::default(),
            shutdown: CancellationToken::new(),
            parked: HashMap::new(),
            pause_limit: Duration::MAX,
            frontier,
            alone_until: None,
            sent_max: None,
            unproven: (0, None),
            series: HashMap::new(),
        }
    }

    /// Streams from `source` until shutdown (Ok, after a drain) or an error (no confirmation past
    /// the last fully acknowledged unit).
    pub async fn run<S: Source>(
        mut self,
        mut source: S,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        self.shutdown = shutdown.clone();
        self.sink.forget_partition_counts();
        self.identity = source.identity().clone();
        self.alone_until = self.frontier.of(&self.identity.name);
        if let Some(until) = self.alone_until {
            info!(%until, "the last session lost a delivery: sending what it had sent one record at a time");
        }
        self.metrics.in_flight.store(0, Ordering::Relaxed);
        self.metrics.degraded.store(false, Ordering::Relaxed);
        // Whatever an earlier session of this process sent was settled or withdrawn when it ended
        // (see `run`). Holding the source (slot, lock) fences out any other relay from now on, but
        // a relay that was just killed, or that withdrew, may have left whole produce requests in
        // its sockets that the broker still appends: give them time to land before the dedup reads
        // the partitions back.
        self.sink.flush(Duration::from_secs(60)).await?;
        // A paused predecessor's records live fence_timeout: wait out what the server's timeout
        // does not already cover (see fence.rs).
        // After a predecessor that stopped cleanly (everything it sent acknowledged) nothing of it
        // is left in any socket: no restart grace (a paused one's record lifetime still counts).
        let restart_grace = if source.predecessor_stopped_cleanly() {
            info!("the source's last session stopped cleanly: nothing of it can still land, no restart grace");
            Duration::ZERO
        } else {
            self.source.restart_grace
        };
        let grace = match source.replaced_after() {
            Some(after) => {
                crate::fence::takeover_wait(restart_grace, self.kafka.fence_timeout, after)
            }
            None => restart_grace,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(grace) => {}
        }
        self.pause_limit = source.pause_limit();
        self.metrics.pause.reset();
        if let Some(withdrawal) = self.sink.withdrawal() {
            self.metrics.pause.arm(self.pause_limit, withdrawal);
        }
        self.metrics.healthy.store(true, Ordering::Relaxed);
        self.metrics.set_standby(None);
        let mut checkpoint = Checkpoint::<S::Ack>::default();
        let mut inflight = FuturesUnordered::new();
        let mut steps = Vec::new();
        let max_in_flight = self.source.max_in_flight;
        // record bytes in flight: reading pauses beyond max_in_flight_bytes too
        let mut bytes = 0usize;
        let mut partition_check = tokio::time::interval(self.kafka.partition_check);
        partition_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        partition_check.reset();
        // Why the session ends at the next unit boundary (a topic's partition count changed), and
        // whether that boundary was reached: nothing more is read, what is in flight drains.
        let mut ending: Option<String> = None;
        let mut ended = false;
        // whether events of a unit not closed yet were read
        let mut open_unit = false;
        let mut parked_retry = tokio::time::interval(PARKED_RETRY);
        parked_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if ended && inflight.is_empty() && self.parked.is_empty() {
                break;
            }
            let waiting = self.parked.values().map(VecDeque::len).sum::<usize>();
            let room = if ended || bytes >= self.source.max_in_flight_bytes {
                0
            } else if self.alone_until.is_some() {
                usize::from(inflight.is_empty() && waiting == 0)
            } else {
                max_in_flight.saturating_sub(inflight.len() + waiting)
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(landed @ InFlight { .. }) = inflight.next(), if !inflight.is_empty() => {
                    bytes -= landed.size;
                    self.delivered(&mut checkpoint, landed).await?;
                    // take every other acknowledgement that is already there before confirming
                    while let Some(Some(landed @ InFlight { .. })) = inflight.next().now_or_never() {
                        bytes -= landed.size;
                        self.delivered(&mut checkpoint, landed).await?;
                    }
                    self.metrics.progress();
                }
                _ = parked_retry.tick(), if !self.parked.is_empty() => {
                    for flight in self.retry_parked(&mut checkpoint, &mut bytes).await? {
                        bytes += flight.size;
                        inflight.push(flight.landed());
                    }
                }
                _ = partition_check.tick(), if ending.is_none() => {
                    if let Some((topic, was, now)) =
                        self.sink.changed_partition_counts().await.into_iter().next()
                    {
                        warn!(%topic, was, now, "the topic's partition count changed: the session ends at the \
                              next transaction boundary, and the next one routes keys with the new count");
                        ending = Some(format!(
                            "the partition count of topic {topic} changed from {was} to {now}: a new session \
                             routes keys with it"
                        ));
                        ended = !open_unit;
                    }
                }
                taken = source.next(room, &mut steps), if room > 0 => {
                    taken?;
                    for step in steps.drain(..) {
                        if ended {
                            // not sent, so not confirmed: the next session reads them again
                            continue;
                        }
                        match step {
                            Step::Event(event) => {
                                open_unit = true;
                                self.dedup.delivered(event.position);
                                let since = event.since_micros;
                                match self.publish(&event).await? {
                                    Route::Sent(delivery, size, to) => {
                                        if inflight.is_empty() {
                                            // a new flight: the stall clock starts now
                                            self.metrics.progress();
                                        }
                                        bytes += size;
                                        let unit = checkpoint.sent();
                                        inflight.push(InFlight { unit, since, size, to, delivery }.landed());
                                    }
                                    Route::Done => {}
                                    Route::Park(topic) => {
                                        let size = body_size(&event);
                                        bytes += size;
                                        let unit = checkpoint.sent();
                                        self.park(topic, event, unit, size);
                                    }
                                }
                            }
                            Step::Close(ack) => {
                                checkpoint.close(ack);
                                open_unit = false;
                                ended = ending.is_some();
                            }
                            Step::Idle(ack) => {
                                checkpoint.idle(ack);
                                open_unit = false;
                                ended = ending.is_some();
                            }
                        }
                    }
                }
            }
            self.metrics
                .in_flight
                .store(inflight.len() as u64, Ordering::Relaxed);
            if let Some(ack) = checkpoint.take() {
                source.confirm(ack).await?;
            }
        }
        info!(in_flight = inflight.len(), "ending the session: flushing");
        let deadline = tokio::time::sleep(DRAIN_TIMEOUT);
        tokio::pin!(deadline);
        let mut flushed = true;
        if let Err(e) = self.sink.flush(DRAIN_TIMEOUT).await {
            // what was acknowledged is still confirmed below
            warn!(error = %e, "flush at shutdown did not complete");
            flushed = false;
        }
        while !inflight.is_empty() {
            tokio::select! {
                Some(landed @ InFlight { .. }) = inflight.next() => {
                    self.delivered(&mut checkpoint, landed).await?;
                }
                _ = &mut deadline => {
                    warn!(in_flight = inflight.len(), "records still unacknowledged at shutdown; the next session replays them");
                    break;
                }
            }
        }
        if let Some(ack) = checkpoint.take() {
            source.confirm(ack).await?;
        }
        if flushed && inflight.is_empty() && ending.is_none() {
            // a graceful stop with every record acknowledged: the next session need not wait
            source.stopped_cleanly().await?;
        }
        source.close().await?;
        match ending {
            Some(reason) if ended => Err(RelayError::transient(reason)),
            _ => Ok(()),
        }
    }

    /// One outcome: acknowledged or dead-lettered events count as done; a failure ends the session.
    async fn delivered<A: Copy>(
        &mut self,
        checkpoint: &mut Checkpoint<A>,
        landed: InFlight<Delivered>,
    ) -> Result<(), RelayError> {
        match landed.delivery {
            Delivered::Acked => {
                landed.to.published.inc();
                self.metrics.latency.observe(seconds_since(landed.since));
            }
            Delivered::Rejected(letter) => {
                self.dead_letter(*letter, Some(landed.to.labels.clone()))
                    .await?
            }
            Delivered::Failed(e) => {
                // nothing behind a failed record may land: that would be a hole
                self.sink.withdraw();
                self.frontier.lost(&self.identity.name, self.sent_max);
                return Err(e);
            }
        }
        checkpoint.acked(landed.unit);
        Ok(())
    }

    /// Passes over a message that nothing proves `outbox.enqueue` wrote: a counter, and a log line
    /// at most every [`UNPROVEN_LOG_EVERY`], so that a flood of them (any role can write them) costs
    /// neither a row nor a line each, and the real events behind them flow.
    fn unproven(&mut self, reason: &str) {
        self.metrics.unproven_messages.inc();
        let (count, logged) = &mut self.unproven;
        *count += 1;
        if logged.is_none_or(|at| at.elapsed() >= UNPROVEN_LOG_EVERY) {
            warn!(
                messages = *count,
                last_reason = %reason,
                "passed over pg_outbox messages that outbox.enqueue did not write (any role can \
                 write them with pg_logical_emit_message); never published, counted in \
                 pg_outbox_relay_unproven_messages_total"
            );
            *count = 0;
            *logged = Some(tokio::time::Instant::now());
        }
    }

    /// The counters of `topic`/`partition`, made on the first record sent there.
    fn series(&mut self, topic: &str, partition: i32) -> Arc<Series> {
        if let Some(series) = self.series.get(topic).and_then(|p| p.get(&partition)) {
            return series.clone();
        }
        let labels = PartitionLabels::new(topic, partition);
        let series = Arc::new(Series {
            sent: self.metrics.sent.get_or_create(&labels).clone(),
            published: self.metrics.published.get_or_create(&labels).clone(),
            labels,
        });
        self.series
            .entry(topic.to_string())
            .or_default()
            .insert(partition, series.clone());
        series
    }

    /// Records an event that can never be published, or stops the relay if the operator chose so;
    /// `to` is where it would have gone, if it had a topic the relay may write to (and a partition,
    /// or -1): the counter's labels, `(none)`/-1 otherwise, so that a writer's odd topic names
    /// make no series.
    async fn dead_letter(
        &mut self,
        letter: DeadLetter,
        to: Option<PartitionLabels>,
    ) -> Result<(), RelayError> {
        if self.source.on_poison == OnPoison::Stop {
            return Err(RelayError::permanent(format!(
                "the event at position {} cannot be published ({}) and on_poison = stop: fix the cause, \
                 or set on_poison = dead-letter to record it in outbox.dead_letters and go on",
                letter.position, letter.reason
            )));
        }
        self.dead.record(letter).await?;
        let to = to.unwrap_or_else(|| PartitionLabels::new("(none)", -1));
        self.metrics.dead_lettered.get_or_create(&to).inc();
        Ok(())
    }

    /// Sends one event unless Kafka already has it: where it went (see [`Route`]).
    async fn publish(&mut self, event: &SourceEvent) -> Result<Route, RelayError> {
        let position = event.position;
        let decoded;
        let event = match &event.body {
            Body::Envelope(content) => match Event::decode(content) {
                Ok(e) => e,
                Err(e) => {
                    let reason = format!("undecodable envelope: {e}");
                    self.dead_letter(DeadLetter::raw(position, content, reason), None)
                        .await?;
                    return Ok(Route::Done);
                }
            },
            Body::Row(row) => {
                decoded = row.as_event();
                decoded
            }
            Body::Unproven { reason } => {
                self.unproven(reason);
                return Ok(Route::Done);
            }
        };
        self.send(position, &event).await
    }

    async fn send(&mut self, position: Position, event: &Event<'_>) -> Result<Route, RelayError> {
        // a relay that was paused long enough to be replaced sends nothing more, and reads nothing
        // back: what it would read back may be its successor's (see relay.rs, `still_ahead`)
        let paused = self.metrics.pause.paused();
        if paused >= self.pause_limit {
            self.sink.withdraw();
            return Err(RelayError::transient(format!(
                "this relay was paused for {:.1} s (limit {:.1} s): another relay may hold the \
                 source now; what the producer still held is withdrawn and the session starts again",
                paused.as_secs_f64(),
                self.pause_limit.as_secs_f64()
            )));
        }
        let topic = self.kafka.topic_for(event.topic);
        if let Err(e) = pg_outbox_envelope::validate_topic(&topic) {
            let reason = format!("topic_template gives an invalid Kafka topic {topic:?}: {e}");
            self.dead_letter(DeadLetter::of_event(position, event, reason), None)
                .await?;
            return Ok(Route::Done);
        }
        // writers choose their events' topics: only those the operator allowed are written
        if !self.kafka.allows(&topic) {
            let reason = format!("topic {topic:?} is not in allowed_topics");
            self.dead_letter(DeadLetter::of_event(position, event, reason), None)
                .await?;
            return Ok(Route::Done);
        }
        // a topic whose earlier events wait keeps them ahead of this one
        if self.parked.contains_key(topic.as_ref()) {
            return Ok(Route::Park(topic.into_owned()));
        }
        let partitions = match self.sink.partition_count(&topic).await {
            Ok(n) => n,
            Err(e) if e.kind() == Kind::Event => {
                warn!(%topic, %position, error = %e, "events to this topic cannot be published yet: they wait (at most \
                      poison_retry_ms each) while events to other topics go on");
                return Ok(Route::Park(topic.into_owned()));
            }
            Err(e) => return Err(e),
        };
        let key = event.key.map(str::as_bytes);
        let partition = partition_for(key, &event.id, partitions);
        let source_id = self.identity.name.as_str();
        let id = event.id_string();
        if self
            .dedup
            .already_published(
                &*self.sink,
                &self.identity,
                self.metrics,
                &topic,
                partitions,
                partition,
                position,
                id.as_bytes(),
            )
            .await?
        {
            self.metrics
                .skipped
                .get_or_create(&PartitionLabels::new(&topic, partition))
                .inc();
            return Ok(Route::Done);
        }
        let alone = match self.alone_until {
            Some(until) if position <= until => true,
            Some(until) => {
                info!(%until, "past what the last session had sent: records flow at full speed again");
                self.alone_until = None;
                *self.frontier = Frontier::default();
                false
            }
            None => false,
        };
        // the proof that this relay wrote the record: the restart dedup believes nothing else
        let mac = self.identity.key.sign(&mac_fields(
            source_id,
            &topic,
            partition,
            position,
            id.as_bytes(),
        ));
        let record = Record {
            topic: &topic,
            partition,
            key,
            payload: event.payload,
            timestamp_ms: match self.kafka.record_timestamp {
                RecordTimestamp::Enqueue => event.created_at_micros / 1000,
                RecordTimestamp::Publish => unix_micros_now() / 1000,
            },
            event_id: &id,
            position,
            source_id,
            mac: &mac,
            headers: &event.headers,
            trace: event.trace_context,
            format: self.kafka.record_format,
            payload_is_json: event.payload_is_json,
            created_at_micros: event.created_at_micros,
            alone,
        };
        let size = record.size();
        if size > self.kafka.max_record_bytes {
            let reason = format!(
                "record of {size} bytes exceeds max_record_bytes ({})",
                self.kafka.max_record_bytes
            );
            let to = PartitionLabels::new(&topic, partition);
            self.dead_letter(DeadLetter::of_event(position, event, reason), Some(to))
                .await?;
            return Ok(Route::Done);
        }
        self.sent_max = self.sent_max.max(Some(position));
        match self.sink.send(record).await {
            Ok(delivery) => {
                let to = self.series(&topic, partition);
                to.sent.inc();
                Ok(Route::Sent(delivery, size, to))
            }
            Err(e) => {
                // a producer stopped by a refused batch refuses everything from then on
                self.frontier.lost(&self.identity.name, self.sent_max);
                Err(e)
            }
        }
    }

    /// An event waits for its topic (see [`Route::Park`]); `/healthz` says degraded meanwhile.
    fn park(&mut self, topic: String, event: SourceEvent, unit: UnitId, size: usize) {
        self.metrics.degraded.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.source.poison_retry;
        self.parked.entry(topic).or_default().push_back(Parked {
            event,
            unit,
            size,
            deadline,
        });
    }

    /// Looks each waiting topic up again: a topic that can be written to now gets its events, in
    /// order (returned as deliveries to wait for); of one that still cannot, the events that waited
    /// `poison_retry` are dead-lettered, oldest first. Only what waited its whole time is given
    /// up, so a topic missing or forbidden for a moment (an authorization error while ACLs
    /// change) costs a wait, not the events of that moment.
    async fn retry_parked<A: Copy>(
        &mut self,
        checkpoint: &mut Checkpoint<A>,
        bytes: &mut usize,
    ) -> Result<Vec<InFlight<Delivery>>, RelayError> {
        let mut sent = Vec::new();
        let topics: Vec<String> = self.parked.keys().cloned().collect();
        for topic in topics {
            let mut queue = self.parked.remove(&topic).unwrap_or_default();
            let error = match self.sink.partition_count(&topic).await {
                Ok(_) => None,
                Err(e) if e.kind() == Kind::Event => Some(e),
                Err(e) => return Err(e),
            };
            while let Some(waiting) = queue.pop_front() {
                match &error {
                    None => match self.publish(&waiting.event).await? {
                        Route::Sent(delivery, size, to) => {
                            *bytes -= waiting.size;
                            sent.push(InFlight {
                                unit: waiting.unit,
                                since: waiting.event.since_micros,
                                size,
                                to,
                                delivery,
                            });
                        }
                        Route::Done => {
                            *bytes -= waiting.size;
                            checkpoint.acked(waiting.unit);
                        }
                        Route::Park(_) => {
                            queue.push_front(waiting);
                            break;
                        }
                    },
                    Some(e) if waiting.deadline <= tokio::time::Instant::now() => {
                        let reason = format!(
                            "{e} (retried for {} ms)",
                            self.source.poison_retry.as_millis()
                        );
                        let to = PartitionLabels::new(&topic, -1);
                        self.dead_letter(letter_of(&waiting.event, reason), Some(to))
                            .await?;
                        *bytes -= waiting.size;
                        checkpoint.acked(waiting.unit);
                    }
                    Some(_) => {
                        queue.push_front(waiting);
                        break;
                    }
                }
            }
            if !queue.is_empty() {
                self.parked.insert(topic, queue);
            }
        }
        self.metrics
            .degraded
            .store(!self.parked.is_empty(), Ordering::Relaxed);
        Ok(sent)
    }
}

/// The loop against an in-memory source, sink and dead letters, with injected faults. Every test
/// checks the checkpoint rule on the log of what happened: when a unit is confirmed, every event
/// of it and of every earlier unit was acknowledged or dead-lettered before.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceKind;
    use crate::deadletter::memory::MemoryDeadLetters;
    use crate::sink::memory::{Fate, MemorySink, Plan};
    use crate::source::memory::MemorySource;
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone, PartialEq)]
    enum Entry {
        Acked(Position),
        Dead(Position),
        Confirmed(u64),
    }

    type Log = Arc<Mutex<Vec<Entry>>>;

    fn envelope(position: Position) -> Bytes {
        envelope_to(position, "t")
    }

    fn envelope_to(position: Position, topic: &str) -> Bytes {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&position.major.to_be_bytes());
        id[8..].copy_from_slice(&position.minor.to_be_bytes());
        let key = format!("k{}", position.minor % 3);
        let event = Event {
            id,
            created_at_micros: 1,
            topic,
            key: Some(&key),
            headers: vec![("h", b"v".as_slice())],
            trace_context: None,
            payload_is_json: true,
            payload: b"{}",
        };
        Bytes::from(event.encode().unwrap())
    }

    fn event(position: Position, body: Option<Body>) -> Step<u64> {
        Step::Event(SourceEvent {
            position,
            since_micros: 0,
            body: body.unwrap_or_else(|| Body::Envelope(envelope(position))),
        })
    }

    /// `units` units of `per_unit` events; unit u holds positions (u, 0..per_unit), closed by u.
    fn script(units: u64, per_unit: u64) -> Vec<Step<u64>> {
        let mut steps = Vec::new();
        for u in 0..units {
            for i in 0..per_unit {
                steps.push(event(Position::new(u, i), None));
            }
            steps.push(Step::Close(u));
        }
        steps
    }

    struct Outcome {
        result: Result<(), RelayError>,
        log: Vec<Entry>,
        confirmed: Vec<u64>,
        closed: bool,
        dead: Vec<DeadLetter>,
        metrics: Metrics,
    }

    /// The settings of a test session.
    fn configs(max_in_flight: usize, on_poison: OnPoison) -> (KafkaConfig, SourceConfig) {
        let kafka = KafkaConfig {
            brokers: String::new(),
            fence_timeout: Duration::from_secs(30),
            topic_template: "{topic}".into(),
            max_record_bytes: 1_000_000,
            record_timestamp: RecordTimestamp::Enqueue,
            record_format: crate::kafka::RecordFormat::PgOutbox,
            partition_check: Duration::from_secs(10),
            settings: Default::default(),
            allowed_topics: Vec::new(),
        };
        let source_config = SourceConfig {
            kind: SourceKind::Wal,
            slot: "s".into(),
            create_slot: false,
            source_id: "test".into(),
            poll_batch: 1000,
            poll_interval: Duration::from_secs(1),
            max_in_flight,
            max_in_flight_bytes: usize::MAX,
            restart_grace: Duration::ZERO,
            backoff_max: Duration::from_secs(1),
            on_poison,
            poison_retry: Duration::from_secs(5),
        };
        (kafka, source_config)
    }

    /// Runs the loop until it fails, or until `last` is confirmed (then shuts down), or until
    /// `shutdown_after` passes.
    async fn run(
        steps: Vec<Step<u64>>,
        plan: Plan,
        max_in_flight: usize,
        last: Option<u64>,
        shutdown_after: Option<Duration>,
    ) -> Outcome {
        run_with(
            steps,
            plan,
            max_in_flight,
            last,
            shutdown_after,
            OnPoison::DeadLetter,
        )
        .await
    }

    async fn run_with(
        steps: Vec<Step<u64>>,
        plan: Plan,
        max_in_flight: usize,
        last: Option<u64>,
        shutdown_after: Option<Duration>,
        on_poison: OnPoison,
    ) -> Outcome {
        let log: Log = Arc::default();
        // every event must be acknowledged or dead-lettered before its unit is confirmed; a
        // message nothing proves is an event is only counted
        let positions: Vec<Position> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Event(e) if !matches!(e.body, Body::Unproven { .. }) => Some(e.position),
                _ => None,
            })
            .collect();
        let shutdown = CancellationToken::new();
        let mut source = MemorySource::new(steps);
        let (l, token) = (log.clone(), shutdown.clone());
        source.on_confirm = Some(Arc::new(move |ack| {
            // the rule: everything up to this unit is done
            let log = l.lock().unwrap();
            for p in positions.iter().filter(|p| p.major <= ack) {
                assert!(
                    log.contains(&Entry::Acked(*p)) || log.contains(&Entry::Dead(*p)),
                    "confirmed {ack} while {p} was neither acknowledged nor dead-lettered"
                );
            }
            drop(log);
            l.lock().unwrap().push(Entry::Confirmed(ack));
            if Some(ack) == last {
                token.cancel();
            }
        }));
        let (confirmed, closed) = (source.confirmed.clone(), source.closed.clone());
        let mut sink = MemorySink::new(1, plan);
        sink.missing_topics = vec!["gone".into()];
        let l = log.clone();
        sink.on_ack = Some(Arc::new(move |p| l.lock().unwrap().push(Entry::Acked(p))));
        let mut dead = MemoryDeadLetters::default();
        let l = log.clone();
        dead.on_record = Some(Arc::new(move |p| l.lock().unwrap().push(Entry::Dead(p))));
        let (kafka, source_config) = configs(max_in_flight, on_poison);
        if let Some(after) = shutdown_after {
            let token = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                token.cancel();
            });
        }
        let metrics = Metrics::default();
        let mut frontier = Frontier::default();
        let pipeline = Pipeline::new(
            &kafka,
            &source_config,
            &metrics,
            &mut sink,
            dead.clone(),
            &mut frontier,
        );
        let result = pipeline.run(source, &shutdown).await;
        let log = log.lock().unwrap().clone();
        let confirmed = confirmed.lock().unwrap().clone();
        let dead = dead.letters.lock().unwrap().clone();
        Outcome {
            result,
            log,
            confirmed,
            closed: closed.load(Ordering::Relaxed),
            dead,
            metrics,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_delivery_in_the_middle_of_a_batch_stops_confirmation_before_it() {
        // ten one-event units; the fifth fails after the later ones were acknowledged
        let plan: Plan = Box::new(|n, _| {
            if n == 4 {
                Fate::Fail(ms(50))
            } else {
                Fate::Ack(Duration::ZERO)
            }
        });
        let out = run(script(10, 1), plan, 100, None, None).await;
        let err = out.result.expect_err("the session ends");
        assert!(!err.is_permanent(), "transient: the relay reconnects");
        assert_eq!(
            out.confirmed.last(),
            Some(&3),
            "nothing at or after the hole"
        );
        for later in 5..10 {
            assert!(
                out.log.contains(&Entry::Acked(Position::new(later, 0))),
                "unit {later} was acknowledged, and still not confirmed"
            );
        }
        assert!(!out.closed, "an error is not a graceful end");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_records_in_flight_then_confirms_them() {
        let plan: Plan = Box::new(|_, _| Fate::Ack(ms(100)));
        let out = run(script(5, 2), plan, 100, None, Some(ms(10))).await;
        out.result.expect("graceful");
        assert_eq!(
            out.confirmed.last(),
            Some(&4),
            "all ten drained and confirmed"
        );
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_published_total") as u64,
            10
        );
        assert!(out.closed);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_never_confirms_a_record_that_stays_unacknowledged() {
        // the eighth record (unit 3) never gets an answer: the drain gives up on it
        let plan: Plan = Box::new(|n, _| {
            if n == 7 {
                Fate::Hang
            } else {
                Fate::Ack(ms(100))
            }
        });
        let out = run(script(5, 2), plan, 100, None, Some(ms(10))).await;
        out.result.expect("graceful");
        assert_eq!(out.confirmed.last(), Some(&2), "units 3 and 4 are replayed");
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_published_total") as u64,
            9
        );
        assert!(out.closed);
    }

    #[tokio::test(start_paused = true)]
    async fn dead_lettered_events_between_acknowledged_ones_count_as_done() {
        let mut steps = script(6, 1);
        // an undecodable envelope and a message nothing proves is an event, in unit 6
        steps.push(event(
            Position::new(6, 0),
            Some(Body::Envelope(Bytes::from_static(b"\xff junk"))),
        ));
        steps.push(event(
            Position::new(6, 1),
            Some(Body::Unproven {
                reason: "non-transactional".into(),
            }),
        ));
        steps.push(Step::Close(6));
        steps.extend([event(Position::new(7, 0), None), Step::Close(7)]);
        // the broker refuses the third record for good
        let plan: Plan = Box::new(|n, _| {
            if n == 2 {
                Fate::Reject(ms(5))
            } else {
                Fate::Ack(ms(1))
            }
        });
        let out = run(steps, plan, 100, Some(7), None).await;
        out.result.expect("graceful");
        assert_eq!(out.confirmed.last(), Some(&7));
        let dead: Vec<Position> = out.dead.iter().map(|d| d.position).collect();
        // the unproven message is counted, not dead-lettered
        assert_eq!(dead, [Position::new(6, 0), Position::new(2, 0)]);
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_unproven_messages_total") as u64,
            1
        );
        assert!(
            out.dead[0].reason.contains("undecodable"),
            "{:?}",
            out.dead[0]
        );
        assert_eq!(out.dead[1].topic.as_deref(), Some("t"));
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_published_total") as u64,
            6
        );
        assert_eq!(
            out.metrics
                .sum("pg_outbox_relay_events_dead_lettered_total") as u64,
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledgements_out_of_order_confirm_only_complete_prefixes() {
        // later records are acknowledged first
        let plan: Plan = Box::new(|n, _| Fate::Ack(ms(200 - n as u64)));
        let out = run(script(20, 3), plan, 25, Some(19), None).await;
        out.result.expect("graceful");
        assert_eq!(out.confirmed.last(), Some(&19));
        let acked: Vec<Position> = out
            .log
            .iter()
            .filter_map(|e| match e {
                Entry::Acked(p) => Some(*p),
                _ => None,
            })
            .collect();
        assert_eq!(acked.len(), 60);
        assert!(
            acked.windows(2).any(|w| w[0] > w[1]),
            "acknowledgements did arrive out of order"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replayed_event_already_in_the_sink_is_skipped_and_confirmed() {
        // unit 1 handed over twice (a replay from the confirmed position)
        let mut steps = script(2, 2);
        steps.extend(script(2, 2).into_iter().skip(3));
        let plan: Plan = Box::new(|_, _| Fate::Ack(Duration::ZERO));
        let out = run(steps, plan, 100, None, Some(ms(500))).await;
        out.result.expect("graceful");
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_published_total") as u64,
            4
        );
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_skipped_total") as u64,
            2
        );
        assert_eq!(out.confirmed.last(), Some(&1));
    }

    /// Unit 2's event goes to a topic that does not exist; units 0, 1, 3, 4 to one that does.
    fn script_with_missing_topic() -> Vec<Step<u64>> {
        let mut steps = Vec::new();
        for u in 0..5 {
            let p = Position::new(u, 0);
            let body = (u == 2).then(|| Body::Envelope(envelope_to(p, "gone")));
            steps.extend([event(p, body), Step::Close(u)]);
        }
        steps
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_to_a_missing_topic_is_retried_then_dead_lettered_and_the_stream_goes_on() {
        let plan: Plan = Box::new(|_, _| Fate::Ack(ms(1)));
        let out = run(script_with_missing_topic(), plan, 100, Some(4), None).await;
        out.result.expect("graceful");
        assert_eq!(out.confirmed.last(), Some(&4), "the stream went past it");
        assert_eq!(out.dead.len(), 1);
        assert_eq!(out.dead[0].position, Position::new(2, 0));
        assert_eq!(out.dead[0].topic.as_deref(), Some("gone"));
        assert!(
            out.dead[0].reason.contains("Unknown topic"),
            "{:?}",
            out.dead[0]
        );
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_published_total") as u64,
            4
        );
        assert!(
            !out.metrics.degraded.load(Ordering::Relaxed),
            "healthy again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_to_a_missing_topic_wait_while_the_rest_of_the_stream_flows() {
        // unit 2 goes to "gone", then eight more units to "t": they must not wait behind it
        let mut steps = script_with_missing_topic();
        for u in 5..10 {
            steps.extend([event(Position::new(u, 0), None), Step::Close(u)]);
        }
        let plan: Plan = Box::new(|_, _| Fate::Ack(ms(1)));
        let out = run(steps, plan, 100, Some(9), None).await;
        out.result.expect("graceful");
        assert_eq!(out.confirmed.last(), Some(&9));
        let dead_at = out
            .log
            .iter()
            .position(|e| *e == Entry::Dead(Position::new(2, 0)))
            .expect("dead-lettered");
        let last_ack = out
            .log
            .iter()
            .rposition(|e| *e == Entry::Acked(Position::new(9, 0)))
            .expect("acknowledged");
        assert!(
            last_ack < dead_at,
            "every later event was published while the one to the missing topic waited: {:?}",
            out.log
        );
        // nothing after the waiting event is confirmed before it is done
        let first_confirm_past = out
            .log
            .iter()
            .position(|e| matches!(e, Entry::Confirmed(c) if *c >= 2))
            .expect("confirmed");
        assert!(first_confirm_past > dead_at, "{:?}", out.log);
        assert_eq!(
            out.metrics.sum("pg_outbox_relay_events_published_total") as u64,
            9
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_poison_stop_stops_before_the_event_and_records_nothing() {
        let plan: Plan = Box::new(|_, _| Fate::Ack(ms(1)));
        let out = run_with(
            script_with_missing_topic(),
            plan,
            100,
            None,
            None,
            OnPoison::Stop,
        )
        .await;
        let err = out.result.expect_err("stops");
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().contains("on_poison"), "{err}");
        assert!(out.dead.is_empty());
        assert!(out.confirmed.last() <= Some(&1), "never past the event");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_lost_delivery_what_was_sent_is_sent_alone_and_only_the_refused_record_is_dead_lettered(
    ) {
        // like a broker: the record at unit 4 fails the batch it travels in (from unit 3 on here,
        // with librdkafka's gapless guarantee nothing behind it lands); sent alone, it is refused
        // on its own and the others are taken
        let bad = Position::new(4, 0);
        let sends: Arc<Mutex<Vec<(Position, bool)>>> = Arc::default();
        let seen = sends.clone();
        let plan: Plan = Box::new(move |_, record| {
            seen.lock().unwrap().push((record.position, record.alone));
            match (record.position, record.alone) {
                (p, true) if p == bad => Fate::Reject(ms(1)),
                (p, false) if (3..=9).contains(&p.major) => Fate::Fail(ms(5)),
                _ => Fate::Ack(ms(1)),
            }
        });
        let mut sink = MemorySink::new(1, plan);
        let dead = MemoryDeadLetters::default();
        let (kafka, source_config) = configs(100, OnPoison::DeadLetter);
        let metrics = Metrics::default();
        let mut frontier = Frontier::default();
        // the first session sends units 0 to 9 together and loses a delivery
        let source = MemorySource::new(script(10, 1));
        let first = Pipeline::new(
            &kafka,
            &source_config,
            &metrics,
            &mut sink,
            dead.clone(),
            &mut frontier,
        )
        .run(source, &CancellationToken::new())
        .await;
        assert!(!first.expect_err("lost a delivery").is_permanent());
        assert_eq!(
            frontier.of("test"),
            Some(Position::new(9, 0)),
            "all ten were sent"
        );
        assert!(
            dead.letters.lock().unwrap().is_empty(),
            "nothing judged in a batch"
        );
        assert!(sends.lock().unwrap().iter().all(|(_, alone)| !alone));
        // the next session replays everything, now with units 10 and 11 behind
        sends.lock().unwrap().clear();
        let mut source = MemorySource::new(script(12, 1));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        source.on_confirm = Some(Arc::new(move |ack| {
            if ack == 11 {
                token.cancel();
            }
        }));
        let second = Pipeline::new(
            &kafka,
            &source_config,
            &metrics,
            &mut sink,
            dead.clone(),
            &mut frontier,
        )
        .run(source, &shutdown)
        .await;
        second.expect("the stream goes on past the refused record");
        let letters = dead.letters.lock().unwrap().clone();
        assert_eq!(
            letters.iter().map(|l| l.position).collect::<Vec<_>>(),
            vec![bad],
            "only the refused record is dead-lettered"
        );
        let sends = sends.lock().unwrap().clone();
        let expected: Vec<(Position, bool)> =
            (3..12).map(|u| (Position::new(u, 0), u <= 9)).collect();
        assert_eq!(
            sends, expected,
            "what Kafka lacks up to the frontier is sent alone, then at full speed"
        );
        assert_eq!(frontier, Frontier::default(), "passed");
        let stored = sink.stored_positions();
        let want: Vec<Position> = (0..12)
            .filter(|u| *u != 4)
            .map(|u| Position::new(u, 0))
            .collect();
        let mut sorted = stored.clone();
        sorted.sort();
        assert_eq!(sorted, want, "every other record once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_count_change_ends_the_session_at_the_next_unit_boundary() {
        // units of three events; the topic grows while unit 1 is being read
        let mut sink = MemorySink::new(2, Box::new(|_, _| Fate::Ack(ms(1))));
        let resized = sink.resized.clone();
        let dead = MemoryDeadLetters::default();
        let (mut kafka, source_config) = configs(100, OnPoison::DeadLetter);
        kafka.partition_check = ms(100);
        let metrics = Metrics::default();
        let mut frontier = Frontier::default();
        let mut steps = Vec::new();
        for u in 0..4u64 {
            for i in 0..3 {
                steps.push(event(Position::new(u, i), None));
            }
            steps.push(Step::Close(u));
        }
        let mut source = MemorySource::new(steps);
        source.pace = Some(ms(60));
        let confirmed = source.confirmed.clone();
        let grow = resized.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(250)).await;
            *grow.lock().unwrap() = Some(3);
        });
        let run = Pipeline::new(
            &kafka,
            &source_config,
            &metrics,
            &mut sink,
            dead.clone(),
            &mut frontier,
        );
        let never = CancellationToken::new();
        let run = run.run(source, &never);
        let out = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the session ends by itself");
        let err = out.expect_err("the session ends");
        assert!(!err.is_permanent());
        assert!(err.to_string().contains("changed from 2 to 3"), "{err}");
        let confirmed = confirmed.lock().unwrap().clone();
        let last = *confirmed.last().expect("confirmed before ending");
        let stored = sink.stored_positions();
        // every unit up to the boundary is whole in Kafka and confirmed; nothing after it was sent
        let want: Vec<Position> = (0..=last)
            .flat_map(|u| (0..3).map(move |i| Position::new(u, i)))
            .collect();
        assert_eq!(stored, want);
        assert!(last < 3, "ended before the script did");
    }
}
