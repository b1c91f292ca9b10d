//! Requests that survive the replica serving them: a relay between the client's stream and the
//! replica's. When the replica is lost before the request ends (its worker evicted or its
//! connection closed, so its stream ends with no end event; or it answers `unavailable`: it
//! stopped, restarts, or never had the request), the relay hands the request to another replica
//! of the same deployment, with the same adapter and sampling, and the tokens already streamed as
//! [`ChatWork::resume`]: the new replica prefills prompt and tokens (its prefix cache holds the
//! prompt when it served it before) and streams only what follows, so the client reads one
//! uninterrupted stream with one `Started`, and `usage` counts the whole (the engine counts the
//! resumed tokens as output). Greedy requests go on exactly as they would have; a seeded one
//! skips the draws already taken.
//!
//! At most `server.request_retries` moves per request, none past its deadline; when no replica
//! can take it, the client gets an `unavailable` error naming the replica lost. With 0 retries the
//! client reads the replica's stream itself, as before this relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::messages::{ChatWork, ServeError, ServeErrorKind, StreamEvent};
use crate::router::{Dispatched, Lease, Router, STREAM_BUFFER};

/// The failover policy and its count of moves.
#[derive(Clone, Default)]
pub struct Failover {
    /// Moves one request may make (`server.request_retries`).
    pub retries: usize,
    /// Moves made, by deployment.
    moves: Arc<Mutex<HashMap<String, u64>>>,
}

impl Failover {
    pub fn new(retries: usize) -> Self {
        Self {
            retries,
            moves: Arc::default(),
        }
    }

    /// Moves made so far, by deployment (`tessera_request_failovers_total`).
    pub fn moves(&self) -> Vec<(String, u64)> {
        let moves = self.moves.lock().expect("failover counts");
        let mut all: Vec<(String, u64)> = moves.iter().map(|(d, n)| (d.clone(), *n)).collect();
        all.sort();
        all
    }

    /// Sends `work` to a replica of `deployment` (admission control as [`Router::dispatch`]) and,
    /// with retries allowed, relays its events, moving it when its replica is lost until
    /// `deadline`.
    pub fn dispatch(
        &self,
        router: &Router,
        deployment: &str,
        work: ChatWork,
        deadline: Instant,
    ) -> Result<Dispatched, ServeError> {
        if self.retries == 0 {
            return router.dispatch(Some(deployment), work);
        }
        let first = router.dispatch(Some(deployment), work.clone())?;
        let (out, events) = mpsc::channel(STREAM_BUFFER);
        let lease = Lease::detached(first.lease.replica.clone());
        let relay = Relay {
            failover: self.clone(),
            router: router.clone(),
            deployment: deployment.to_string(),
            work,
            deadline,
            out,
        };
        tokio::spawn(relay.run(first));
        Ok(Dispatched { events, lease })
    }

    fn count(&self, deployment: &str) {
        *self
            .moves
            .lock()
            .expect("failover counts")
            .entry(deployment.to_string())
            .or_default() += 1;
    }
}

/// One request's relay.
struct Relay {
    failover: Failover,
    router: Router,
    deployment: String,
    work: ChatWork,
    deadline: Instant,
    /// The client's stream.
    out: mpsc::Sender<StreamEvent>,
}

impl Relay {
    async fn run(mut self, mut current: Dispatched) {
        let mut started = false;
        // Ids of the tokens the client has been sent.
        let mut sent: Vec<u32> = Vec::new();
        let mut lost: Vec<String> = Vec::new();
        loop {
            let event = tokio::select! {
                event = current.events.recv() => event,
                // The client is gone: dropping `current` cancels the sequence.
                _ = self.out.closed() => return,
            };
            let why = match event {
                Some(StreamEvent::Started { .. }) if started => continue,
                Some(event @ StreamEvent::Started { .. }) => {
                    started = true;
                    if self.out.send(event).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(StreamEvent::Token(token)) => {
                    let id = token.id;
                    if self.out.send(StreamEvent::Token(token)).await.is_err() {
                        return;
                    }
                    sent.push(id);
                    continue;
                }
                Some(StreamEvent::Error(e)) if e.kind == ServeErrorKind::Unavailable => e.message,
                Some(end) => {
                    let _ = self.out.send(end).await;
                    return;
                }
                None => "its stream ended before the request did".to_string(),
            };
            let replica = current.lease.replica.clone();
            let moves = lost.len();
            let give_up = |more: String| {
                StreamEvent::Error(ServeError::unavailable(format!(
                    "replica {replica} was lost while serving this request ({why}); {more}"
                )))
            };
            if moves >= self.failover.retries {
                let e = give_up(format!(
                    "it was moved {moves} time(s) already (server.request_retries = {}); retry",
                    self.failover.retries
                ));
                let _ = self.out.send(e).await;
                return;
            }
            if Instant::now() >= self.deadline {
                let e = give_up("its deadline has passed".into());
                let _ = self.out.send(e).await;
                return;
            }
            lost.push(replica.clone());
            self.work.resume = sent.clone();
            match self
                .router
                .dispatch_move(&self.deployment, self.work.clone(), &lost)
            {
                Ok(next) => {
                    self.failover.count(&self.deployment);
                    tracing::warn!(
                        request_id = %self.work.trace_id,
                        deployment = %self.deployment,
                        lost = %replica,
                        replica = %next.lease.replica,
                        resumed_tokens = sent.len(),
                        %why,
                        "request moved to another replica"
                    );
                    // Dropping the lost replica's lease: it counts no more.
                    current = next;
                }
                Err(e) => {
                    let _ = self.out.send(give_up(e.message)).await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::messages::{PromptInput, ReplicaInfo, TokenOut};
    use crate::router::Replica;
    use tessera_engine::FinishReason;

    /// How a scripted replica's stream ends.
    #[derive(Clone)]
    enum End {
        /// The stream closes with no end event (a lost worker).
        Lost,
        Finished,
        Error(ServeErrorKind),
        /// Never: the stream stays open until the client goes.
        Hang,
    }

    /// A replica that streams `tokens` (ids counting on from the resumed ones), then `end`; it
    /// records the work it was given and whether its stream was dropped by the client side.
    struct Scripted {
        name: String,
        tokens: u32,
        end: End,
        got: Arc<Mutex<Vec<ChatWork>>>,
        closed: Arc<Mutex<bool>>,
    }

    impl Replica for Scripted {
        fn generate(
            &self,
            work: ChatWork,
            sink: mpsc::Sender<StreamEvent>,
            lease: Lease,
        ) -> Result<(), (Option<Box<ChatWork>>, String)> {
            self.got.lock().unwrap().push(work.clone());
            let (name, tokens, end, closed) = (
                self.name.clone(),
                self.tokens,
                self.end.clone(),
                self.closed.clone(),
            );
            tokio::spawn(async move {
                let _lease = lease;
                let from = work.resume.len() as u32;
                let _ = sink
                    .send(StreamEvent::Started {
                        replica: name,
                        prompt_tokens: 3,
                        tool_format: None,
                    })
                    .await;
                for id in from..from + tokens {
                    let _ = sink.send(StreamEvent::Token(token(id))).await;
                }
                match end {
                    End::Lost => {}
                    End::Finished => {
                        let _ = sink
                            .send(StreamEvent::Finished {
                                text: String::new(),
                                reason: FinishReason::Length,
                                prompt_tokens: 3,
                                completion_tokens: (from + tokens) as usize,
                            })
                            .await;
                    }
                    End::Error(kind) => {
                        let _ = sink
                            .send(StreamEvent::Error(ServeError::new(kind, "scripted")))
                            .await;
                    }
                    End::Hang => {
                        sink.closed().await;
                        *closed.lock().unwrap() = true;
                    }
                }
            });
            Ok(())
        }
    }

    fn token(id: u32) -> TokenOut {
        TokenOut {
            id,
            token: format!("t{id}"),
            text: format!("t{id} "),
            logprob: 0.0,
            top_logprobs: Vec::new(),
        }
    }

    struct Cluster {
        router: Router,
        got: Vec<Arc<Mutex<Vec<ChatWork>>>>,
        closed: Vec<Arc<Mutex<bool>>>,
    }

    /// Replicas r0, r1, ... of deployment `d`, scripted in order; r0 is picked first (the others
    /// start with load).
    fn cluster(scripts: &[(u32, End)]) -> Cluster {
        let router = Router::new(0, 4, 8);
        let mut got = Vec::new();
        let mut closed = Vec::new();
        for (i, (tokens, end)) in scripts.iter().enumerate() {
            let name = format!("r{i}");
            let info = ReplicaInfo {
                node: format!("n{i}"),
                ..ReplicaInfo::for_test(&name)
            };
            let replica = Scripted {
                name,
                tokens: *tokens,
                end: end.clone(),
                got: Arc::default(),
                closed: Arc::default(),
            };
            got.push(replica.got.clone());
            closed.push(replica.closed.clone());
            router.add_remote(info, Arc::new(replica));
        }
        Cluster {
            router,
            got,
            closed,
        }
    }

    fn work() -> ChatWork {
        ChatWork {
            request_id: "req".into(),
            trace_id: "trace".into(),
            input: PromptInput::Raw("hi".into()),
            params: tessera_engine::SamplingParams::default(),
            clamp_max_tokens: false,
            adapter: Some("/adapters/a".into()),
            tools: Vec::new(),
            tool_choice: Default::default(),
            resume: Vec::new(),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Every event of a stream, until it closes.
    async fn drain(mut d: Dispatched) -> Vec<StreamEvent> {
        let mut all = Vec::new();
        while let Some(e) = tokio::time::timeout(Duration::from_secs(5), d.events.recv())
            .await
            .expect("in time")
        {
            all.push(e);
        }
        all
    }

    fn ids(events: &[StreamEvent]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Token(t) => Some(t.id),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stream_cut_by_a_lost_replica_goes_on_on_another_as_one_stream() {
        let c = cluster(&[(3, End::Lost), (2, End::Finished)]);
        let failover = Failover::new(2);
        let d = failover.dispatch(&c.router, "d", work(), soon()).unwrap();
        assert_eq!(d.lease.replica, "r0");
        let events = drain(d).await;
        let started = events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Started { .. }))
            .count();
        assert_eq!(started, 1, "{events:?}");
        assert!(matches!(events[0], StreamEvent::Started { ref replica, .. } if replica == "r0"));
        assert_eq!(ids(&events), vec![0, 1, 2, 3, 4]);
        assert!(matches!(
            events.last(),
            Some(StreamEvent::Finished {
                completion_tokens: 5,
                ..
            })
        ));
        // The second replica got the same request, and the tokens already sent.
        let moved = c.got[1].lock().unwrap()[0].clone();
        assert_eq!(moved.resume, vec![0, 1, 2]);
        assert_eq!(
            ChatWork {
                resume: Vec::new(),
                ..moved
            },
            work()
        );
        assert_eq!(failover.moves(), vec![("d".to_string(), 1)]);
        // Its lease went with it: nothing counts on either replica now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(c.router.in_flight("r0"), Some(0));
        assert_eq!(c.router.in_flight("r1"), Some(0));
    }

    #[tokio::test]
    async fn unavailable_before_starting_is_rerouted_and_other_errors_are_not() {
        let c = cluster(&[
            (0, End::Error(ServeErrorKind::Unavailable)),
            (2, End::Finished),
        ]);
        let failover = Failover::new(1);
        let events = drain(failover.dispatch(&c.router, "d", work(), soon()).unwrap()).await;
        assert_eq!(ids(&events), vec![0, 1]);
        assert!(matches!(events.last(), Some(StreamEvent::Finished { .. })));
        // An adapter error is the request's own: passed on, not moved.
        let c = cluster(&[(1, End::Error(ServeErrorKind::Adapter)), (2, End::Finished)]);
        let events = drain(failover.dispatch(&c.router, "d", work(), soon()).unwrap()).await;
        assert!(matches!(
            events.last(),
            Some(StreamEvent::Error(ServeError {
                kind: ServeErrorKind::Adapter,
                ..
            }))
        ));
        assert!(c.got[1].lock().unwrap().is_empty());
        assert!(failover.moves().iter().all(|(_, n)| *n == 1));
    }

    #[tokio::test]
    async fn moves_are_bounded_and_with_no_replica_left_the_client_hears_why() {
        let c = cluster(&[(1, End::Lost), (1, End::Lost), (1, End::Lost)]);
        let events = drain(
            Failover::new(1)
                .dispatch(&c.router, "d", work(), soon())
                .unwrap(),
        )
        .await;
        assert_eq!(ids(&events), vec![0, 1]);
        let Some(StreamEvent::Error(e)) = events.last() else {
            panic!("{events:?}")
        };
        assert_eq!(e.kind, ServeErrorKind::Unavailable);
        assert!(e.message.contains("request_retries = 1"), "{e}");
        let asked: usize = c.got.iter().map(|g| g.lock().unwrap().len()).sum();
        assert_eq!(asked, 2, "one move, then the error");

        let c = cluster(&[(2, End::Lost)]);
        let events = drain(
            Failover::new(2)
                .dispatch(&c.router, "d", work(), soon())
                .unwrap(),
        )
        .await;
        let Some(StreamEvent::Error(e)) = events.last() else {
            panic!("{events:?}")
        };
        assert!(e.message.contains("replica r0 was lost"), "{e}");
        assert!(e.message.contains("besides the one lost"), "{e}");

        // Past its deadline a request is not moved.
        let c = cluster(&[(2, End::Lost), (1, End::Finished)]);
        let events = drain(
            Failover::new(2)
                .dispatch(&c.router, "d", work(), Instant::now())
                .unwrap(),
        )
        .await;
        let Some(StreamEvent::Error(e)) = events.last() else {
            panic!("{events:?}")
        };
        assert!(e.message.contains("deadline"), "{e}");
    }

    #[tokio::test]
    async fn without_retries_the_client_reads_the_replica_itself() {
        let c = cluster(&[(2, End::Lost), (1, End::Finished)]);
        let events = drain(
            Failover::new(0)
                .dispatch(&c.router, "d", work(), soon())
                .unwrap(),
        )
        .await;
        // Today's behaviour: the stream just ends (the HTTP side says the replica stopped).
        assert_eq!(ids(&events), vec![0, 1]);
        assert!(matches!(events.last(), Some(StreamEvent::Token(_))));
        assert!(c.got[1].lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_client_gone_cancels_the_replica_stream_through_the_relay() {
        let c = cluster(&[(1, End::Hang)]);
        let mut d = Failover::new(2)
            .dispatch(&c.router, "d", work(), soon())
            .unwrap();
        assert!(matches!(
            d.events.recv().await,
            Some(StreamEvent::Started { .. })
        ));
        assert!(matches!(d.events.recv().await, Some(StreamEvent::Token(_))));
        drop(d);
        for _ in 0..100 {
            if *c.closed[0].lock().unwrap() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the replica's stream was not closed");
    }
}
