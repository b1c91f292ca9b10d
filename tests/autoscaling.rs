//! Replica autoscaling on a real head (actor tree + HTTP) serving the tiny model (the default
//! deployment, autoscaled by `[autoscaling]`) on a CPU node with two inference slots: it starts one replica, a burst of concurrent requests grows it to
//! two (the second serves requests), and once the load is gone it drains the newest and shrinks
//! back to one. No request fails across the scale events.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Head;

fn cluster(head: &Head) -> Value {
    head.get("/cluster").1
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `clients` threads sending chat requests back to back until `stop`; returns (answers by
/// replica, failures).
fn load(
    url: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(Vec<String>, Vec<String>)>> {
    (0..clients)
        .map(|i| {
            let (url, stop) = (url.to_string(), stop.clone());
            std::thread::spawn(move || {
                let (mut served, mut failed) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"prompt": format!("client {i} says hello"), "max_tokens": 200,
                                      "temperature": 0});
                    match Head::agent().post(format!("{url}/chat")).send_json(&body) {
                        Ok(mut r) => {
                            let status = r.status().as_u16();
                            let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
                            if status == 200 {
                                served.push(v["replica"].as_str().unwrap_or("").to_string());
                            } else {
                                failed.push(format!("{status}: {v}"));
                            }
                        }
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (served, failed)
            })
        })
        .collect()
}

#[test]
fn a_burst_adds_a_replica_and_idleness_drains_it_without_failing_a_request() {
    let head = support::start(&[
        "resources.cpu_inference_slots=2",
        "autoscaling.enabled=true",
        "autoscaling.min_replicas=1",
        "autoscaling.target_ongoing_requests=2",
        "autoscaling.upscale_delay_s=0.3",
        "autoscaling.downscale_delay_s=1.0",
    ]);
    let c = cluster(&head);
    assert_eq!(c["replicas"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c["deployments"][0]["autoscaler"]["replicas"], 1, "{c}");
    assert_eq!(c["deployments"][0]["autoscaler"]["max_replicas"], 2, "{c}");

    // A burst: 8 clients back to back, 4x the target per replica.
    let stop = Arc::new(AtomicBool::new(false));
    let burst = load(&head.url, 8, stop.clone());
    wait_for("a second replica", Duration::from_secs(60), || {
        let c = cluster(&head);
        c["deployments"][0]["autoscaler"]["replicas"] == 2
            && c["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["state"] == "running")
                .count()
                == 2
    });
    let c = cluster(&head);
    assert!(
        c["deployments"][0]["autoscaler"]["last_decision"]
            .as_str()
            .unwrap()
            .contains("up to 2 replicas"),
        "{c}"
    );
    // The new replica takes its share of the load.
    let before = Instant::now();
    let second_served = Arc::new(AtomicUsize::new(0));
    wait_for(
        "the second replica to serve",
        Duration::from_secs(30),
        || {
            let m = head.get_text("/metrics").1;
            let served = m
                .lines()
                .find(|l| {
                    l.starts_with("tessera_engine_generated_tokens_total{replica=\"inference-1\"}")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0);
            second_served.store(served as usize, Ordering::Relaxed);
            served > 0.0
        },
    );
    eprintln!(
        "inference-1 generated {} tokens within {:?} of starting",
        second_served.load(Ordering::Relaxed),
        before.elapsed()
    );

    // The load stops: once idle for the delay, the newest replica drains and stops.
    stop.store(true, Ordering::Relaxed);
    let mut served = Vec::new();
    for t in burst {
        let (s, failed) = t.join().unwrap();
        assert!(failed.is_empty(), "requests failed: {failed:?}");
        served.extend(s);
    }
    assert!(served.iter().any(|r| r == "inference-1"), "{served:?}");
    wait_for("the scale-down", Duration::from_secs(30), || {
        let c = cluster(&head);
        c["deployments"][0]["autoscaler"]["replicas"] == 1
            && c["replicas"].as_array().unwrap().len() == 1
    });
    let c = cluster(&head);
    assert_eq!(c["replicas"][0]["name"], "inference-0", "{c}");
    assert_eq!(c["deployments"][0]["autoscaler"]["scale_downs"], 1, "{c}");
    assert!(
        c["deployments"][0]["autoscaler"]["last_decision"]
            .as_str()
            .unwrap()
            .contains("draining inference-1"),
        "{c}"
    );
    let m = head.get_text("/metrics").1;
    assert!(
        m.contains("tessera_autoscaler{deployment=\"model\",figure=\"scale_ups\"} 1"),
        "{m}"
    );
    // Health stays ok: a replica scaled down is stopped, not failed.
    let (code, health) = head.get("/health");
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    // And it still serves.
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "after", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
}
