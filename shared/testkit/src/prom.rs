//! Prometheus scrapes in tests: `GET /metrics` over real HTTP, a sample's value by name and
//! labels, and Prometheus' own `promtool check metrics` on a scrape (skipped, with a message,
//! where promtool is not installed).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The content type every service's `/metrics` answers with (the text exposition format 0.0.4).
pub const CONTENT_TYPE_PREFIX: &str = "text/plain; version=0.0.4";

/// `GET path` on `addr` over a fresh HTTP/1.1 connection (`Connection: close`): the response head
/// (status line and headers) and the body. Panics when no answer comes within 10 s.
pub async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the scrape answers within 10 s")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

/// `GET /metrics` on `addr`: the body, after checking the answer is a 200 in the Prometheus text
/// format.
pub async fn scrape(addr: SocketAddr) -> String {
    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-type: {CONTENT_TYPE_PREFIX}")),
        "{head}"
    );
    body
}

/// The samples of family-member `name` in a scrape: each sample's labels (values unquoted) and
/// its value (`None` when the value does not parse).
fn samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (Vec<(&'a str, &'a str)>, Option<f64>)> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, ls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let labels = ls
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            Some((labels, value.trim().parse().ok()))
        })
}

/// The value of sample `name` whose labels are exactly `labels` (in any order); `None` when there
/// is no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .find(|(have, _)| have.len() == labels.len() && labels.iter().all(|l| have.contains(l)))
        .and_then(|(_, v)| v)
}

/// Like [`sample`], with a series that was never recorded reading 0 (counters start at 0).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

/// The sum of the samples of `name` whose labels include every `(k, v)` of `labels` (others may
/// carry more labels); 0 when none does.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .filter(|(have, _)| labels.iter().all(|l| have.contains(l)))
        .filter_map(|(_, v)| v)
        .sum()
}

/// `promtool check metrics` on a scrape: panics with promtool's output when it rejects `text`;
/// prints a message and returns when promtool is not installed. `$PROMTOOL` names another
/// promtool than the one on `PATH`.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("promtool is not installed: `promtool check metrics` skipped");
            return;
        }
        Err(e) => panic!("cannot run {promtool}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
