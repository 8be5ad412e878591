//! The collector's HTTP side (tiny_http, a few worker threads).
//!
//! ```text
//! POST /v1/report              a signed report (fleet_agent::report::wire)
//! GET  /v1/fleet               the fleet view as JSON
//! GET  /v1/hosts/<host>/history  a host's stored reports, oldest first
//! GET  /metrics                the fleet for Prometheus
//! GET  /healthz                200 while the collector runs
//! ```
//!
//! Refusals answer with a JSON body `{"error": "<code>", "message": "…"}` and the status of
//! [`ReportRejection::status`]: 400 malformed or wrong fleet, 403 unknown host, forged or cross-host,
//! 409 replay, 413 too large, 429 rate limited; 500 when the database failed.

use super::{Collector, Refusal};
use fleet_agent::report::wire::{MAX_REPORT_BYTES, REPORT_PATH, SIGNATURE_HEADER};
use fleet_agent::report::ReportRejection;
use std::io::Read as _;
use std::sync::Arc;
use tiny_http::{Header, Method, Request, Response};

fn now() -> u64 {
    crate::command::now()
}

fn json_header() -> Header {
    Header::from_bytes("Content-Type", "application/json").expect("valid header")
}

fn reply(request: Request, status: u16, body: String, content_type: Header) {
    let response = Response::from_string(body)
        .with_status_code(status)
        .with_header(content_type);
    if let Err(e) = request.respond(response) {
        log::debug!("cannot answer: {e}");
    }
}

fn reply_json(request: Request, status: u16, value: &serde_json::Value) {
    reply(request, status, value.to_string(), json_header());
}

fn refuse(request: Request, peer: &str, rejection: &ReportRejection) {
    log::warn!("refused a report from {peer}: {rejection}");
    reply_json(
        request,
        rejection.status(),
        &serde_json::json!({"error": rejection.code(), "message": rejection.to_string()}),
    );
}

/// Serves until the process ends: `workers` threads take requests off one listener.
pub fn serve(server: Arc<tiny_http::Server>, collector: Arc<Collector>, workers: usize) {
    let threads: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let server = server.clone();
            let collector = collector.clone();
            std::thread::spawn(move || loop {
                match server.recv() {
                    Ok(request) => {
                        // A bug in one request must not take a worker away for good.
                        let handled =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                handle(&collector, request)
                            }));
                        if handled.is_err() {
                            log::error!("a request handler panicked; the worker goes on");
                        }
                    }
                    Err(e) => {
                        log::error!("collector listener failed: {e}");
                        return;
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

fn handle(collector: &Collector, mut request: Request) {
    let peer = request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), ToString::to_string);
    let url = request.url().to_owned();
    let path = url.split('?').next().unwrap_or_default();
    match (request.method(), path) {
        (Method::Post, REPORT_PATH) => {
            if request.body_length().is_some_and(|n| n > MAX_REPORT_BYTES) {
                let rejection = ReportRejection::TooLarge {
                    got: request.body_length().unwrap_or_default(),
                };
                collector.refused_early(&rejection);
                return refuse(request, &peer, &rejection);
            }
            let mut body = Vec::new();
            let read = request
                .as_reader()
                .take(MAX_REPORT_BYTES as u64 + 1)
                .read_to_end(&mut body);
            if let Err(e) = read {
                let rejection = ReportRejection::Malformed(format!("cannot read the body: {e}"));
                collector.refused_early(&rejection);
                return refuse(request, &peer, &rejection);
            }
            let signature = request
                .headers()
                .iter()
                .find(|h| h.field.equiv(SIGNATURE_HEADER))
                .map(|h| h.value.as_str().to_owned());
            match collector.receive(&body, signature.as_deref(), &peer, now()) {
                Ok(report) => {
                    log::debug!(
                        "report {} from {} ({peer}): phase {}",
                        report.counter,
                        report.host,
                        report.phase
                    );
                    reply_json(request, 200, &serde_json::json!({"ok": true}));
                }
                Err(Refusal::Rejected(rejection)) => refuse(request, &peer, &rejection),
                Err(Refusal::Internal(e)) => {
                    log::error!("cannot store a report from {peer}: {e:#}");
                    reply_json(
                        request,
                        500,
                        &serde_json::json!({"error": "internal_error", "message": "the collector cannot store reports right now"}),
                    );
                }
            }
        }
        (Method::Get, "/v1/fleet") => match super::fleet_view(collector, now()) {
            Ok(view) => reply(
                request,
                200,
                serde_json::to_string(&view).expect("view serializes"),
                json_header(),
            ),
            Err(e) => internal(request, &e),
        },
        (Method::Get, "/metrics") => match super::metrics(collector, now()) {
            Ok(text) => reply(
                request,
                200,
                text,
                Header::from_bytes("Content-Type", "text/plain; version=0.0.4")
                    .expect("valid header"),
            ),
            Err(e) => internal(request, &e),
        },
        (Method::Get, "/healthz") => reply_json(request, 200, &serde_json::json!({"ok": true})),
        (Method::Get, path) if path.starts_with("/v1/hosts/") && path.ends_with("/history") => {
            let host = &path["/v1/hosts/".len()..path.len() - "/history".len()];
            match collector.history(host) {
                Ok(rows) => {
                    let reports: Vec<serde_json::Value> = rows
                        .into_iter()
                        .map(|(counter, received_at, report)| {
                            serde_json::json!({
                                "counter": counter,
                                "received_at": received_at,
                                "report": serde_json::from_str::<serde_json::Value>(&report).ok(),
                            })
                        })
                        .collect();
                    reply_json(
                        request,
                        200,
                        &serde_json::json!({ "host": host, "reports": reports }),
                    )
                }
                Err(e) => internal(request, &e),
            }
        }
        _ => reply_json(
            request,
            404,
            &serde_json::json!({"error": "not_found", "message": format!("no {path} here")}),
        ),
    }
}

fn internal(request: Request, error: &anyhow::Error) {
    log::error!("{error:#}");
    reply_json(
        request,
        500,
        &serde_json::json!({"error": "internal_error", "message": error.to_string()}),
    );
}
