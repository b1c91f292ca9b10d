//! The router: the table of inference replicas (kept current by the supervisor across restarts)
//! and the policy that picks one per request — least loaded, preferring a replica that already
//! holds the request's adapter unless it is busier than the least-loaded one by more than a slack
//! (adapter affinity, as Ray Serve multiplexing and LoRAX do). It is also admission control: a
//! replica holding `max_in_flight` requests (queued in its mailbox, being tokenized, waiting or
//! running) takes no more, and when every replica is full the request is refused (503 +
//! Retry-After) before any work is sent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use std::future::Future;
use std::pin::Pin;

use tessera_engine::scheduler::SchedulerStats;
use tokio::sync::mpsc;

use crate::health::ActorState;
use crate::messages::{ChatWork, ReplicaInfo, ServeError, ServeErrorKind, StreamEvent};

/// Events buffered per stream before the replica waits for the client (flow control).
pub const STREAM_BUFFER: usize = 64;

/// What a replica loaded, for its router entry.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub model: String,
    pub dtype: String,
    pub weights: String,
    pub fingerprint: Option<String>,
}

/// A replica's scheduler figures, when it answers in time.
pub type StatsFuture = Pin<Box<dyn Future<Output = Option<SchedulerStats>> + Send>>;

/// A replica as the router reaches it: an inference actor of this node
/// ([`crate::inference::LocalReplica`]) or a replica of another node through the cluster
/// (`cluster/head.rs`). The router knows nothing else of either.
pub trait Replica: Send + Sync {
    /// Hands `work` to the replica: its events arrive on `sink`, and `lease` is held until the
    /// generation ends there. When the replica is gone: why, and the work back when it can be
    /// sent elsewhere.
    fn generate(
        &self,
        work: ChatWork,
        sink: mpsc::Sender<StreamEvent>,
        lease: Lease,
    ) -> Result<(), (Option<Box<ChatWork>>, String)>;

    /// Its scheduler's figures (`None`: it has none to give, as a replica of another node).
    fn stats(&self) -> Option<StatsFuture> {
        None
    }

    /// Test hook: makes it fail (`engine`: its engine first, so its streams are lost); false
    /// when it cannot.
    fn crash(&self, _engine: bool) -> bool {
        false
    }
}

/// One replica as the router knows it.
struct Slot {
    info: ReplicaInfo,
    /// Which start of the replica this entry is: an actor of an older start (stopped late, or
    /// finishing a load after it was scaled down) cannot touch the entry of a newer one.
    generation: u64,
    actor: Option<Arc<dyn Replica>>,
    in_flight: Arc<InFlight>,
    /// Most recently used last; bounded by `adapter_memory`.
    adapters: Vec<PathBuf>,
    /// Takes no new requests (it is being scaled down).
    draining: bool,
}

/// What the policy sees of a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub in_flight: usize,
    pub has_adapter: bool,
}

/// Picks the index of the replica to use, or `None` when there is none.
///
/// Least loaded wins; a replica holding the adapter wins instead when its load is within `slack`
/// of the least loaded. Ties go to the lowest index after `rotate` (spreads equal load).
pub fn pick(candidates: &[Candidate], slack: usize, rotate: usize) -> Option<usize> {
    let n = candidates.len();
    let order = (0..n).map(|i| (i + rotate) % n);
    let least = order.clone().min_by_key(|&i| candidates[i].in_flight)?;
    let min_load = candidates[least].in_flight;
    let holder = order
        .filter(|&i| candidates[i].has_adapter)
        .min_by_key(|&i| candidates[i].in_flight);
    match holder {
        Some(h) if candidates[h].in_flight <= min_load + slack => Some(h),
        _ => Some(least),
    }
}

/// A replica's in-flight count, and a wake-up for whoever waits for it to drain.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    fn load(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Counts a request as in flight on its replica until every clone is dropped: the client's (the
/// HTTP side) and the replica's (held from its mailbox until the generation ends), so a request
/// whose client hung up still counts while the replica works on it.
#[derive(Clone)]
pub struct Lease {
    /// `None`: counts nothing (the relay of [`crate::failover`] holds the counting leases).
    _count: Option<Arc<Counted>>,
    pub replica: String,
}

impl Lease {
    /// A lease that only names `replica`.
    pub fn detached(replica: String) -> Self {
        Self {
            _count: None,
            replica,
        }
    }
}

struct Counted(Arc<InFlight>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A dispatched request: its events, and the lease that counts it as load.
pub struct Dispatched {
    pub events: mpsc::Receiver<StreamEvent>,
    pub lease: Lease,
}

#[derive(Clone)]
pub struct Router {
    slots: Arc<RwLock<Vec<Slot>>>,
    rotate: Arc<AtomicUsize>,
    generations: Arc<AtomicU64>,
    /// How many more in-flight requests a replica holding the adapter may have than the least
    /// loaded one and still be preferred.
    pub affinity_slack: usize,
    /// Adapters remembered per replica (its cache size).
    pub adapter_memory: usize,
    /// Requests one replica may hold; beyond it the router refuses (admission control).
    pub max_in_flight: usize,
}

impl Router {
    pub fn new(affinity_slack: usize, adapter_memory: usize, max_in_flight: usize) -> Self {
        Self {
            slots: Arc::default(),
            rotate: Arc::default(),
            generations: Arc::default(),
            affinity_slack,
            adapter_memory: adapter_memory.max(1),
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// Adds a replica (not yet serving) to the table; returns the generation of this start, which
    /// its actor gives when it reports itself serving ([`Router::set_serving`]).
    pub fn add_replica(&self, info: ReplicaInfo) -> u64 {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let mut slots = self.slots.write().expect("router");
        slots.retain(|s| s.info.name != info.name);
        slots.push(Slot {
            info,
            generation,
            actor: None,
            in_flight: Arc::default(),
            adapters: Vec::new(),
            draining: false,
        });
        generation
    }

    /// Waits until replica `name` holds no request (or is gone from the table). Woken by the last
    /// lease dropped, not by polling.
    pub async fn drained(&self, name: &str) {
        loop {
            let Some(in_flight) = self
                .slots
                .read()
                .expect("router")
                .iter()
                .find(|s| s.info.name == name)
                .map(|s| s.in_flight.clone())
            else {
                return;
            };
            let idle = in_flight.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a lease dropped in between still wakes us.
            idle.as_mut().enable();
            if in_flight.load() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Stops sending new requests to replica `name` (those it holds finish).
    pub fn set_draining(&self, name: &str) {
        let mut slots = self.slots.write().expect("router");
        if let Some(slot) = slots.iter_mut().find(|s| s.info.name == name) {
            slot.draining = true;
            slot.info.state = ActorState::Draining;
        }
    }

    /// Requests replica `name` holds now.
    pub fn in_flight(&self, name: &str) -> Option<usize> {
        self.slots
            .read()
            .expect("router")
            .iter()
            .find(|s| s.info.name == name)
            .map(|s| s.in_flight.load())
    }

    /// Forgets replica `name`.
    pub fn remove_replica(&self, name: &str) {
        self.slots
            .write()
            .expect("router")
            .retain(|s| s.info.name != name);
    }

    /// The local replica of start `generation` is up (`Some`: loaded and serving) or down
    /// (`None`), with its state for `/cluster`. Ignored when the entry belongs to a newer start.
    pub fn set_actor(
        &self,
        name: &str,
        generation: u64,
        actor: Option<Arc<dyn Replica>>,
        state: ActorState,
    ) {
        self.set_ref_where(name, Some(generation), actor, state)
    }

    fn set_ref_where(
        &self,
        name: &str,
        generation: Option<u64>,
        actor: Option<Arc<dyn Replica>>,
        state: ActorState,
    ) {
        let mut slots = self.slots.write().expect("router");
        if let Some(slot) = slots
            .iter_mut()
            .find(|s| s.info.name == name && generation.is_none_or(|g| g == s.generation))
        {
            if actor.is_none() {
                // A restarted replica has an empty adapter cache.
                slot.adapters.clear();
            }
            slot.actor = actor;
            if !slot.draining {
                slot.info.state = state;
            }
        }
    }

    /// Adds (or replaces) a serving replica of another node.
    pub fn add_remote(&self, info: ReplicaInfo, remote: Arc<dyn Replica>) {
        let name = info.name.clone();
        self.add_replica(info);
        self.set_ref_where(&name, None, Some(remote), ActorState::Running);
    }

    /// Forgets every replica of `node` (it left or was evicted).
    pub fn remove_node(&self, node: &str) {
        self.slots
            .write()
            .expect("router")
            .retain(|s| s.info.node != node);
    }

    /// Records what replica `name` (start `generation`) loaded: the model's name, its dtype (with
    /// how it was chosen), how its weights are held, and their fingerprint.
    pub fn set_model(&self, name: &str, generation: u64, loaded: &Loaded) {
        let mut slots = self.slots.write().expect("router");
        if let Some(slot) = slots
            .iter_mut()
            .find(|s| s.info.name == name && s.generation == generation)
        {
            slot.info.model = Some(loaded.model.clone());
            slot.info.dtype = Some(loaded.dtype.clone());
            slot.info.weights = Some(loaded.weights.clone());
            slot.info.fingerprint = loaded.fingerprint.clone();
        }
    }

    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        self.slots
            .read()
            .expect("router")
            .iter()
            .map(|s| ReplicaInfo {
                in_flight: s.in_flight.load(),
                adapters: s.adapters.clone(),
                ..s.info.clone()
            })
            .collect()
    }

    /// A serving replica.
    pub fn replica(&self, name: &str) -> Option<Arc<dyn Replica>> {
        self.slots
            .read()
            .expect("router")
            .iter()
            .find(|s| s.info.name == name)
            .and_then(|s| s.actor.clone())
    }

    /// The served base model's name, once a replica has loaded it.
    pub fn model_name(&self) -> Option<String> {
        self.slots
            .read()
            .expect("router")
            .iter()
            .find_map(|s| s.info.model.clone())
    }

    /// True when at least one replica is serving.
    pub fn ready(&self) -> bool {
        self.slots
            .read()
            .expect("router")
            .iter()
            .any(|s| s.actor.is_some())
    }

    /// Sends `work` to the chosen replica of `deployment` (any replica with `None`); its events
    /// arrive on the returned receiver.
    pub fn dispatch(
        &self,
        deployment: Option<&str>,
        work: ChatWork,
    ) -> Result<Dispatched, ServeError> {
        let of = deployment
            .map(|d| format!(" of deployment `{d}`"))
            .unwrap_or_default();
        self.dispatch_where(
            |r| deployment.is_none_or(|d| r.deployment == d),
            &of,
            work,
            Vec::new(),
            true,
        )
    }

    /// Sends `work`, which a lost replica was serving, to another replica of `deployment`: none
    /// of `lost`, and past `max_in_flight` if need be (the request was admitted already; the
    /// engine's waiting queue still bounds it).
    pub fn dispatch_move(
        &self,
        deployment: &str,
        work: ChatWork,
        lost: &[String],
    ) -> Result<Dispatched, ServeError> {
        self.dispatch_where(
            |r| r.deployment == deployment,
            &format!(" of deployment `{deployment}` besides the one lost"),
            work,
            lost.to_vec(),
            false,
        )
    }

    /// Sends `work` to replica `name` (a worker does what its head chose).
    pub fn dispatch_named(&self, name: &str, work: ChatWork) -> Result<Dispatched, ServeError> {
        self.dispatch_where(
            |r| r.name == name,
            &format!(" `{name}`"),
            work,
            Vec::new(),
            true,
        )
    }

    /// Sends `work` to the chosen one of the replicas `eligible` accepts (`what` names them in
    /// errors), none of `tried`; `admit`: refuse it when every replica is full.
    fn dispatch_where(
        &self,
        eligible: impl Fn(&ReplicaInfo) -> bool,
        what: &str,
        work: ChatWork,
        mut tried: Vec<String>,
        admit: bool,
    ) -> Result<Dispatched, ServeError> {
        let mut work = Some(work);
        loop {
            let (actor, in_flight, name) = {
                let mut slots = self.slots.write().expect("router");
                let ours: Vec<usize> = (0..slots.len())
                    .filter(|&i| eligible(&slots[i].info))
                    .collect();
                let up: Vec<usize> = ours
                    .iter()
                    .copied()
                    .filter(|&i| {
                        slots[i].actor.is_some()
                            && !slots[i].draining
                            && !tried.contains(&slots[i].info.name)
                    })
                    .collect();
                let live: Vec<usize> = up
                    .iter()
                    .copied()
                    .filter(|&i| !admit || slots[i].in_flight.load() < self.max_in_flight)
                    .collect();
                if live.is_empty() && !up.is_empty() {
                    return Err(ServeError::new(
                        ServeErrorKind::Overloaded,
                        format!(
                            "every replica already holds {} requests (batching.max_in_flight); retry shortly",
                            self.max_in_flight
                        ),
                    ));
                }
                let adapter = work.as_ref().and_then(|w| w.adapter.as_deref());
                let candidates: Vec<Candidate> = live
                    .iter()
                    .map(|&i| Candidate {
                        in_flight: slots[i].in_flight.load(),
                        has_adapter: adapter
                            .is_some_and(|a| slots[i].adapters.iter().any(|x| x == a)),
                    })
                    .collect();
                let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
                let Some(choice) = pick(&candidates, self.affinity_slack, rotate) else {
                    return Err(ServeError::unavailable(if ours.is_empty() {
                        format!("this cluster has no inference replica{what}")
                    } else {
                        format!(
                            "no inference replica{what} is ready (starting or restarting); retry shortly"
                        )
                    }));
                };
                let slot = &mut slots[live[choice]];
                if let Some(a) = adapter {
                    remember(&mut slot.adapters, a, self.adapter_memory);
                }
                slot.in_flight.count.fetch_add(1, Ordering::AcqRel);
                (
                    slot.actor.clone().expect("live"),
                    slot.in_flight.clone(),
                    slot.info.name.clone(),
                )
            };
            let lease = Lease {
                _count: Some(Arc::new(Counted(in_flight))),
                replica: name.clone(),
            };
            let (sink, events) = mpsc::channel(STREAM_BUFFER);
            let w = work.take().expect("work");
            match actor.generate(w, sink, lease.clone()) {
                Ok(()) => return Ok(Dispatched { events, lease }),
                Err((Some(w), why)) => {
                    // The replica died between the table update and now: try another.
                    tracing::warn!(replica = %name, %why, "replica unreachable; trying another");
                    work = Some(*w);
                    tried.push(name);
                }
                Err((None, why)) => {
                    return Err(ServeError::unavailable(format!("replica {name}: {why}")))
                }
            }
        }
    }
}

fn remember(list: &mut Vec<PathBuf>, adapter: &Path, cap: usize) {
    list.retain(|a| a != adapter);
    list.push(adapter.to_path_buf());
    if list.len() > cap {
        list.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(in_flight: usize, has_adapter: bool) -> Candidate {
        Candidate {
            in_flight,
            has_adapter,
        }
    }

    #[test]
    fn least_loaded_wins_without_an_adapter() {
        assert_eq!(
            pick(&[c(3, false), c(1, false), c(2, false)], 4, 0),
            Some(1)
        );
        assert_eq!(pick(&[], 4, 0), None);
    }

    #[test]
    fn the_adapter_holder_wins_within_the_slack() {
        assert_eq!(pick(&[c(0, false), c(3, true)], 4, 0), Some(1));
        assert_eq!(pick(&[c(0, false), c(5, true)], 4, 0), Some(0));
    }

    #[test]
    fn equal_load_is_spread_by_rotation() {
        let cs = [c(0, false), c(0, false), c(0, false)];
        let picks: Vec<_> = (0..3).map(|r| pick(&cs, 0, r).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2]);
    }

    struct Accepting;

    impl Replica for Accepting {
        fn generate(
            &self,
            _work: ChatWork,
            _sink: mpsc::Sender<StreamEvent>,
            _lease: Lease,
        ) -> Result<(), (Option<Box<ChatWork>>, String)> {
            Ok(())
        }
    }

    fn work() -> ChatWork {
        ChatWork {
            request_id: "x".into(),
            trace_id: String::new(),
            input: crate::messages::PromptInput::Raw("hi".into()),
            params: tessera_engine::SamplingParams::default(),
            clamp_max_tokens: false,
            adapter: None,
            tools: Vec::new(),
            tool_choice: Default::default(),
            resume: Vec::new(),
        }
    }

    #[test]
    fn admission_refuses_beyond_max_in_flight_until_every_lease_is_dropped() {
        let router = Router::new(4, 4, 2);
        router.add_remote(ReplicaInfo::for_test("r0"), Arc::new(Accepting));
        let work = work();
        let other = router.dispatch(Some("e"), work.clone()).err().unwrap();
        assert_eq!(other.kind, ServeErrorKind::Unavailable);
        assert!(other.message.contains("deployment `e`"), "{other}");
        let first = router.dispatch(Some("d"), work.clone()).unwrap();
        let _second = router.dispatch(None, work.clone()).unwrap();
        assert!(router.dispatch_named("r1", work.clone()).is_err());
        let refused = router.dispatch_named("r0", work.clone()).err().unwrap();
        assert_eq!(refused.kind, ServeErrorKind::Overloaded);
        assert!(refused.message.contains("max_in_flight"), "{refused}");
        // The replica's clone of the lease keeps counting after the client's is gone.
        let replica_side = first.lease.clone();
        drop(first);
        assert!(router.dispatch(None, work.clone()).is_err());
        drop(replica_side);
        assert!(router.dispatch(Some("d"), work).is_ok());
    }

    #[tokio::test]
    async fn a_drain_is_woken_by_the_last_lease_dropped() {
        let router = Router::new(4, 4, 4);
        let mut info = ReplicaInfo::for_test("r0");
        info.deployment = "d".into();
        router.add_remote(info, Arc::new(Accepting));
        let a = router.dispatch(None, work()).unwrap();
        let b = router.dispatch(None, work()).unwrap();
        let replica_side = b.lease.clone();
        let waiting = {
            let router = router.clone();
            tokio::spawn(async move { router.drained("r0").await })
        };
        drop(a);
        drop(b);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a lease is still held");
        drop(replica_side);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken when the last lease went")
            .unwrap();
        // A replica gone from the table is drained.
        tokio::time::timeout(std::time::Duration::from_secs(1), router.drained("nobody"))
            .await
            .unwrap();
    }

    #[test]
    fn an_older_start_cannot_touch_a_newer_replica_on_the_same_slot() {
        let router = Router::new(4, 4, 4);
        let old = router.add_replica(ReplicaInfo::for_test("r0"));
        let new = router.add_replica(ReplicaInfo::for_test("r0"));
        assert_ne!(old, new);
        let loaded = |model: &str| Loaded {
            model: model.into(),
            ..Default::default()
        };
        router.set_model("r0", old, &loaded("stale"));
        assert_eq!(router.replicas()[0].model, None);
        router.set_model("r0", new, &loaded("tiny"));
        assert_eq!(router.replicas()[0].model.as_deref(), Some("tiny"));
        router.set_actor("r0", old, None, ActorState::Failed);
        assert_eq!(router.replicas()[0].state, ActorState::Starting);
        router.set_actor("r0", new, None, ActorState::Restarting);
        assert_eq!(router.replicas()[0].state, ActorState::Restarting);
    }

    #[test]
    fn remembered_adapters_are_bounded_most_recent_last() {
        let mut list = Vec::new();
        for a in ["a", "b", "a", "c"] {
            remember(&mut list, Path::new(a), 2);
        }
        assert_eq!(list, vec![PathBuf::from("a"), PathBuf::from("c")]);
    }
}
