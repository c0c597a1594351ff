//! Metrics on an opt-in address (coild's and the controller's
//! `--metrics-addr`; keep it on loopback): the OpenMetrics text format,
//! encoded by prometheus-client ([`Exposition`]), behind a deliberately
//! small HTTP/1.1 responder: every request gets the current metrics.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram as PHistogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Binds `addr` and serves `render()` to every request, in the background.
pub async fn serve<F>(addr: SocketAddr, render: F) -> std::io::Result<()>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let render = Arc::new(render);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                let body = render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
];

/// A latency histogram with coil's buckets (prometheus-client's, which
/// clones share).
#[derive(Debug, Clone)]
pub struct Histogram(PHistogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(PHistogram::new(BUCKETS))
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// One scrape's metrics, encoded by prometheus-client in the OpenMetrics
/// text format. Values are read when the scrape comes (most are views of
/// state that changes anyway), so a registry is built per scrape; the
/// histograms are shared with the code that observes them.
#[derive(Debug)]
pub struct Exposition {
    reg: Registry,
}

type Labels = Vec<(String, String)>;

impl Exposition {
    /// Every metric carries these labels (coild: its node).
    pub fn new(labels: &[(&str, &str)]) -> Exposition {
        let labels: Vec<(Cow<'static, str>, Cow<'static, str>)> = labels
            .iter()
            .map(|(k, v)| (Cow::Owned(k.to_string()), Cow::Owned(v.to_string())))
            .collect();
        Exposition {
            reg: Registry::with_labels(labels.into_iter()),
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: i64) {
        let g: Gauge = Gauge::default();
        g.set(v);
        self.reg.register(name, help, g);
    }

    /// A counter; `name` ends in `_total`, as the exposed sample does.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) {
        let c: Counter = Counter::default();
        c.inc_by(v);
        self.reg.register(counter_base(name), help, c);
    }

    /// A gauge with one series per label set.
    pub fn gauges(&mut self, name: &str, help: &str, series: Vec<(Labels, i64)>) {
        let f = Family::<Labels, Gauge>::default();
        for (l, v) in series {
            f.get_or_create(&l).set(v);
        }
        self.reg.register(name, help, f);
    }

    /// A counter with one series per label set; `name` ends in `_total`.
    pub fn counters(&mut self, name: &str, help: &str, series: Vec<(Labels, u64)>) {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in series {
            f.get_or_create(&l).inc_by(v);
        }
        self.reg.register(counter_base(name), help, f);
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.reg.register(name, help, h.0.clone());
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.reg) {
            out = format!("# encoding the metrics failed: {e}\n# EOF\n");
        }
        out
    }
}

/// prometheus-client appends `_total` to a counter's name.
fn counter_base(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// One label set.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        let mut x = Exposition::new(&[]);
        x.histogram("x_seconds", "help", &h);
        let t = x.render();
        assert!(t.contains("x_seconds_bucket{le=\"0.0005\"} 1"), "{t}");
        assert!(t.contains("x_seconds_bucket{le=\"0.004\"} 2"), "{t}");
        assert!(t.contains("x_seconds_bucket{le=\"1.024\"} 2"), "{t}");
        assert!(t.contains("x_seconds_bucket{le=\"+Inf\"} 3"), "{t}");
        assert!(t.contains("x_seconds_count 3"), "{t}");
    }

    #[test]
    fn counters_keep_their_total_name_and_labels_are_escaped() {
        let mut x = Exposition::new(&[("node", "n1")]);
        x.counter("coil_x_total", "Things", 4);
        x.gauges("coil_y", "Ys", vec![(labels(&[("pool", "a\"b")]), 2)]);
        let t = x.render();
        assert!(t.contains("# TYPE coil_x counter"), "{t}");
        assert!(t.contains("coil_x_total{node=\"n1\"} 4"), "{t}");
        assert!(t.contains(r#"coil_y{node="n1",pool="a\"b"} 2"#), "{t}");
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
