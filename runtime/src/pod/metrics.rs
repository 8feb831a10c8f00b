//! `husk monitor --listen ADDR`: the node's pods as Prometheus metrics,
//! in the OpenMetrics text format on `GET /metrics`. Each scrape reads the
//! state directories, the pods' cgroups and /proc afresh (as `husk ps`
//! does), so the monitor holds no state and works on pods whose shim
//! died; what only a shim knows (guest memory, agent RPCs) is not here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::config::Config;
use crate::host::accounting::Accounting;
use crate::pod::inventory::{self, PodEntry};
use crate::pod::overhead::cgroup_processes;

/// The content type of the OpenMetrics text format, which Prometheus
/// servers ask for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus's older text format, for every other client (curl,
/// `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;

/// A pod's identity labels: the Kubernetes namespace and pod (empty for
/// pods that serve none), the sandbox id and the containerd namespace.
fn pod_labels(p: &PodEntry) -> Labels {
    let r = p.record.clone().unwrap_or_default();
    vec![
        ("namespace".into(), r.pod_namespace.unwrap_or_default()),
        ("pod".into(), r.pod_name.unwrap_or_default()),
        ("sandbox_id".into(), p.id.clone()),
        ("containerd_namespace".into(), p.namespace.clone()),
    ]
}

fn with(mut l: Labels, k: &str, v: &str) -> Labels {
    l.push((k.to_owned(), v.to_owned()));
    l
}

/// Every metric family of one scrape.
#[derive(Default)]
struct Families {
    up: Family<Labels, Gauge>,
    working_set: Family<Labels, GaugeF>,
    limit: Family<Labels, GaugeF>,
    cpu: Family<Labels, CounterF>,
    oom: Family<Labels, Counter>,
    pss: Family<Labels, GaugeF>,
    uptime: Family<Labels, GaugeF>,
    containers: Family<Labels, Gauge>,
    pods: Family<Labels, Gauge>,
    node_working_set: GaugeF,
}

/// The node's pods now, as an OpenMetrics exposition.
pub fn exposition(config: &Config) -> String {
    let pods = inventory::list(config);
    let f = Families::default();
    let boot: Family<Labels, Histogram, fn() -> Histogram> =
        Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
    let mut states: BTreeMap<&str, i64> = BTreeMap::from([("running", 0), ("dead", 0)]);
    let mut node_ws = 0.0;
    for p in &pods {
        *states.entry(p.state()).or_default() += 1;
        let labels = pod_labels(p);
        let (backend, uptime) = inventory::backend_and_uptime(p);
        let backend = backend.unwrap_or_default();
        f.up.get_or_create(&with(labels.clone(), "backend", &backend))
            .set(i64::from(!p.pids.is_empty()));
        f.containers
            .get_or_create(&labels)
            .set(p.containers.len() as i64);
        if let Some(up) = uptime {
            f.uptime.get_or_create(&labels).set(up as f64);
        }
        for (phase, secs) in p.record.iter().flat_map(|r| &r.boot_phases) {
            if secs.is_finite() && *secs >= 0.0 {
                boot.get_or_create(&vec![("phase".to_owned(), phase.clone())])
                    .observe(*secs);
            }
        }
        let Some(acc) = p.pids.iter().find_map(|&pid| Accounting::of(pid)) else {
            continue;
        };
        if let Some(ws) = acc.working_set() {
            node_ws += ws as f64;
            f.working_set.get_or_create(&labels).set(ws as f64);
        }
        if let Some(l) = acc.memory_limit() {
            f.limit.get_or_create(&labels).set(l as f64);
        }
        if let Some(ns) = acc.cpu_ns() {
            f.cpu.get_or_create(&labels).inc_by(ns as f64 / 1e9);
        }
        if let Some(n) = acc.oom_kills()[0] {
            f.oom.get_or_create(&labels).inc_by(n);
        }
        // Processes of one name (virtiofsd's two) add up.
        for proc in cgroup_processes(&acc) {
            f.pss
                .get_or_create(&with(labels.clone(), "process", &proc.name))
                .inc_by(proc.pss_kib as f64 * 1024.0);
        }
    }
    for (state, n) in states {
        f.pods
            .get_or_create(&vec![("state".to_owned(), state.to_owned())])
            .set(n);
    }
    f.node_working_set.set(node_ws);
    let mut r = Registry::with_prefix("husk");
    r.register(
        "pods",
        "Pods with a state directory on this node, by state",
        f.pods,
    );
    r.register(
        "pod_up",
        "1 while a process of the pod runs, 0 when only its state is left",
        f.up,
    );
    r.register(
        "pod_containers",
        "Containers with state in the pod's share",
        f.containers,
    );
    r.register_with_unit(
        "pod_uptime",
        "Time since the pod's VMM started",
        Unit::Seconds,
        f.uptime,
    );
    r.register_with_unit(
        "pod_memory_working_set",
        "The pod's host cgroup's memory less inactive file pages (VMM, daemons, shim, the guest RAM they touched)",
        Unit::Bytes,
        f.working_set,
    );
    r.register_with_unit(
        "pod_memory_limit",
        "The memory limit on the pod's cgroup or its nearest limited ancestor",
        Unit::Bytes,
        f.limit,
    );
    r.register_with_unit(
        "pod_cpu",
        "CPU time the pod's host cgroup used",
        Unit::Seconds,
        f.cpu,
    );
    r.register(
        "pod_host_oom_kills",
        "Processes of the pod the host's OOM killer took",
        f.oom,
    );
    r.register_with_unit(
        "pod_process_pss",
        "Proportional set size of each process in the pod's cgroup",
        Unit::Bytes,
        f.pss,
    );
    r.register_with_unit(
        "pod_boot_phase",
        "How long each phase of the running pods' boots took",
        Unit::Seconds,
        boot,
    );
    r.register_with_unit(
        "node_memory_working_set",
        "The sum of the pods' working sets",
        Unit::Bytes,
        f.node_working_set,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// An OpenMetrics exposition in Prometheus's text format 0.0.4: a
/// counter's HELP and TYPE name its `_total` series, and the UNIT and EOF
/// lines (OpenMetrics' own) go.
pub fn text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) if counters.iter().any(|c| rest.split(' ').next() == Some(c)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out += &format!("{p}{name}_total {tail}\n");
            }
            _ => {
                out += line;
                out.push('\n');
            }
        }
    }
    out
}

/// Serves `GET /metrics` on `listener`, one connection at a time, until
/// accepting fails.
pub fn serve(listener: &TcpListener, config: &Config) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept()?;
        if let Err(e) = answer(stream, config) {
            tracing::debug!(%peer, "metrics request: {e}");
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, config: &Config) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head = String::from_utf8_lossy(&head);
    let openmetrics = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    match (method, path) {
        ("GET", "/metrics") if openmetrics => {
            respond(&mut stream, "200 OK", CONTENT_TYPE, &exposition(config))
        }
        ("GET", "/metrics") => respond(
            &mut stream,
            "200 OK",
            TEXT_CONTENT_TYPE,
            &text_format(&exposition(config)),
        ),
        ("GET", _) => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "husk monitor serves /metrics\n",
        ),
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", ""),
    }
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_node_exposes_its_zero_pods_and_requests_get_http_answers() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let text = exposition(&config);
        assert!(text.contains("husk_pods{state=\"running\"} 0\n"), "{text}");
        assert!(
            text.contains("# TYPE husk_pod_boot_phase_seconds histogram"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..4 {
                let (s, _) = listener.accept().unwrap();
                answer(s, &config).unwrap();
            }
        });
        let get = |req: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let om = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5";
        let ok = get(&format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{om}\r\n\r\n"));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE) && ok.ends_with("# EOF\n"), "{ok}");
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let plain = get("GET /metrics HTTP/1.0\r\n\r\n");
        assert!(
            plain.contains(TEXT_CONTENT_TYPE) && !plain.contains("# EOF"),
            "{plain}"
        );
        server.join().unwrap();
    }

    #[test]
    fn the_text_format_names_counters_by_their_total_series_and_drops_openmetrics_lines() {
        let om = "# HELP husk_pod_cpu_seconds CPU time.\n# TYPE husk_pod_cpu_seconds counter\n# UNIT husk_pod_cpu_seconds seconds\nhusk_pod_cpu_seconds_total{pod=\"a\"} 1.5\n# HELP husk_pods Pods.\n# TYPE husk_pods gauge\nhusk_pods 2\n# EOF\n";
        assert_eq!(
            text_format(om),
            "# HELP husk_pod_cpu_seconds_total CPU time.\n# TYPE husk_pod_cpu_seconds_total counter\nhusk_pod_cpu_seconds_total{pod=\"a\"} 1.5\n# HELP husk_pods Pods.\n# TYPE husk_pods gauge\nhusk_pods 2\n"
        );
    }
}
