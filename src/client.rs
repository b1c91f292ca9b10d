//! `tessera chat`, `tessera fine-tune` and `tessera jobs`: thin HTTP clients of a head's API
//! (`/chat`, `/fine-tune`, `/jobs`), with SSE streaming of tokens and of job progress.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use ureq::http::Response;
use ureq::{Agent, Body, RequestBuilder};

use crate::cli::{ChatArgs, ConnArgs, FineTuneArgs, JobsArgs};
use crate::config::Config;

/// A client's error on stderr as one line (`error: ...`, no backtrace), then exit status 1.
pub fn exit_on_error(result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = result {
        let _ = std::io::stdout().flush();
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// A connection to a head.
pub struct Client {
    agent: Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(conn: &ConnArgs, config: &Config) -> Self {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let base = conn.url.clone().unwrap_or_else(|| default_url(config));
        let base = match base.contains("://") {
            true => base,
            false => format!("http://{base}"),
        };
        let token = conn
            .token
            .clone()
            .or_else(|| Some(config.server.auth_token.clone()))
            .filter(|t| !t.is_empty());
        Self {
            agent,
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth<B>(&self, rb: RequestBuilder<B>) -> RequestBuilder<B> {
        match &self.token {
            Some(t) => rb.header("Authorization", format!("Bearer {t}")),
            None => rb,
        }
    }

    /// The response of a request, or the server's error message for a 4xx/5xx.
    fn checked(&self, r: Result<Response<Body>, ureq::Error>) -> anyhow::Result<Response<Body>> {
        let mut resp = r.with_context(|| format!("cannot reach the head at {}", self.base))?;
        let status = resp.status();
        if status.is_client_error() || status.is_server_error() {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str(&text).map_or(text, |v| error_message(&v));
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(resp)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Response<Body>> {
        self.checked(self.auth(self.agent.get(self.url(path))).call())
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Response<Body>> {
        self.checked(self.auth(self.agent.post(self.url(path))).send_json(body))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Response<Body>> {
        self.checked(self.auth(self.agent.delete(self.url(path))).call())
    }
}

/// `http://{server.bind}:{server.port}`, with an unspecified bind address mapped to loopback.
pub fn default_url(config: &Config) -> String {
    let port = config.server.port;
    match config.server.bind.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) if a.is_unspecified() => format!("http://127.0.0.1:{port}"),
        Ok(IpAddr::V6(a)) if a.is_unspecified() => format!("http://[::1]:{port}"),
        Ok(IpAddr::V6(a)) => format!("http://[{a}]:{port}"),
        _ => format!("http://{}:{port}", config.server.bind),
    }
}

pub fn json_body(mut resp: Response<Body>) -> anyhow::Result<Value> {
    resp.body_mut()
        .read_json()
        .context("the head answered with something that is not JSON")
}

/// Reads Server-Sent Events, calling `on_event(event, data)` per event until it returns false or
/// the stream ends; returns whether `on_event` asked to stop.
fn read_sse(
    reader: impl Read,
    mut on_event: impl FnMut(&str, &str) -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    let (mut event, mut data) = (String::new(), String::new());
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading the event stream")?;
        if line.is_empty() {
            if !data.is_empty() || !event.is_empty() {
                let name = if event.is_empty() { "message" } else { &event };
                if !on_event(name, &data)? {
                    return Ok(true);
                }
            }
            event.clear();
            data.clear();
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_string(),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {} // comments (keep-alives), `id`, `retry`
        }
    }
    Ok(false)
}

fn parse(data: &str) -> anyhow::Result<Value> {
    serde_json::from_str(data).with_context(|| format!("bad event data from the head: {data}"))
}

fn error_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

pub fn chat(args: ChatArgs, config: &Config) -> anyhow::Result<()> {
    let client = Client::new(&args.conn, config);
    let mut body = json!({});
    if let Some(m) = &args.model {
        body["model"] = json!(m);
    }
    match (&args.prompt, &args.messages) {
        (Some(p), _) if p == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the prompt from stdin")?;
            body["prompt"] = json!(text);
        }
        (Some(p), _) => body["prompt"] = json!(p),
        (None, Some(m)) => {
            let v: Value = serde_json::from_str(m)
                .context("--messages: expected [{\"role\", \"content\"}]")?;
            if !v.is_array() {
                bail!("--messages: expected a JSON list of {{\"role\", \"content\"}}");
            }
            body["messages"] = v;
        }
        (None, None) => bail!("give a PROMPT (or `-` for stdin) or --messages JSON"),
    }
    let optional = [
        ("adapter_path", args.adapter.as_ref().map(|a| json!(a))),
        ("max_tokens", args.max_tokens.map(|n| json!(n))),
        ("temperature", args.temperature.map(|t| json!(t))),
        ("top_p", args.top_p.map(|t| json!(t))),
        ("top_k", args.top_k.map(|k| json!(k))),
        ("seed", args.seed.map(|s| json!(s))),
        ("stop", (!args.stop.is_empty()).then(|| json!(args.stop))),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            body[name] = v;
        }
    }
    let mut stdout = std::io::stdout().lock();
    if args.json || args.no_stream {
        let done = json_body(client.post("/chat", &body)?)?;
        if args.json {
            writeln!(stdout, "{done}")?;
        } else {
            writeln!(stdout, "{}", done["text"].as_str().unwrap_or_default())?;
        }
        return Ok(());
    }
    body["stream"] = json!(true);
    let resp = client.post("/chat", &body)?;
    let mut printed = String::new();
    let mut failure = None;
    let finished = read_sse(resp.into_body().into_reader(), |event, data| {
        match event {
            "token" => {
                let text = parse(data)?["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
                printed.push_str(&text);
                Ok(true)
            }
            "done" => {
                // The answer's text may end with a tail no token event carried.
                let text = parse(data)?["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if let Some(tail) = text.strip_prefix(printed.as_str()) {
                    stdout.write_all(tail.as_bytes())?;
                }
                writeln!(stdout)?;
                Ok(false)
            }
            "error" => {
                failure = Some(error_message(&parse(data)?));
                Ok(false)
            }
            _ => Ok(true),
        }
    })?;
    if let Some(message) = failure {
        if !printed.is_empty() {
            writeln!(stdout)?;
        }
        bail!("{message}");
    }
    if !finished {
        bail!("the head closed the stream before the answer was done");
    }
    Ok(())
}

pub fn fine_tune(args: FineTuneArgs, config: &Config) -> anyhow::Result<()> {
    let client = Client::new(&args.conn, config);
    let mut body = json!({"dataset_path": args.dataset, "output_path": args.output});
    if let Some(b) = &args.base_model {
        body["base_model"] = json!(b);
    }
    if let Some(p) = &args.priority {
        body["priority"] = json!(p);
    }
    if let Some(h) = &args.hyperparameters {
        let v: Value =
            serde_json::from_str(h).context("--hyperparameters: expected a JSON object")?;
        if !v.is_object() {
            bail!("--hyperparameters: expected a JSON object");
        }
        body["hyperparameters"] = v;
    }
    let accepted = json_body(client.post("/fine-tune", &body)?)?;
    let id = accepted["job_id"]
        .as_str()
        .context("the head's answer has no job_id")?
        .to_string();
    println!("{id}");
    std::io::stdout().flush()?;
    if args.watch {
        watch(&client, &id)?;
    }
    Ok(())
}

pub fn jobs(args: JobsArgs, config: &Config) -> anyhow::Result<()> {
    let client = Client::new(&args.conn, config);
    let Some(id) = &args.id else {
        return list(&client, &args);
    };
    let path = format!("/jobs/{}", encode(id));
    if args.cancel {
        let record = json_body(client.delete(&path)?)?;
        if !args.watch {
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
    }
    if args.watch {
        return watch(&client, id);
    }
    if !args.cancel {
        let record = json_body(client.get(&path)?)?;
        println!("{}", serde_json::to_string_pretty(&record)?);
    }
    Ok(())
}

/// Percent-encodes what is not an unreserved URL character.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn list(client: &Client, args: &JobsArgs) -> anyhow::Result<()> {
    let mut path = format!("/jobs?limit={}&offset={}", args.limit, args.offset);
    if let Some(s) = &args.status {
        path.push_str(&format!("&status={}", encode(s)));
    }
    let page = json_body(client.get(&path)?)?;
    let jobs = page["jobs"].as_array().cloned().unwrap_or_default();
    let now = now();
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|j| {
            let p = &j["progress"];
            let progress = match (p["step"].as_u64(), p["total_steps"].as_u64()) {
                (Some(s), Some(t)) => format!("{s}/{t}"),
                _ => "-".into(),
            };
            let loss = p["loss"]
                .as_f64()
                .map(|l| format!("{l:.4}"))
                .unwrap_or("-".into());
            let created = j["created_at"]
                .as_f64()
                .map(|t| age(now - t))
                .unwrap_or("-".into());
            [
                text(&j["id"]),
                text(&j["status"]),
                text(&j["priority"]),
                progress,
                loss,
                created,
            ]
        })
        .collect();
    let mut stdout = std::io::stdout().lock();
    write_table(
        &mut stdout,
        &["ID", "STATUS", "PRIORITY", "PROGRESS", "LOSS", "CREATED"],
        &rows,
    )?;
    let total = page["total"].as_u64().unwrap_or(0);
    if total as usize > rows.len() {
        writeln!(
            stdout,
            "({} of {total} jobs; see --limit/--offset)",
            rows.len()
        )?;
    }
    Ok(())
}

/// A left-aligned table: the header, then the rows, columns two spaces apart.
pub fn write_table<const N: usize>(
    out: &mut impl Write,
    header: &[&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let header = header.map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

pub fn text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| "-".into())
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `42s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// Follows `/jobs/{id}/events` until the job ends: a progress line on a terminal (stderr), JSON
/// lines on stdout otherwise. Ok only when the job succeeded.
pub fn watch(client: &Client, id: &str) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let resp = client.get(&format!("/jobs/{}/events", encode(id)))?;
    let mut last: Option<Value> = None;
    let mut first_point: Option<(f64, f64)> = None; // (step, at)
    let mut bar_shown = false;
    let mut stdout = std::io::stdout().lock();
    read_sse(resp.into_body().into_reader(), |event, data| {
        let v = parse(data)?;
        if !terminal {
            writeln!(stdout, "{}", json!({"event": event, "data": v}))?;
            stdout.flush()?;
        }
        match event {
            "progress" => {
                if terminal {
                    let (step, at) = (
                        v["step"].as_f64().unwrap_or(0.0),
                        v["at"].as_f64().unwrap_or(0.0),
                    );
                    let (s0, t0) = *first_point.get_or_insert((step, at));
                    eprint!("\r{}   ", progress_line(&v, s0, t0));
                    let _ = std::io::stderr().flush();
                    bar_shown = true;
                }
                Ok(true)
            }
            "state" => {
                let status = text(&v["status"]);
                let done = matches!(status.as_str(), "succeeded" | "failed" | "cancelled");
                if terminal && last.as_ref().map(|l| text(&l["status"])) != Some(status.clone()) {
                    if bar_shown {
                        eprintln!();
                        bar_shown = false;
                    }
                    eprintln!("job {id}: {status}");
                }
                last = Some(v);
                Ok(!done)
            }
            _ => Ok(true),
        }
    })?;
    if bar_shown {
        eprintln!();
    }
    // The stream may end early (the head restarting): ask once more.
    let record = match last {
        Some(r)
            if matches!(
                text(&r["status"]).as_str(),
                "succeeded" | "failed" | "cancelled"
            ) =>
        {
            r
        }
        _ => json_body(client.get(&format!("/jobs/{}", encode(id)))?)?,
    };
    match text(&record["status"]).as_str() {
        "succeeded" => {
            if terminal {
                eprintln!("adapter: {}", text(&record["adapter_path"]));
            }
            Ok(())
        }
        s @ ("failed" | "cancelled") => {
            let why = record["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            bail!("job {id} {s}{why}")
        }
        s => bail!("the event stream ended while job {id} was still {s}"),
    }
}

/// `[  12/40] epoch 1 loss 2.3456 eval 2.5 | 1234 tok/s | ETA 35s`.
fn progress_line(p: &Value, step0: f64, at0: f64) -> String {
    let step = p["step"].as_f64().unwrap_or(0.0);
    let total = p["total_steps"].as_f64().unwrap_or(0.0);
    let at = p["at"].as_f64().unwrap_or(at0);
    let eta = if step > step0 && total >= step {
        let per_step = (at - at0) / (step - step0);
        format!("{:.0}s", per_step * (total - step))
    } else {
        "?".into()
    };
    let eval = p["eval_loss"]
        .as_f64()
        .map(|l| format!(" eval {l:.4}"))
        .unwrap_or_default();
    format!(
        "[{:>5}/{}] epoch {} loss {:.4}{eval} | {:.0} tok/s | ETA {eta}",
        step as u64,
        total as u64,
        p["epoch"].as_u64().unwrap_or(0),
        p["loss"].as_f64().unwrap_or(f64::NAN),
        p["tokens_per_s"].as_f64().unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_on_blank_lines() {
        let input = ": keep-alive\n\nevent: token\ndata: {\"text\":\"a\"}\n\nevent: done\ndata: 1\ndata: 2\n\n";
        let mut seen = vec![];
        let stopped = read_sse(input.as_bytes(), |e, d| {
            seen.push((e.to_string(), d.to_string()));
            Ok(true)
        })
        .unwrap();
        assert!(!stopped);
        assert_eq!(
            seen,
            vec![
                ("token".to_string(), "{\"text\":\"a\"}".to_string()),
                ("done".to_string(), "1\n2".to_string())
            ]
        );
    }

    #[test]
    fn ages_and_encoding() {
        assert_eq!(age(5.0), "5s ago");
        assert_eq!(age(7200.0), "2h ago");
        assert_eq!(encode("job-1 /x"), "job-1%20%2Fx");
    }
}
