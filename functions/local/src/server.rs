//! Serves the API functions over HTTP on 127.0.0.1: each request becomes the same
//! `lambda_http::Request` API Gateway would produce and goes to the same handler.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use kiln_api::{Api, Function};
use lambda_http::Body;
use std::{convert::Infallible, future::Future, sync::Arc};
use tokio::net::TcpListener;
use tracing::warn;

/// API Gateway's own payload limit; the API's (smaller) limit is enforced by the handler.
const GATEWAY_MAX_BODY: usize = 10 * 1024 * 1024;

/// Accepts connections until `shutdown` resolves.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(api.clone(), request));
            if let Err(err) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                warn!(error = %err, "connection error");
            }
        });
    }
}

async fn handle(api: Arc<Api>, request: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = match Limited::new(body, GATEWAY_MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let mut response = hyper::Response::new(Full::new(Bytes::from_static(
                br#"{"error":{"code":"body_too_large","message":"the body is larger than 10 MiB","field":null}}"#,
            )));
            *response.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
            return Ok(response);
        }
    };
    let body = if bytes.is_empty() {
        Body::Empty
    } else {
        match String::from_utf8(bytes.to_vec()) {
            Ok(text) => Body::Text(text),
            Err(err) => Body::Binary(err.into_bytes()),
        }
    };
    let response = api.handle(Function::All, http::Request::from_parts(parts, body)).await;
    let (parts, body) = response.into_parts();
    let bytes = match body {
        Body::Empty => Bytes::new(),
        Body::Text(text) => Bytes::from(text),
        Body::Binary(binary) => Bytes::from(binary),
        _ => Bytes::new(),
    };
    Ok(hyper::Response::from_parts(parts, Full::new(bytes)))
}
