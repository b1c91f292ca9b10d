//! Who may send a request, on a real head on loopback (issue 27, items 7 and 8): with a token, a
//! request without it is refused from its head alone, before a byte of its body is read; without a
//! token, a request whose Host is a foreign name (a web page that pointed its domain at
//! 127.0.0.1: DNS rebinding) is refused, while IP literals, localhost and `server.allowed_hosts`
//! are served.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{start, Head};

/// Sends raw bytes on a fresh connection and returns what the server answered within `wait`.
fn exchange(head: &Head, request: &str, wait: Duration) -> String {
    let addr = head.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Up to the end of the first response's body (or the timeout).
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn without_a_token_only_local_or_allowed_host_names_are_served() {
    let head = start(&["server.allowed_hosts=[\"tessera.test\"]"]);
    let get = |host: &str, path: &str| {
        exchange(
            &head,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            Duration::from_secs(10),
        )
    };
    let port = head.url.rsplit(':').next().unwrap().to_string();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "tessera.test".to_string(),
    ] {
        let r = get(&host, "/jobs");
        assert_eq!(status_of(&r), Some(200), "{host}: {r}");
    }
    let r = get("rebound.example", "/jobs");
    assert_eq!(status_of(&r), Some(403), "{r}");
    assert!(
        r.contains("host_not_allowed") && r.contains("server.allowed_hosts"),
        "{r}"
    );
    // A deployment posted by a foreign page is refused and nothing is created.
    let body = r#"{"name": "evil", "path": "x.gguf"}"#;
    let r = exchange(
        &head,
        &format!(
            "POST /models HTTP/1.1\r\nHost: rebound.example:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&r), Some(403), "{r}");
    let (status, models) = head.get("/models");
    assert_eq!(status, 200);
    assert!(!models.to_string().contains("evil"), "{models}");
}

#[test]
fn with_a_token_a_request_without_it_is_refused_before_its_body_is_read() {
    let head = start(&["server.auth_token=\"s3cret\""]);
    // Headers that announce a 1 MB body, and no body: refused at once, not after the body read
    // timeout (30 s).
    let started = Instant::now();
    let r = exchange(
        &head,
        "POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&r), Some(401), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );
    // A wrong token of another length, and the right one.
    for (token, status) in [("s3cre", 401), ("s3cret-and-more", 401), ("s3cret", 200)] {
        let r = exchange(
            &head,
            &format!(
                "GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
                 Connection: close\r\n\r\n"
            ),
            Duration::from_secs(10),
        );
        assert_eq!(status_of(&r), Some(status), "{token}: {r}");
    }
    // Probes stay public; with a token set, Host names are not checked.
    let r = exchange(
        &head,
        "GET /health HTTP/1.1\r\nHost: probe.cluster.local\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&r), Some(200), "{r}");
}
