//! The HTTP front door: HTTP/1.1 with `Content-Length` bodies, one request per connection
//! (`Connection: close`), parsed by `httparse`; a thread per connection, which waits for its
//! request's answer and cancels the request when the client goes away. Routes:
//! `POST /v1/samples` (the native schema), `POST /v1/images/generations` (OpenAI's images
//! API), `DELETE /v1/samples/{id}`, `GET /health`, `GET /metrics`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};

use super::{Event, Failure, OpenAiRequest, Request, Server};

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 << 10;
/// Largest request body.
const MAX_BODY: usize = 1 << 20;
/// Connections served at once; more are answered 503.
const MAX_CONNECTIONS: usize = 256;
/// How often a waiting connection checks that its client is still there.
const POLL: Duration = Duration::from_millis(50);

/// Listens on `addr` and serves until the process ends; prints `listening on http://ADDR`
/// (the port chosen, for port 0) on stderr once it accepts connections.
pub fn serve(server: Arc<Server>, addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(Error::io(format!("listening on {addr}")))?;
    let local = listener
        .local_addr()
        .map_err(Error::io("reading the bound address"))?;
    eprintln!("edgediff serve: listening on http://{local}");
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::SeqCst);
            let f = Failure::new(
                "busy",
                format!("more than {MAX_CONNECTIONS} connections; retry later"),
            );
            let _ = respond(&mut stream, &failure_response(&f));
            continue;
        }
        let (server, live) = (server.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name("edgediff-http".into())
            .spawn(move || {
                connection(&server, stream);
                live.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            log::error!("serve: cannot start a connection thread");
        }
    }
    Ok(())
}

struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

fn json_response(status: u16, v: &Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: v.to_string().into_bytes(),
    }
}

/// The HTTP status of a failure's code.
fn status_of(code: &str) -> u16 {
    match code {
        "argument" | "model" | "io" | "bad_request" => 400,
        "not_found" => 404,
        "cancelled" => 409,
        "too_large" => 413,
        "busy" => 503,
        _ => 500,
    }
}

fn failure_response(f: &Failure) -> Response {
    let event = Event::Failed {
        id: None,
        failure: f.clone(),
    };
    json_response(status_of(f.code), &event.to_json())
}

fn connection(server: &Server, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let response = match read_request(&mut stream) {
        Ok(req) => route(server, &req, &stream),
        Err(f) => Some(failure_response(&f)),
    };
    if let Some(r) = response {
        let _ = respond(&mut stream, &r);
    }
}

fn respond(stream: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&r.body)?;
    stream.flush()
}

/// Reads one request: its head (parsed by httparse) and its `Content-Length` body.
fn read_request(stream: &mut TcpStream) -> std::result::Result<HttpRequest, Failure> {
    let bad = |m: String| Failure::new("bad_request", m);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let k = stream
            .read(&mut chunk)
            .map_err(|e| bad(format!("reading the request: {e}")))?;
        if k == 0 {
            return Err(bad(
                "the connection closed before the request's head ended".into()
            ));
        }
        buf.extend_from_slice(&chunk[..k]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
                };
                if header("transfer-encoding").is_some() {
                    return Err(bad(
                        "chunked bodies are not taken; send Content-Length".into()
                    ));
                }
                let len: usize = match header("content-length") {
                    None => 0,
                    Some(v) => v
                        .parse()
                        .map_err(|_| bad(format!("Content-Length '{v}' is not a number")))?,
                };
                if len > MAX_BODY {
                    return Err(Failure::new(
                        "too_large",
                        format!("the body has {len} bytes; at most {MAX_BODY}"),
                    ));
                }
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                    let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                let mut body = buf[head_len..].to_vec();
                while body.len() < len {
                    let k = stream
                        .read(&mut chunk)
                        .map_err(|e| bad(format!("reading the body: {e}")))?;
                    if k == 0 {
                        return Err(bad("the connection closed before the body ended".into()));
                    }
                    body.extend_from_slice(&chunk[..k]);
                }
                body.truncate(len);
                return Ok(HttpRequest { method, path, body });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(Failure::new(
                    "too_large",
                    format!("the request head passes {MAX_HEAD} bytes"),
                ))
            }
            Err(e) => return Err(bad(format!("not an HTTP request: {e}"))),
        }
    }
}

/// The response to `req`; None when the client left before its answer.
fn route(server: &Server, req: &HttpRequest, stream: &TcpStream) -> Option<Response> {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", "/health") => Some(json_response(200, &server.health())),
        ("GET", "/metrics") => Some(Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: server.metrics_text().into_bytes(),
        }),
        ("POST", "/v1/samples") => {
            match body_json(&req.body).and_then(Failure::decode::<Request>) {
                Ok(r) => wait(server, r, stream).map(|e| {
                    let status = match &e {
                        Event::Failed { failure, .. } => status_of(failure.code),
                        _ => 200,
                    };
                    json_response(status, &e.to_json())
                }),
                Err(failure) => Some(counted(server, failure)),
            }
        }
        ("POST", "/v1/images/generations") => {
            let native = body_json(&req.body)
                .and_then(Failure::decode::<OpenAiRequest>)
                .and_then(|o| {
                    o.native(server.new_id(), server.out_dir())
                        .map_err(|e| Failure::from(&e))
                });
            match native {
                Ok(r) => wait(server, r, stream).map(openai_answer),
                Err(failure) => {
                    server.metrics().outcome(failure.code);
                    Some(openai_answer(Event::Failed { id: None, failure }))
                }
            }
        }
        ("DELETE", p) if p.starts_with("/v1/samples/") => {
            let id = &p["/v1/samples/".len()..];
            if server.cancel(id) {
                Some(json_response(
                    200,
                    &Event::Cancel {
                        id: id.into(),
                        found: true,
                    }
                    .to_json(),
                ))
            } else {
                let f = Failure::new(
                    "not_found",
                    format!("no request '{id}' is queued or running"),
                );
                Some(failure_response(&f))
            }
        }
        (m, p) => Some(failure_response(&Failure::new(
            "not_found",
            format!("no route {m} {p}"),
        ))),
    }
}

/// A refusal before queueing, counted among the outcomes.
fn counted(server: &Server, f: Failure) -> Response {
    server.metrics().outcome(f.code);
    failure_response(&f)
}

/// Queues `req` and waits for its answer; cancels it and returns None if the client
/// disconnects first.
fn wait(server: &Server, req: Request, stream: &TcpStream) -> Option<Event> {
    let (tx, rx) = channel();
    let id = server.submit(req, tx);
    let mut checked = std::time::Instant::now();
    loop {
        match rx.recv_timeout(POLL) {
            Ok(e) if e.is_final() => return Some(e),
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let f = Failure::new("internal", "the worker stopped without answering");
                return Some(Event::Failed {
                    id: Some(id),
                    failure: f,
                });
            }
        }
        // Checked every POLL, whether or not progress events arrive in between.
        if checked.elapsed() >= POLL {
            if client_gone(stream) {
                log::info!("serve: the client of {id} disconnected; cancelling it");
                server.cancel(&id);
                return None;
            }
            checked = std::time::Instant::now();
        }
    }
}

/// Whether the peer closed the connection (a read would see its end, or an error).
fn client_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let gone = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    gone
}

/// The OpenAI images API's answer: `{"created", "data": [{"b64_json"} or {"url"}]}`, and its
/// error shape `{"error": {"message", "type", "code"}}`.
fn openai_answer(e: Event) -> Response {
    match e {
        Event::Done { body, .. } => {
            let data: Vec<Value> = match (body.get("images"), body.get("files")) {
                (Some(Value::Array(images)), _) => {
                    images.iter().map(|b| json!({"b64_json": b})).collect()
                }
                (_, Some(Value::Array(files))) => files
                    .iter()
                    .map(|f| json!({"url": format!("file://{}", f.as_str().unwrap_or(""))}))
                    .collect(),
                _ => Vec::new(),
            };
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            json_response(200, &json!({"created": created, "data": data}))
        }
        Event::Failed { failure, .. } => json_response(
            status_of(failure.code),
            &json!({"error": {"message": failure.message, "type": "invalid_request_error", "code": failure.code, "param": failure.field}}),
        ),
        other => json_response(500, &other.to_json()),
    }
}

/// A request body as JSON (malformed: a `bad_request`).
fn body_json(body: &[u8]) -> std::result::Result<Value, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::new("bad_request", format!("bad request: not JSON: {e}")))
}
