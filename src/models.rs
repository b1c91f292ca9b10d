//! `tessera models deploy|list|delete`: a running head's deployments (`/models`), as Ray Serve's
//! `serve deploy` / `serve status` and Scale's model-endpoint commands do.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use crate::cli::{DeployArgs, ModelsAction, ModelsArgs};
use crate::client::{encode, json_body, text, write_table, Client};
use crate::config::Config;

pub fn run(args: ModelsArgs, config: &Config) -> anyhow::Result<()> {
    match args.action {
        ModelsAction::List { conn } => {
            let client = Client::new(&conn, config);
            let body = json_body(client.get("/models")?)?;
            let mut out = std::io::stdout().lock();
            write!(out, "{}", table(&body))?;
            Ok(())
        }
        ModelsAction::Delete { name, conn } => {
            let client = Client::new(&conn, config);
            let view = json_body(client.delete(&format!("/models/{}", encode(&name)))?)?;
            println!("{} {}", text(&view["name"]), text(&view["state"]));
            Ok(())
        }
        ModelsAction::Deploy(d) => deploy(&Client::new(&d.conn, config), d),
    }
}

/// The request body of a deploy.
pub fn body(d: &DeployArgs) -> Value {
    let mut body = json!({"name": d.name, "path": d.path});
    for (key, v) in [
        ("replicas", d.replicas),
        ("min_replicas", d.min_replicas),
        ("max_replicas", d.max_replicas),
    ] {
        if let Some(n) = v {
            body[key] = json!(n);
        }
    }
    if let Some(t) = &d.dtype {
        body["dtype"] = json!(t);
    }
    if !d.tags.is_empty() {
        let tags: serde_json::Map<String, Value> =
            d.tags.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        body["placement"] = json!({ "tags": tags });
    }
    if let Some(target) = d.target_ongoing_requests {
        let mut a = json!({ "target_ongoing_requests": target });
        if let Some(s) = d.upscale_delay_s {
            a["upscale_delay_s"] = json!(s);
        }
        if let Some(s) = d.downscale_delay_s {
            a["downscale_delay_s"] = json!(s);
        }
        body["autoscaling"] = a;
    }
    body
}

fn deploy(client: &Client, d: DeployArgs) -> anyhow::Result<()> {
    let mut view = json_body(client.post("/models", &body(&d))?)?;
    let started = Instant::now();
    while d.wait && (view["state"] == "deploying" || view["state"] == "pending") {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("deployment {} not ready after 10 minutes", d.name);
        }
        std::thread::sleep(Duration::from_millis(500));
        view = json_body(client.get(&format!("/models/{}", encode(&d.name)))?)?;
    }
    println!(
        "{} {}{}",
        text(&view["name"]),
        text(&view["state"]),
        view["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    if d.wait && view["state"] != "ready" {
        bail!("deployment {} is {}", d.name, text(&view["state"]));
    }
    Ok(())
}

/// A deployment's name (marked when it is the default one), state and replicas/target, as both
/// `tessera models list` and `tessera status` show them.
pub fn cells(d: &Value) -> [String; 3] {
    [
        format!(
            "{}{}",
            text(&d["name"]),
            if d["default"] == true {
                " (default)"
            } else {
                ""
            }
        ),
        text(&d["state"]),
        format!(
            "{}/{}",
            d["replicas"].as_array().map_or(0, Vec::len),
            d["target_replicas"].as_u64().unwrap_or(0)
        ),
    ]
}

/// `GET /models` as a table.
pub fn table(body: &Value) -> String {
    let rows: Vec<[String; 6]> = body["deployments"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|d| {
            let scaling = match d["autoscaler"].as_object() {
                Some(a) => format!(
                    "{}..{} (target {})",
                    a["min_replicas"],
                    a["max_replicas"],
                    d["spec"]["autoscaling"]["target_ongoing_requests"]
                ),
                None => "fixed".into(),
            };
            let [name, state, replicas] = cells(d);
            [
                name,
                state,
                replicas,
                scaling,
                text(&d["spec"]["path"]),
                d["reason"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    let mut out: Vec<u8> = Vec::new();
    let _ = write_table(
        &mut out,
        &["NAME", "STATE", "REPLICAS", "SCALING", "PATH", "REASON"],
        &rows,
    );
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_bodies_carry_what_was_given() {
        let d = DeployArgs {
            name: "tiny".into(),
            path: "tiny".into(),
            replicas: None,
            min_replicas: Some(1),
            max_replicas: Some(2),
            dtype: None,
            tags: vec![("zone".into(), "b".into())],
            target_ongoing_requests: Some(2.0),
            upscale_delay_s: None,
            downscale_delay_s: Some(3.0),
            wait: false,
            conn: crate::cli::ConnArgs {
                url: None,
                token: None,
            },
        };
        assert_eq!(
            body(&d),
            json!({"name": "tiny", "path": "tiny", "min_replicas": 1, "max_replicas": 2,
                   "placement": {"tags": {"zone": "b"}},
                   "autoscaling": {"target_ongoing_requests": 2.0, "downscale_delay_s": 3.0}})
        );
    }

    #[test]
    fn the_table_has_a_row_per_deployment() {
        let t = table(&json!({"deployments": [
            {"name": "smol", "default": true, "state": "ready", "replicas": ["inference-0"],
             "target_replicas": 1, "spec": {"path": "/m/smol.gguf"}},
            {"name": "tiny", "state": "pending", "replicas": [], "target_replicas": 2,
             "autoscaler": {"min_replicas": 1, "max_replicas": 2},
             "spec": {"path": "/m/tiny", "autoscaling": {"target_ongoing_requests": 2.0}},
             "reason": "no free inference slot"}]}));
        let smol = t.lines().find(|l| l.starts_with("smol (default)")).unwrap();
        assert!(smol.contains("ready") && smol.contains("1/1") && smol.contains("fixed"));
        let tiny = t.lines().find(|l| l.starts_with("tiny")).unwrap();
        assert!(
            tiny.contains("0/2")
                && tiny.contains("1..2 (target 2.0)")
                && tiny.ends_with("no free inference slot"),
            "{tiny}"
        );
    }
}
