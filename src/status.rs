//! `tessera status` (like `ray status`): a running head's cluster in terminal tables: health,
//! nodes (host, cores, memory, GPUs, replicas and trainers, last heartbeat), replicas (node,
//! deployment, devices, state, dtype, in flight, adapters), deployments (state, replicas, model,
//! why pending or failed) with their autoscalers, and jobs by state. Reads `/health` and `/cluster`.

use std::io::Write;

use serde_json::Value;

use crate::cli::StatusArgs;
use crate::client::{age, json_body, now, text, write_table, Client};
use crate::config::Config;

pub fn run(args: StatusArgs, config: &Config) -> anyhow::Result<()> {
    let client = Client::new(&args.conn, config);
    let cluster = json_body(client.get("/cluster")?)?;
    // `/health` answers 503 once an actor failed: still a status to show.
    let health = client
        .get("/health")
        .ok()
        .and_then(|r| json_body(r).ok())
        .unwrap_or(Value::Null);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", render(&cluster, &health, now()))?;
    Ok(())
}

/// The whole report, from `/cluster` and `/health` bodies, at time `now` (seconds since epoch).
pub fn render(cluster: &Value, health: &Value, now: f64) -> String {
    let mut out: Vec<u8> = Vec::new();
    let health_line = match health["status"].as_str() {
        Some(status) => {
            let down: Vec<String> = list(&health["actors"])
                .iter()
                .filter(|a| a["state"] != "running")
                .map(|a| format!("{} {}", text(&a["name"]), text(&a["state"])))
                .collect();
            if down.is_empty() {
                format!("health: {status}")
            } else {
                format!("health: {status} ({})", down.join(", "))
            }
        }
        None => "health: unknown (/health did not answer)".into(),
    };
    let _ = writeln!(out, "{health_line}");
    if let Some(port) = cluster["cluster_port"].as_u64() {
        let _ = writeln!(
            out,
            "cluster port: {port} (tessera worker --join HOST:{port})"
        );
    }

    let _ = writeln!(out, "\nNodes");
    let mut nodes: Vec<[String; 9]> = Vec::new();
    for n in list(&cluster["nodes"]) {
        let trainers = list(&n["trainers"]).len();
        nodes.push(node_row(
            &n["name"],
            "head",
            &n["inventory"],
            &n["placement"],
            &n["tags"],
            trainers,
            "-".into(),
        ));
    }
    for w in list(&cluster["workers"]) {
        let info = &w["info"];
        let heartbeat = w["last_heartbeat"]
            .as_f64()
            .map(|t| age(now - t))
            .unwrap_or("-".into());
        nodes.push(node_row(
            &info["node"],
            "worker",
            &info["inventory"],
            &info["placement"],
            &info["tags"],
            list(&info["trainers"]).len(),
            heartbeat,
        ));
    }
    let _ = write_table(
        &mut out,
        &[
            "NODE",
            "ROLE",
            "HOST",
            "CPUS",
            "MEMORY FREE/TOTAL",
            "GPUS",
            "REPLICAS/TRAINERS",
            "HEARTBEAT",
            "TAGS",
        ],
        &nodes,
    );

    let _ = writeln!(out, "\nReplicas");
    let replicas: Vec<[String; 8]> = list(&cluster["replicas"])
        .iter()
        .map(|r| {
            let devices: Vec<String> = list(&r["devices"]).iter().map(text).collect();
            let adapters: Vec<String> = list(&r["adapters"])
                .iter()
                .map(|a| {
                    let path = text(a);
                    path.rsplit('/').next().unwrap_or(&path).to_string()
                })
                .collect();
            [
                text(&r["name"]),
                text(&r["deployment"]),
                text(&r["node"]),
                devices.join(","),
                text(&r["state"]),
                text(&r["dtype"]),
                r["in_flight"].as_u64().unwrap_or(0).to_string(),
                if adapters.is_empty() {
                    "-".into()
                } else {
                    adapters.join(",")
                },
            ]
        })
        .collect();
    if replicas.is_empty() {
        let _ = writeln!(out, "(none)");
    } else {
        let _ = write_table(
            &mut out,
            &[
                "NAME",
                "DEPLOYMENT",
                "NODE",
                "DEVICES",
                "STATE",
                "DTYPE",
                "IN FLIGHT",
                "ADAPTERS",
            ],
            &replicas,
        );
    }

    let _ = writeln!(out, "\nDeployments");
    let deployments: Vec<[String; 5]> = list(&cluster["deployments"])
        .iter()
        .map(|d| {
            let path = text(&d["spec"]["path"]);
            let [name, state, replicas] = crate::models::cells(d);
            [
                name,
                state,
                replicas,
                path.rsplit('/').next().unwrap_or(&path).to_string(),
                d["reason"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    if deployments.is_empty() {
        let _ = writeln!(out, "(none)");
    } else {
        let _ = write_table(
            &mut out,
            &["NAME", "STATE", "REPLICAS", "MODEL", "REASON"],
            &deployments,
        );
    }
    for d in list(&cluster["deployments"]) {
        let a = &d["autoscaler"];
        if a.is_object() {
            let _ = writeln!(
                out,
                "autoscaler {}: {} of {}..{} replicas, {} ongoing requests, desired {}{}",
                text(&d["name"]),
                a["replicas"],
                a["min_replicas"],
                a["max_replicas"],
                a["ongoing"],
                a["desired"],
                a["last_decision"]
                    .as_str()
                    .map(|d| format!("; last: {d}"))
                    .unwrap_or_default()
            );
        }
    }

    let jobs = &cluster["jobs"];
    let counts: Vec<String> = list(&jobs["counts"])
        .iter()
        .filter_map(|c| Some(format!("{} {}", c[1].as_u64()?, c[0].as_str()?)))
        .collect();
    let _ = writeln!(out, "\nJobs");
    if counts.is_empty() {
        let _ = writeln!(out, "(the job manager did not answer)");
    } else {
        let _ = writeln!(out, "{}", counts.join(", "));
        let running = list(&jobs["running"]);
        for r in &running {
            let _ = writeln!(out, "  {} on {}", text(&r[1]), text(&r[0]));
        }
        if let Some(t) = jobs["training_tokens_per_s"].as_f64().filter(|t| *t > 0.0) {
            let _ = writeln!(out, "training: {t:.0} tokens/s");
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn gib(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.1}", b as f64 / (1u64 << 30) as f64))
        .unwrap_or("?".into())
}

fn node_row(
    name: &Value,
    role: &str,
    inventory: &Value,
    placement: &Value,
    tags: &Value,
    trainers: usize,
    heartbeat: String,
) -> [String; 9] {
    let host = &inventory["host"];
    let gpus = list(&inventory["gpus"]);
    let gpus = if gpus.is_empty() {
        "-".to_string()
    } else {
        gpus.iter()
            .map(|g| {
                format!(
                    "{} ({}/{} GiB)",
                    g["name"].as_str().unwrap_or("cuda"),
                    gib(g["memory_free_bytes"].as_u64()),
                    gib(g["memory_total_bytes"].as_u64())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    [
        text(name),
        role.into(),
        text(&host["hostname"]),
        host["cpu_cores"].as_u64().unwrap_or(0).to_string(),
        format!(
            "{}/{} GiB",
            gib(host["memory_available_bytes"].as_u64()),
            gib(host["memory_total_bytes"].as_u64())
        ),
        gpus,
        format!("{}/{trainers}", list(&placement["replicas"]).len()),
        heartbeat,
        match tags.as_object() {
            Some(t) if !t.is_empty() => t
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(","),
            _ => "-".into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_report_shows_nodes_replicas_and_jobs() {
        let cluster = json!({
            "cluster_port": 7946,
            "nodes": [{"name": "head", "inventory": {"host": {"hostname": "h1", "cpu_cores": 2,
                "memory_total_bytes": 8u64 << 30, "memory_available_bytes": 6u64 << 30}, "gpus": []},
                "placement": {"replicas": [{}], "trainers": [{}]}, "trainers": [{"name": "trainer-0"}]}],
            "workers": [{"info": {"node": "w-1-abc", "inventory": {"host": {"hostname": "h2",
                "cpu_cores": 16}, "gpus": [{"name": "H200", "memory_total_bytes": 140u64 << 30,
                "memory_free_bytes": 100u64 << 30}]}, "placement": {"replicas": [{}, {}]},
                "trainers": [["trainer-0", "cuda:0"]], "tags": {"zone": "b"}}, "last_heartbeat": 995.0}],
            "replicas": [{"name": "inference-0", "node": "head", "devices": ["cpu"],
                "state": "running", "dtype": "float32 (auto)", "in_flight": 3,
                "adapters": ["/a/b/my-adapter"]}],
            "deployments": [{"name": "smol", "default": true, "state": "ready",
                "spec": {"path": "/m/smol.gguf"}, "replicas": ["inference-0"], "target_replicas": 1,
                "autoscaler": {"replicas": 1, "min_replicas": 1, "max_replicas": 2, "ongoing": 0,
                "desired": 1, "last_decision": "down to 1 replicas (0 ongoing requests, target 2 per replica): draining inference-1 (0 in flight)"}},
                {"name": "tiny", "default": false, "state": "pending", "spec": {"path": "/m/tiny"},
                "replicas": [], "target_replicas": 1, "reason": "0 of 1 replicas placed: no free inference slot"}],
            "jobs": {"counts": [["queued", 1], ["running", 1], ["succeeded", 4]],
                "running": [["trainer-0", "ft-123"]], "training_tokens_per_s": 250.0}
        });
        let health = json!({"status": "degraded", "actors": [
            {"name": "inference-0", "state": "running"}, {"name": "trainer-0", "state": "restarting"}]});
        let report = render(&cluster, &health, 1000.0);
        assert!(
            report.contains("health: degraded (trainer-0 restarting)"),
            "{report}"
        );
        assert!(
            report.contains("tessera worker --join HOST:7946"),
            "{report}"
        );
        let head = report.lines().find(|l| l.starts_with("head ")).unwrap();
        assert!(head.contains("h1") && head.contains("6.0/8.0 GiB") && head.contains("1/1"));
        let worker = report.lines().find(|l| l.starts_with("w-1-abc")).unwrap();
        assert!(worker.contains("H200 (100.0/140.0 GiB)"), "{worker}");
        assert!(
            worker.contains("5s ago") && worker.contains("2/1"),
            "{worker}"
        );
        assert!(worker.ends_with("zone=b"), "{worker}");
        let replica = report
            .lines()
            .find(|l| l.starts_with("inference-0"))
            .unwrap();
        assert!(replica.contains("running") && replica.contains("my-adapter"));
        let smol = report
            .lines()
            .find(|l| l.starts_with("smol (default)"))
            .unwrap();
        assert!(
            smol.contains("ready") && smol.contains("1/1") && smol.contains("smol.gguf"),
            "{smol}"
        );
        let tiny = report.lines().find(|l| l.starts_with("tiny ")).unwrap();
        assert!(
            tiny.contains("pending")
                && tiny.contains("0/1")
                && tiny.contains("no free inference slot"),
            "{tiny}"
        );
        assert!(
            report.contains("1 queued, 1 running, 4 succeeded"),
            "{report}"
        );
        assert!(report.contains("ft-123 on trainer-0"), "{report}");
        assert!(report.contains("training: 250 tokens/s"), "{report}");
        assert!(
            report.contains(
                "autoscaler smol: 1 of 1..2 replicas, 0 ongoing requests, desired 1; last: down to 1"
            ),
            "{report}"
        );
    }
}
