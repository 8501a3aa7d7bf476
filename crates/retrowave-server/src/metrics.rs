//! Prometheus metrics of the server, through the `metrics` facade, rendered on `GET /metrics`.
//! Names follow vLLM's (`vllm:` becomes `retrowave:`) where vLLM has one.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `retrowave:num_requests_running` | gauge | | sequences admitted (with a KV slot) |
//! | `retrowave:num_requests_waiting` | gauge | | requests in the FIFO admission queue |
//! | `retrowave:prompt_tokens_total` | counter | | prompt tokens of finished requests |
//! | `retrowave:generation_tokens_total` | counter | | generated tokens of finished requests |
//! | `retrowave:request_success_total` | counter | `finished_reason` | finished requests by reason (stop, length, timeout, cancelled, abort) |
//! | `retrowave:time_to_first_token_seconds` | histogram | | arrival to the first token |
//! | `retrowave:inter_token_latency_seconds` | histogram | | between consecutive tokens of a request (vLLM: time_per_output_token) |
//! | `retrowave:e2e_request_latency_seconds` | histogram | | arrival to the end |
//! | `retrowave:request_queue_time_seconds` | histogram | | arrival to admission |
//! | `retrowave:kv_cache_usage_perc` | gauge | `tier` = device, host, disk | share (0..1) of the tier's KV capacity in use; device = reserved tokens of the dense cache over its budget; host and disk stay 0 until the tiered store serves the engine |
//! | `retrowave:kv_cache_tokens` | gauge | `state` = reserved, cached | KV tokens reserved by running sequences / computed and held |
//! | `retrowave:wave_buffer_hit_ratio` | gauge | | share of the retrieval clusters' pages the wave buffers served after their first (cold) step, over every finished request so far (GPU with `host_kv`: the real buffers; CPU: the store policy's simulation of them) |
//! | `retrowave:wave_buffer_pages_total` | counter | `result` = hit, miss | retrieval-cluster pages found in the wave buffers / read from the host tier |
//! | `retrowave:kv_bytes_moved_total` | counter | `tier`, `link` | bytes of KV moved or read: `tier="device",link="attention_read"` counts wave attention's reads; `host,host_to_device` the wave buffers' misses copied over PCIe (GPU with `host_kv`); `disk,disk_to_host` stays 0 until the disk tier serves the engine |
//! | `retrowave:index_build_seconds` | histogram | | wave index build after a prefill, per request |
//! | `retrowave:retrieval_zone_clusters` | histogram | | retrieval clusters per (layer, KV head) decode step, mean of one request |
//! | `retrowave:estimation_zone_clusters` | histogram | | estimation clusters per (layer, KV head) decode step, mean of one request |
//! | `retrowave:wave_tokens_total` | counter | `zone` = exact, estimated, context | tokens attended exactly, estimated, and what dense attention would have read |
//! | `retrowave:http_errors_total` | counter | `status` | requests answered with an error status |

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicU64, Ordering};

use retrowave_core::WaveStats;
use retrowave_engine::{EngineStats, FinishReason, Usage};

pub const NUM_REQUESTS_RUNNING: &str = "retrowave:num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "retrowave:num_requests_waiting";
pub const PROMPT_TOKENS: &str = "retrowave:prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "retrowave:generation_tokens_total";
pub const REQUEST_SUCCESS: &str = "retrowave:request_success_total";
pub const TIME_TO_FIRST_TOKEN: &str = "retrowave:time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "retrowave:inter_token_latency_seconds";
pub const E2E_LATENCY: &str = "retrowave:e2e_request_latency_seconds";
pub const QUEUE_TIME: &str = "retrowave:request_queue_time_seconds";
pub const KV_CACHE_USAGE: &str = "retrowave:kv_cache_usage_perc";
pub const KV_CACHE_TOKENS: &str = "retrowave:kv_cache_tokens";
pub const WAVE_BUFFER_HIT_RATIO: &str = "retrowave:wave_buffer_hit_ratio";
pub const WAVE_BUFFER_PAGES: &str = "retrowave:wave_buffer_pages_total";
pub const KV_BYTES_MOVED: &str = "retrowave:kv_bytes_moved_total";
pub const INDEX_BUILD_SECONDS: &str = "retrowave:index_build_seconds";
pub const RETRIEVAL_ZONE: &str = "retrowave:retrieval_zone_clusters";
pub const ESTIMATION_ZONE: &str = "retrowave:estimation_zone_clusters";
pub const WAVE_TOKENS: &str = "retrowave:wave_tokens_total";
pub const HTTP_ERRORS: &str = "retrowave:http_errors_total";

/// KV tiers, for `kv_cache_usage_perc`.
const TIERS: [&str; 3] = ["device", "host", "disk"];
/// `(tier, link)` pairs of `kv_bytes_moved_total`.
const LINKS: [(&str, &str); 3] = [
    ("device", "attention_read"),
    ("host", "host_to_device"),
    ("disk", "disk_to_host"),
];
const REASONS: [&str; 5] = ["stop", "length", "timeout", "cancelled", "abort"];

/// Installs the global Prometheus recorder (histogram buckets as vLLM's), describes every metric
/// and creates every series at zero, so that a scrape shows them all from the start.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let latency = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ];
    let itl = [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ];
    let request = [
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
        240.0, 480.0, 960.0, 1920.0, 7680.0,
    ];
    let build = [
        0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ];
    let zone = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TIME_TO_FIRST_TOKEN.into()), &latency)?
        .set_buckets_for_metric(Matcher::Full(INTER_TOKEN_LATENCY.into()), &itl)?
        .set_buckets_for_metric(Matcher::Full(E2E_LATENCY.into()), &request)?
        .set_buckets_for_metric(Matcher::Full(QUEUE_TIME.into()), &request)?
        .set_buckets_for_metric(Matcher::Full(INDEX_BUILD_SECONDS.into()), &build)?
        .set_buckets_for_metric(Matcher::Full(RETRIEVAL_ZONE.into()), &zone)?
        .set_buckets_for_metric(Matcher::Full(ESTIMATION_ZONE.into()), &zone)?
        .install_recorder()?;
    describe();
    // The tiered store's series (CPU workers with a disk tier) get their help text too.
    retrowave_store::metrics::describe();
    init_series();
    Ok(handle)
}

/// Registers the help text of every metric with the installed recorder.
pub fn describe() {
    describe_gauge!(
        NUM_REQUESTS_RUNNING,
        "Requests running (admitted, with a KV slot)"
    );
    describe_gauge!(NUM_REQUESTS_WAITING, "Requests waiting for admission");
    describe_counter!(
        PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens of finished requests"
    );
    describe_counter!(
        GENERATION_TOKENS,
        Unit::Count,
        "Generated tokens of finished requests"
    );
    describe_counter!(REQUEST_SUCCESS, "Finished requests by finish reason");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        "Time from arrival to the first token in seconds"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        "Time between consecutive tokens in seconds"
    );
    describe_histogram!(
        E2E_LATENCY,
        "Time from arrival to the end of a request in seconds"
    );
    describe_histogram!(QUEUE_TIME, "Time a request waited for admission in seconds");
    describe_gauge!(
        KV_CACHE_USAGE,
        "Share (0..1) of the KV capacity of a tier in use"
    );
    describe_gauge!(
        KV_CACHE_TOKENS,
        "KV tokens reserved by or cached for running requests"
    );
    describe_gauge!(
        WAVE_BUFFER_HIT_RATIO,
        "Share of retrieval-cluster pages served by the wave buffers after their first step"
    );
    describe_counter!(
        WAVE_BUFFER_PAGES,
        "Retrieval-cluster pages found in the wave buffers (hit) or read from the host tier (miss)"
    );
    describe_counter!(
        KV_BYTES_MOVED,
        "Bytes of KV data read or moved, by tier and link"
    );
    describe_histogram!(
        INDEX_BUILD_SECONDS,
        "Wave index build time after a prefill in seconds"
    );
    describe_histogram!(
        RETRIEVAL_ZONE,
        "Retrieval-zone clusters per head step (mean of a request)"
    );
    describe_histogram!(
        ESTIMATION_ZONE,
        "Estimation-zone clusters per head step (mean of a request)"
    );
    describe_counter!(
        WAVE_TOKENS,
        "Tokens of wave attention by zone, summed over head steps"
    );
    describe_counter!(HTTP_ERRORS, "Requests answered with an error status");
}

/// Creates every unlabelled and labelled series at zero.
fn init_series() {
    set_engine_stats(&EngineStats::default());
    for c in [PROMPT_TOKENS, GENERATION_TOKENS] {
        counter!(c).absolute(0);
    }
    for r in REASONS {
        counter!(REQUEST_SUCCESS, "finished_reason" => r).absolute(0);
    }
    for (tier, link) in LINKS {
        counter!(KV_BYTES_MOVED, "tier" => tier, "link" => link).absolute(0);
    }
    for zone in ["exact", "estimated", "context"] {
        counter!(WAVE_TOKENS, "zone" => zone).absolute(0);
    }
    for result in ["hit", "miss"] {
        counter!(WAVE_BUFFER_PAGES, "result" => result).absolute(0);
    }
    gauge!(WAVE_BUFFER_HIT_RATIO).set(0.0);
    for h in [
        TIME_TO_FIRST_TOKEN,
        INTER_TOKEN_LATENCY,
        E2E_LATENCY,
        QUEUE_TIME,
        INDEX_BUILD_SECONDS,
        RETRIEVAL_ZONE,
        ESTIMATION_ZONE,
    ] {
        // Registering the histogram is enough for it to be rendered with empty buckets.
        let _ = histogram!(h);
    }
}

/// Sets the gauges of the engine's state.
pub fn set_engine_stats(s: &EngineStats) {
    gauge!(NUM_REQUESTS_RUNNING).set(s.running as f64);
    gauge!(NUM_REQUESTS_WAITING).set(s.waiting as f64);
    gauge!(KV_CACHE_TOKENS, "state" => "reserved").set(s.kv_reserved_tokens as f64);
    gauge!(KV_CACHE_TOKENS, "state" => "cached").set(s.kv_cached_tokens as f64);
    let device = if s.kv_budget_tokens > 0 {
        s.kv_reserved_tokens as f64 / s.kv_budget_tokens as f64
    } else {
        0.0
    };
    for tier in TIERS {
        let v = if tier == "device" { device } else { 0.0 };
        gauge!(KV_CACHE_USAGE, "tier" => tier).set(v);
    }
}

/// The label of a finish reason; `client_gone` tells a client's cancellation from an abort.
pub fn reason_label(reason: FinishReason, client_gone: bool) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::Timeout => "timeout",
        FinishReason::Cancelled if client_gone => "cancelled",
        FinishReason::Cancelled => "abort",
    }
}

/// Records a finished request: token counters, latency histograms and wave counters.
pub fn record_finished(usage: &Usage, reason: &'static str, e2e_seconds: f64) {
    counter!(PROMPT_TOKENS).increment(usage.prompt_tokens as u64);
    counter!(GENERATION_TOKENS).increment(usage.completion_tokens as u64);
    counter!(REQUEST_SUCCESS, "finished_reason" => reason).increment(1);
    histogram!(E2E_LATENCY).record(e2e_seconds);
    histogram!(QUEUE_TIME).record(usage.queued.as_secs_f64());
    if let Some(w) = &usage.wave {
        record_wave(w);
    }
}

fn record_wave(w: &WaveStats) {
    histogram!(INDEX_BUILD_SECONDS).record(w.build_seconds);
    if w.head_steps > 0 {
        let steps = w.head_steps as f64;
        histogram!(RETRIEVAL_ZONE).record(w.retrieval_clusters as f64 / steps);
        histogram!(ESTIMATION_ZONE).record(w.estimation_clusters as f64 / steps);
    }
    counter!(WAVE_TOKENS, "zone" => "exact").increment(w.exact_tokens);
    counter!(WAVE_TOKENS, "zone" => "estimated").increment(w.estimated_tokens);
    counter!(WAVE_TOKENS, "zone" => "context").increment(w.context_tokens);
    counter!(KV_BYTES_MOVED, "tier" => "device", "link" => "attention_read")
        .increment(w.bytes_read);
    counter!(KV_BYTES_MOVED, "tier" => "host", "link" => "host_to_device")
        .increment(w.host_to_device_bytes);
    counter!(WAVE_BUFFER_PAGES, "result" => "hit").increment(w.cache_hit_pages);
    counter!(WAVE_BUFFER_PAGES, "result" => "miss").increment(w.cache_miss_pages);
    if let Some(ratio) = BUFFER_PAGES.add(w) {
        gauge!(WAVE_BUFFER_HIT_RATIO).set(ratio);
    }
}

/// The wave buffers' pages over every finished request: hits, and pages of warm steps (hits and
/// misses after each head's first, cold step), for the hit ratio gauge.
struct BufferPages {
    hit: AtomicU64,
    warm: AtomicU64,
}

static BUFFER_PAGES: BufferPages = BufferPages {
    hit: AtomicU64::new(0),
    warm: AtomicU64::new(0),
};

impl BufferPages {
    /// Adds a request's pages; the hit ratio so far, once any warm page was read.
    fn add(&self, w: &WaveStats) -> Option<f64> {
        let warm = (w.cache_hit_pages + w.cache_miss_pages).saturating_sub(w.cache_cold_pages);
        let hit = self.hit.fetch_add(w.cache_hit_pages, Ordering::Relaxed) + w.cache_hit_pages;
        let warm = self.warm.fetch_add(warm, Ordering::Relaxed) + warm;
        (warm > 0).then(|| hit as f64 / warm as f64)
    }
}

/// Records the time to the first token of a request.
pub fn record_first_token(seconds: f64) {
    histogram!(TIME_TO_FIRST_TOKEN).record(seconds);
}

/// Records the time between two tokens of a request.
pub fn record_inter_token(seconds: f64) {
    histogram!(INTER_TOKEN_LATENCY).record(seconds);
}

/// Counts a request answered with an error status.
pub fn record_http_error(status: u16) {
    counter!(HTTP_ERRORS, "status" => status.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished request's wave counters reach the exposition: the buffers' pages, the hit ratio
    /// so far and the bytes that crossed PCIe (with a local recorder, as the server's is global).
    #[test]
    fn wave_buffer_counters_reach_the_exposition() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let w = WaveStats {
            cache_hit_pages: 180,
            cache_miss_pages: 30,
            cache_cold_pages: 10,
            host_to_device_bytes: 30 * 4096,
            ..WaveStats::default()
        };
        metrics::with_local_recorder(&recorder, || record_wave(&w));
        let text = handle.render();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
        };
        assert_eq!(
            value("retrowave:wave_buffer_pages_total{result=\"hit\"}"),
            180.0
        );
        assert_eq!(
            value("retrowave:wave_buffer_pages_total{result=\"miss\"}"),
            30.0
        );
        assert_eq!(
            value("retrowave:kv_bytes_moved_total{tier=\"host\",link=\"host_to_device\"}"),
            122880.0
        );
        // 180 of the 200 warm pages (the first step's 10 misses are not counted; this is the
        // only test of the process that records wave counters, whose sums are process-wide).
        let ratio = value("retrowave:wave_buffer_hit_ratio");
        assert!((ratio - 0.9).abs() < 1e-12, "{ratio}");
    }
}
