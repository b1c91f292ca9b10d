//! The cluster port under attack, with real processes on loopback: a stranger's bare connections
//! to a worker, a peer holding the cookie that speaks for another node (and sends garbage) or
//! takes a live worker's name to receive its prompts, a worker whose own model is not the head's
//! (a member, never routed to as the default deployment), mutual
//! TLS (a worker without a certificate from the CA is refused, one silent client blocks no
//! join), and idle connections beyond the cap or past the handshake deadline.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ractor::{ActorRef, BytesConvertable};
use serde_json::{json, Value};
use support::cluster::{serial, Cluster, Proc};

/// Listening TCP sockets of process `pid` (from `/proc`).
fn listening(pid: u32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
                continue;
            }
            let (ip, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            let bytes: Vec<u8> = (0..ip.len() / 2)
                .map(|i| u8::from_str_radix(&ip[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            // /proc prints each 32-bit word in host (little-endian) order.
            let words: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied())
                .collect();
            let ip: std::net::IpAddr = if v6 {
                <[u8; 16]>::try_from(words).unwrap().into()
            } else {
                <[u8; 4]>::try_from(words).unwrap().into()
            };
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

/// Waits `d` while checking `ok` every 100 ms; fails with `what` as soon as it is false.
fn holds_for(d: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        assert!(ok(), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat(c: &Cluster) -> (u16, Value) {
    c.post(
        "/chat",
        &json!({"prompt": "hello", "max_tokens": 4, "temperature": 0}),
    )
}

fn wait_exit(p: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < timeout,
            "the process did not exit; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_strangers_bare_connections_to_a_worker_neither_evict_nor_stop_it() {
    let _serial = serial();
    let c = Cluster::new();
    let _head = c.head(0);
    let mut w = c.worker("worker", &[]);
    c.wait("the worker", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    let ports = listening(w.child.id());
    assert!(!ports.is_empty(), "the worker's node server listens");
    for a in &ports {
        assert_eq!(
            a.ip(),
            std::net::IpAddr::from([127, 0, 0, 1]),
            "the worker listens on cluster.bind only: {ports:?}"
        );
    }
    // Connect and close at once, twice, as a port scanner would.
    for _ in 0..2 {
        for a in &ports {
            drop(TcpStream::connect(a).unwrap());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    holds_for(
        Duration::from_secs(3),
        "the worker stays joined and running",
        || w.child.try_wait().unwrap().is_none() && c.workers().len() == 1,
    );
    assert!(!w.log().contains("lost the head"), "{}", w.log());
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");
}

/// Raw bytes to an actor on the head, as a hostile peer would send them.
struct Raw(Vec<u8>);

impl BytesConvertable for Raw {
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

/// An actor that keeps the frames it receives.
struct Inbox;

impl ractor::Actor for Inbox {
    type Msg = Raw;
    type State = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;
    type Arguments = Self::State;

    async fn pre_start(
        &self,
        _: ActorRef<Raw>,
        frames: Self::State,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        Ok(frames)
    }

    async fn handle(
        &self,
        _: ActorRef<Raw>,
        msg: Raw,
        frames: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        frames.lock().unwrap().push(msg.0);
        Ok(())
    }
}

#[test]
fn a_peer_with_the_cookie_cannot_speak_for_another_node_nor_crash_the_head() {
    let _serial = serial();
    let c = Cluster::new();
    let cookie = "s3cret-cookie";
    let _head = c.head_with(0, &[&format!("cluster.cookie=\"{cookie}\"")]);
    let _w = c.worker("victim", &[&format!("cluster.cookie=\"{cookie}\"")]);
    c.wait("the victim", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    let victim = c.workers()[0].clone();
    let info = c.get("/cluster")["workers"][0]["info"].clone();
    let mut ghost = info.clone();
    ghost["node"] = json!("ghost");

    let stolen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let server = ractor_cluster::NodeServer::new(
            0,
            cookie.into(),
            "rogue".into(),
            "rogue-host".into(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr([127, 0, 0, 1].into());
        let (server, _) = ractor::Actor::spawn(None, server, ()).await.unwrap();
        ractor_cluster::client_connect(&server, format!("127.0.0.1:{}", c.cluster))
            .await
            .unwrap();
        let t0 = Instant::now();
        let head: ActorRef<Raw> = loop {
            if let Some(h) = ractor::pg::get_members(&"tessera.head".to_string())
                .into_iter()
                .next()
            {
                break h.into();
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the head's port");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let frames = [
            // The earlier wire format, where names came from the body.
            json!({"Leaving": {"node": victim}}),
            json!({"SessionClosed": {"peer": victim, "address": "x", "authenticated": true}}),
            json!({"Register": ghost}),
            // Today's, with a made-up or empty key.
            json!({"node": victim, "key": "0123456789abcdef0123456789abcdef", "msg": "Leaving"}),
            json!({"node": victim, "key": "", "msg": "Leaving"}),
            json!({"node": "ghost", "key": "", "msg": {"Register": ghost}}),
            json!({"node": victim, "key": "", "msg": {"JobFinished": {"trainer": "trainer-0",
                "job_id": "j", "result": {"Stopped": {"step": 0}}}}}),
        ];
        for f in frames {
            head.cast(Raw(serde_json::to_vec(&f).unwrap())).unwrap();
        }
        // Not JSON at all.
        head.cast(Raw(b"\x00\xffnot a frame".to_vec())).unwrap();
        // A peer that takes the victim's own name, puts an inbox in its agent's group and says
        // Hello: the name stays with the victim's session, and nothing reaches the inbox.
        let thief = ractor_cluster::NodeServer::new(
            0,
            cookie.into(),
            victim.clone(),
            "thief-host".into(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr([127, 0, 0, 1].into());
        let (thief, _) = ractor::Actor::spawn(None, thief, ()).await.unwrap();
        ractor_cluster::client_connect(&thief, format!("127.0.0.1:{}", c.cluster))
            .await
            .unwrap();
        let (inbox, _) = ractor::Actor::spawn(None, Inbox, stolen.clone())
            .await
            .unwrap();
        ractor::pg::join(format!("tessera.worker.{victim}"), vec![inbox.get_cell()]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let hello = json!({"node": victim, "key": "", "msg": "Hello"});
        head.cast(Raw(serde_json::to_vec(&hello).unwrap())).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, r) = chat(&c);
        assert_eq!(status, 200, "{r}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        inbox.stop(None);
        thief.stop(None);
        server.stop(None);
    });
    let stolen = stolen.lock().unwrap();
    assert!(
        stolen.is_empty(),
        "frames for the victim reached the thief: {:?}",
        stolen
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect::<Vec<_>>()
    );
    holds_for(
        Duration::from_secs(3),
        "the victim stays, and no ghost joins",
        || c.workers() == vec![victim.clone()],
    );
    // The head's cluster actor is alive: remote streams flow, and a new worker still joins.
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");
    assert!(r["replica"].as_str().unwrap().starts_with(&victim), "{r}");
    // It joins with a model of its own, not the head's: it is a member, but its replica is not
    // taken for the default deployment's (the fingerprints differ), so no request goes there.
    let other = support::tiny::write_model(&c.dir.path().join("other-model"), 99);
    let _w2 = c.worker_with(
        "second",
        Some(&other),
        &[&format!("cluster.cookie=\"{cookie}\"")],
    );
    c.wait("a second worker", Duration::from_secs(60), || {
        c.workers().len() == 2
    });
    c.wait("its replica refused", Duration::from_secs(60), || {
        std::fs::read_to_string(c.dir.path().join("head.log"))
            .unwrap()
            .contains("not the default deployment's model")
    });
    let routed: Vec<String> = c.get("/cluster")["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert!(routed.iter().all(|r| r.starts_with(&victim)), "{routed:?}");
    for _ in 0..4 {
        let (status, r) = chat(&c);
        assert_eq!(status, 200, "{r}");
        assert!(r["replica"].as_str().unwrap().starts_with(&victim), "{r}");
    }
}

/// A CA, and certificates it signs for `localhost` / 127.0.0.1 (server and client use).
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            ca_pem,
        }
    }

    /// Writes `<name>.crt`, `<name>.key` and `ca.crt` under `dir`; returns the TLS settings.
    fn node(&self, dir: &Path, name: &str) -> Vec<String> {
        std::fs::create_dir_all(dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k, ca) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
            dir.join("ca.crt"),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&ca, &self.ca_pem).unwrap();
        vec![
            format!("cluster.tls_cert=\"{}\"", c.display()),
            format!("cluster.tls_key=\"{}\"", k.display()),
            format!("cluster.tls_ca=\"{}\"", ca.display()),
        ]
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn mutual_tls_admits_only_workers_with_a_certificate_from_the_ca() {
    let _serial = serial();
    let c = Cluster::new();
    let d = c.dir.path();
    let pki = Pki::new("tessera test CA");
    let head_tls = pki.node(&d.join("pki/head"), "head");
    let mut head_set = head_tls.clone();
    head_set.push("cluster.handshake_timeout_secs=30".into());
    let _head = c.head_with(0, &refs(&head_set));
    c.wait("the head", Duration::from_secs(60), || {
        c.get("/health") != Value::Null
    });
    // Silent clients hold no join up: the TLS handshake runs per connection.
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", c.cluster)).unwrap())
        .collect();
    let mut good = pki.node(&d.join("pki/good"), "worker");
    // Its name starts with a name its certificate bears (`localhost`, not the machine's name).
    good.push("cluster.node_name=\"localhost\"".into());
    let _w = c.worker("good", &refs(&good));
    c.wait(
        "the worker with a certificate",
        Duration::from_secs(60),
        || c.workers().len() == 1,
    );
    assert!(
        c.workers()[0].starts_with("localhost-"),
        "{:?}",
        c.workers()
    );
    for s in &silent {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the silent clients were still connected while the worker joined"
        );
    }
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");

    // A certificate from another CA (the worker still trusts the head's CA).
    let other = Pki::new("someone else's CA");
    let mut bad = other.node(&d.join("pki/bad"), "worker");
    bad[2] = format!("cluster.tls_ca=\"{}\"", d.join("pki/good/ca.crt").display());
    bad.push("cluster.node_name=\"localhost\"".into());
    let mut intruder = c.worker("intruder", &refs(&bad));
    // No TLS at all.
    let mut plain = c.worker("plain", &[]);
    for p in [&mut intruder, &mut plain] {
        let status = wait_exit(p, Duration::from_secs(60));
        assert!(!status.success(), "{}", p.log());
        assert!(p.log().contains("cluster.tls_ca"), "{}", p.log());
    }
    assert_eq!(c.workers().len(), 1, "neither joined");
    let head_log = std::fs::read_to_string(d.join("head.log")).unwrap();
    assert!(head_log.contains("TLS handshake failed"), "{head_log}");

    // A trusted certificate, a name it does not bear: the worker says so before it dials ...
    let mut misnamed = c.worker(
        "misnamed",
        &refs(&[good.clone(), vec!["cluster.node_name=\"gpu-7\"".into()]].concat()),
    );
    let status = wait_exit(&mut misnamed, Duration::from_secs(60));
    assert!(!status.success(), "{}", misnamed.log());
    assert!(
        misnamed.log().contains("not valid for `gpu-7`"),
        "{}",
        misnamed.log()
    );
    // ... and the head refuses one that claims it anyway (its own check skipped by a test hook).
    let claims = [good, vec!["cluster.node_name=\"gpu-7\"".into()]].concat();
    let _thief = c.worker_env(
        "claims-a-name",
        &refs(&claims),
        &[
            ("TESSERA_TEST_HOOKS", "1"),
            ("TESSERA_TEST_SKIP_NAME_CHECK", "1"),
        ],
    );
    c.wait(
        "the head refusing the name",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(d.join("head.log"))
                .unwrap()
                .contains("claims a name its certificate does not bear")
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.workers().len(), 1, "{:?}", c.workers());
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");
}

/// Whether the server closes `s` within `within` (EOF or reset).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

#[test]
fn idle_connections_beyond_the_cap_are_refused_and_the_rest_cut_at_the_handshake_deadline() {
    let _serial = serial();
    let c = Cluster::new();
    let _head = c.head_with(
        0,
        &[
            "cluster.max_connections=3",
            "cluster.handshake_timeout_secs=3",
        ],
    );
    c.wait("the head", Duration::from_secs(60), || {
        c.get("/health") != Value::Null
    });
    let t0 = Instant::now();
    let mut socks: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(("127.0.0.1", c.cluster)).unwrap())
        .collect();
    // Beyond the cap: closed at once (well before the handshake deadline).
    for s in &mut socks[3..] {
        assert!(
            closed_within(s, Duration::from_millis(2500)),
            "over the cap"
        );
    }
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    // Within the cap: open until the deadline, then cut.
    for s in &mut socks[..3] {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "idle past the deadline"
        );
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(2500),
        "cut at the deadline, not before: {:?}",
        t0.elapsed()
    );
    // The slots are free again: a worker joins.
    let _w = c.worker("worker", &[]);
    c.wait("the worker", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
}
