//! The dashboard in a real headless browser (Debian's `chromium` + `chromedriver`, driven by
//! Selenium from tests/dashboard.py) against a real head with a bearer token: the token prompt,
//! the cluster, a running job and its live loss curve, a job whose name holds HTML shown as text,
//! the playground streaming an answer, cancel. The screenshot is kept in `target/tmp/`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Head;

const TOKEN: &str = "dashboard-token-7";

fn call(method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    let agent = Head::agent();
    let auth = format!("Bearer {TOKEN}");
    let mut r = match (method, body) {
        ("POST", Some(b)) => agent.post(url).header("Authorization", &auth).send_json(b),
        _ => agent.get(url).header("Authorization", &auth).call(),
    }
    .unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or(Value::Null))
}

fn browser_available(python: &str) -> Result<(), String> {
    if !Path::new("/usr/bin/chromium").exists() {
        return Err("no /usr/bin/chromium (apt install chromium chromium-driver)".into());
    }
    if !["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        return Err("no chromedriver (apt install chromium-driver)".into());
    }
    let selenium = Command::new(python)
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if !selenium {
        return Err(format!("{python} has no `selenium` package"));
    }
    Ok(())
}

#[test]
fn the_dashboard_shows_the_cluster_and_jobs_cancels_and_streams_in_a_real_browser() {
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    if let Err(why) = browser_available(&python) {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_BROWSER").is_none(),
            "a browser is required (TESSERA_REQUIRE_BROWSER) but {why}"
        );
        eprintln!("skipping the dashboard browser test: {why}");
        return;
    }
    let head = support::start(&[
        &format!("server.auth_token=\"{TOKEN}\""),
        "resources.cpu_inference_slots=2",
        "model.replicas=1",
    ]);
    // The page is served without the token (it holds no data) and embeds everything it needs.
    let (status, page) = head.get_text("/dashboard");
    assert_eq!(status, 200);
    assert!(page.contains("<title>Tessera</title>"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    assert_eq!(head.get_text("/").1, page);
    assert_eq!(head.get("/cluster").0, 401, "the API still needs the token");

    head.write_dataset("d.jsonl", 16);
    let url = |p: &str| format!("{}{p}", head.url);
    // A second deployment on the free slot.
    support::tiny::write_model(&head.dir.path().join("models").join("tiny2"), 11);
    let (status, r) = call(
        "POST",
        &url("/models"),
        Some(&json!({"name": "tiny2", "path": "tiny2"})),
    );
    assert_eq!(status, 202, "{r}");
    // One job long enough to watch, and one queued behind it whose output name holds HTML.
    let mut h = support::quick_hyperparameters(400);
    h["save_every_steps"] = json!(1000);
    let (status, r) = call(
        "POST",
        &url("/fine-tune"),
        Some(&json!({"dataset_path": "d.jsonl", "output_path": "long", "hyperparameters": h})),
    );
    assert_eq!(status, 202, "{r}");
    let running = r["job_id"].as_str().unwrap().to_string();
    let hostile = "<img src=x onerror=\"window.injected=1\">";
    let (status, r) = call(
        "POST",
        &url("/fine-tune"),
        Some(&json!({"dataset_path": "d.jsonl", "output_path": hostile,
                     "hyperparameters": support::quick_hyperparameters(1)})),
    );
    assert_eq!(status, 202, "{r}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while call("GET", &url(&format!("/jobs/{running}")), None).1["status"] != "running" {
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    }

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard.py"))
        .args([&head.url, TOKEN, &running, hostile])
        .arg(&shot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the browser checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    // The cancel clicked in the browser reached the job.
    let deadline = Instant::now() + Duration::from_secs(30);
    while call("GET", &url(&format!("/jobs/{running}")), None).1["status"] != "cancelled" {
        assert!(
            Instant::now() < deadline,
            "the cancel did not reach the job"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
