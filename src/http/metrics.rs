//! Prometheus metrics: HTTP requests and latency by route and status (a middleware), generated
//! tokens and time to first token (the generation path), and, refreshed at each scrape, queue
//! depth, batch size and adapter cache counters per replica, jobs by state and training tokens/s.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tessera_actors::failover::Failover;
use tessera_actors::Node;

use super::AppState;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pub generated_tokens: IntCounter,
    pub time_to_first_token: HistogramVec,
    queue_depth: IntGaugeVec,
    batch_size: IntGaugeVec,
    max_batch_size: IntGaugeVec,
    adapter_events: IntCounterVec,
    engine_tokens: IntCounterVec,
    prefix_cache: IntCounterVec,
    grammar_masks: IntCounterVec,
    jobs: IntGaugeVec,
    training_tokens_per_s: Gauge,
    autoscaler: IntGaugeVec,
    failovers: IntCounterVec,
    /// Last adapter counters seen per (replica, event), to turn engine totals into increments.
    seen: Mutex<HashMap<(String, &'static str), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("tessera".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
            &["route", "method", "status"],
        )
        .expect("metric");
        let generated_tokens =
            IntCounter::new("generated_tokens_total", "Tokens generated").expect("metric");
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Time from request to its first generated token",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["route"],
        )
        .expect("metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new("queue_depth", "Requests waiting for admission, per replica"),
            &["replica"],
        )
        .expect("metric");
        let batch_size = IntGaugeVec::new(
            Opts::new("batch_size", "Sequences in the running batch, per replica"),
            &["replica"],
        )
        .expect("metric");
        let max_batch_size = IntGaugeVec::new(
            Opts::new(
                "max_batch_size",
                "The most sequences a replica decodes together (batching.max_batch_size, or the \
                 size batching.auto_batch_size chose from measured steps)",
            ),
            &["replica"],
        )
        .expect("metric");
        let adapter_events = IntCounterVec::new(
            Opts::new(
                "adapter_cache_total",
                "Adapter cache hits, misses and loads, per replica",
            ),
            &["replica", "event"],
        )
        .expect("metric");
        let engine_tokens = IntCounterVec::new(
            Opts::new(
                "engine_generated_tokens_total",
                "Tokens the replicas generated (including those of cancelled requests)",
            ),
            &["replica"],
        )
        .expect("metric");
        let prefix_cache = IntCounterVec::new(
            Opts::new(
                "prefix_cache_tokens_total",
                "Prompt tokens looked up in the prefix cache (`queried`) and found there (`hit`), per replica",
            ),
            &["replica", "event"],
        )
        .expect("metric");
        let grammar_masks = IntCounterVec::new(
            Opts::new(
                "grammar_masks_total",
                "Structured outputs: token masks computed (`masks`) and the time they took \
                 (`microseconds`, on a helper thread beside the forward), per replica",
            ),
            &["replica", "figure"],
        )
        .expect("metric");
        let jobs = IntGaugeVec::new(Opts::new("jobs", "Fine-tune jobs by state"), &["state"])
            .expect("metric");
        let training_tokens_per_s = Gauge::new(
            "training_tokens_per_second",
            "Tokens per second over all running fine-tune jobs",
        )
        .expect("metric");
        let autoscaler = IntGaugeVec::new(
            Opts::new(
                "autoscaler",
                "Each autoscaled deployment: `replicas`, `desired`, `ongoing` requests, and \
                 the `scale_ups` / `scale_downs` decided so far; scaled to zero: requests \
                 `waiting` for a replica, `cold_starts` and `last_cold_start_ms`",
            ),
            &["deployment", "figure"],
        )
        .expect("metric");
        let failovers = IntCounterVec::new(
            Opts::new(
                "request_failovers_total",
                "Requests moved to another replica because the one serving them was lost, per \
                 deployment",
            ),
            &["deployment"],
        )
        .expect("metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failovers.clone()),
            Box::new(autoscaler.clone()),
            Box::new(latency.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(queue_depth.clone()),
            Box::new(batch_size.clone()),
            Box::new(max_batch_size.clone()),
            Box::new(adapter_events.clone()),
            Box::new(engine_tokens.clone()),
            Box::new(prefix_cache.clone()),
            Box::new(grammar_masks.clone()),
            Box::new(jobs.clone()),
            Box::new(training_tokens_per_s.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Self {
            registry,
            requests,
            latency,
            generated_tokens,
            time_to_first_token,
            queue_depth,
            batch_size,
            max_batch_size,
            adapter_events,
            engine_tokens,
            prefix_cache,
            grammar_masks,
            jobs,
            training_tokens_per_s,
            autoscaler,
            failovers,
            seen: Mutex::default(),
        }
    }

    /// Refreshes the gauges from the actors and the failover relay, then renders the text
    /// format.
    pub async fn render(&self, node: &Node, failover: &Failover) -> String {
        {
            let mut seen = self.seen.lock().expect("metrics");
            for (deployment, total) in failover.moves() {
                let last = seen
                    .insert((deployment.clone(), "failovers"), total)
                    .unwrap_or(0);
                self.failovers
                    .with_label_values(&[&deployment])
                    .inc_by(total.saturating_sub(last));
            }
        }
        for (replica, s) in node.replica_stats().await {
            self.queue_depth
                .with_label_values(&[&replica])
                .set(s.waiting as i64);
            self.batch_size
                .with_label_values(&[&replica])
                .set(s.running as i64);
            self.max_batch_size
                .with_label_values(&[&replica])
                .set(s.batch_size as i64);
            let mut seen = self.seen.lock().expect("metrics");
            for (event, total) in [
                ("hit", s.adapter_hits),
                ("miss", s.adapter_misses),
                ("load", s.adapter_loads),
                ("tokens", s.generated_tokens),
                ("prefix_queried", s.prefix_queried_tokens),
                ("prefix_hit", s.prefix_hit_tokens),
                ("grammar_masks", s.time.masks),
                ("grammar_microseconds", s.time.mask_ns / 1000),
            ] {
                let last = seen.insert((replica.clone(), event), total).unwrap_or(0);
                // A restarted replica starts again from zero.
                let delta = if total >= last { total - last } else { total };
                if event == "tokens" {
                    self.engine_tokens
                        .with_label_values(&[&replica])
                        .inc_by(delta);
                } else if let Some(figure) = event.strip_prefix("grammar_") {
                    self.grammar_masks
                        .with_label_values(&[&replica, figure])
                        .inc_by(delta);
                } else if let Some(kind) = event.strip_prefix("prefix_") {
                    self.prefix_cache
                        .with_label_values(&[&replica, kind])
                        .inc_by(delta);
                } else {
                    self.adapter_events
                        .with_label_values(&[&replica, event])
                        .inc_by(delta);
                }
            }
        }
        self.autoscaler.reset();
        for (name, a) in node
            .deployments
            .list()
            .into_iter()
            .filter_map(|d| Some((d.name, d.autoscaler?)))
        {
            for (figure, v) in [
                ("replicas", a.replicas as i64),
                ("desired", a.desired as i64),
                ("ongoing", a.ongoing as i64),
                ("scale_ups", a.scale_ups as i64),
                ("scale_downs", a.scale_downs as i64),
                ("waiting", a.waiting as i64),
                ("cold_starts", a.cold_starts as i64),
                (
                    "last_cold_start_ms",
                    a.last_cold_start_s.map_or(0, |s| (s * 1e3) as i64),
                ),
            ] {
                self.autoscaler.with_label_values(&[&name, figure]).set(v);
            }
        }
        if let Some(stats) = node.job_stats().await {
            for (state, n) in stats.counts {
                self.jobs.with_label_values(&[state.as_str()]).set(n as i64);
            }
            self.training_tokens_per_s.set(stats.training_tokens_per_s);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("utf-8")
    }
}

/// The `method` label: the standard methods by name, anything else `other` (the method comes from
/// the client before auth, so it must not mint label values).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Counts every request and its latency under its route template (`/jobs/{id}`, not the id).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [route.as_str(), method, status.as_str()];
    state.metrics.requests.with_label_values(&labels).inc();
    state
        .metrics
        .latency
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
