//! The FleetLock server: `driftless fleet serve-fleetlock`.
//!
//! A slot is a permit of the fleet's etcd semaphore, `P/permits/<group>/<id>`,
//! without a lease (FleetLock's rule: a host that does not come back keeps
//! its slot until an operator deletes it, so its group stops instead of
//! rebooting more hosts into the same failure). Because it is the same
//! semaphore, a zincati host holding a slot blocks driftless hosts of the
//! group and the other way round, each side counting every key of the
//! group against its own limit, and `driftless fleet status` lists the
//! slot as `id (fleetlock)`. `driftless suspend` stops slots too (a
//! holder's as well: it waits). A slot's value marks it as one
//! ([`super::slot_value`]): an id whose key is a driftless host's permit
//! is refused, and that permit is never given back from here.
//!
//! The server keeps no state of its own: it can be restarted, or run
//! twice behind a load balancer, at any moment. It is reachable by anyone
//! who can reach its address (the protocol has no authentication), so
//! each request is bounded: [`super::MAX_BODY`] bytes, headers within
//! [`READ_TIMEOUT`], the body within the same, at most [`MAX_CONNECTIONS`]
//! connections at once (more are closed at once), and ids and groups
//! checked before they become key parts.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{parse_request, ClientParams, ErrorBody, HEADER, MAX_BODY, PRE_REBOOT, STEADY_STATE};
use crate::config::FleetSettings;
use crate::effects::fleet::{SlotTaken, Store};

/// Headers, and then the body, must arrive within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// A request's etcd work must end within this: less than a client's own
/// timeout (driftless: 10 s), so that a slot is not granted to a client
/// that gave up waiting for the answer.
pub const STORE_DEADLINE: Duration = Duration::from_secs(8);

/// How many slots each group has.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Groups not named in `per_group`.
    pub default: u32,
    pub per_group: BTreeMap<String, u32>,
}

impl Limits {
    fn of(&self, group: &str) -> u32 {
        self.per_group.get(group).copied().unwrap_or(self.default)
    }
}

struct Shared {
    fleet: FleetSettings,
    limits: Limits,
    /// The etcd connection, opened on first use and dropped after an
    /// error (the next request connects again); cloned for each request.
    store: Mutex<Option<Store>>,
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    fleet: FleetSettings,
    limits: Limits,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let shared = Arc::new(Shared {
        fleet,
        limits,
        store: Mutex::new(None),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning.
                    warn!("fleetlock: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "fleetlock: {MAX_CONNECTIONS} connections open; closing this one");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                // One request per connection (FleetLock clients make one
                // call at a time): no idle connection holds a slot.
                .keep_alive(false)
                // hyper's smallest read buffer: requests are ~200 bytes.
                .max_buf_size(8192)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, "fleetlock: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

fn answer(status: StatusCode, body: Option<ErrorBody>) -> Response<Full<Bytes>> {
    let Some(body) = body else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = status;
        return r;
    };
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, kind: &str, value: impl Into<String>) -> Response<Full<Bytes>> {
    answer(
        status,
        Some(ErrorBody {
            kind: kind.to_string(),
            value: value.into(),
        }),
    )
}

async fn handle(
    shared: &Shared,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let lock = match path.as_str() {
        PRE_REBOOT => true,
        STEADY_STATE => false,
        _ => {
            return refuse(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such endpoint; FleetLock has POST {PRE_REBOOT} and POST {STEADY_STATE}"
                ),
            )
        }
    };
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} takes POST"),
        );
    }
    if req.headers().get(HEADER).map(|v| v.as_bytes()) != Some(b"true") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "missing_fleet_lock_header",
            format!("the request lacks the header `{HEADER}: true`"),
        );
    }
    let body = tokio::time::timeout(
        READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await;
    let body = match body {
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {READ_TIMEOUT:?}"),
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {MAX_BODY} bytes"),
            )
        }
        Ok(Err(e)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("cannot read the body: {e}"),
            )
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let params = match parse_request(&body) {
        Ok(p) => p,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_client_params", why),
    };
    let result = if lock {
        take(shared, &params).await
    } else {
        give_back(shared, &params).await
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            warn!(%peer, id = %params.id, group = %params.group, "fleetlock: etcd: {e:#}");
            *shared.store.lock().await = None;
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the server cannot reach its etcd now; try again later",
            )
        }
    }
}

/// Runs `f` on the store (connecting first if needed), within
/// [`STORE_DEADLINE`]. The lock is held only to connect: requests go to
/// etcd side by side, each on a clone of the connection.
async fn with_store<T>(
    shared: &Shared,
    f: impl FnOnce(Store) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>,
) -> Result<T> {
    let work = async {
        let store = {
            let mut guard = shared.store.lock().await;
            if guard.is_none() {
                *guard = Some(Store::connect(&shared.fleet).await?);
            }
            guard
                .clone()
                .ok_or_else(|| anyhow::anyhow!("no etcd connection"))?
        };
        f(store).await
    };
    tokio::time::timeout(STORE_DEADLINE, work)
        .await
        .map_err(|_| anyhow::anyhow!("etcd did not answer within {STORE_DEADLINE:?}"))?
}

async fn take(shared: &Shared, p: &ClientParams) -> Result<Response<Full<Bytes>>> {
    let max = shared.limits.of(&p.group);
    let value = super::slot_value(&p.id, crate::time::now());
    let (group, id) = (p.group.clone(), p.id.clone());
    let outcome = with_store(shared, move |mut s| {
        Box::pin(async move {
            // Suspended: no slot, also not again to its holder (it waits,
            // as a driftless host of a suspended group does).
            let view = s.suspensions().await?;
            if let Some((key, sus)) = crate::rollout::decide::suspension(&view, &group) {
                return Ok(Err((
                    "failed_lock_suspended",
                    format!(
                        "rollouts of group {key} are suspended by {}{}; `driftless resume` lifts it",
                        sus.by,
                        if sus.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", sus.reason)
                        }
                    ),
                )));
            }
            Ok(match s.take_fleetlock_slot(&group, &id, max, &value).await? {
                SlotTaken::Granted => Ok(()),
                SlotTaken::Full { held } => Err((
                    "failed_lock_semaphore_full",
                    format!("all slots of group {group} are taken ({held} held, {max} allowed)"),
                )),
                SlotTaken::Contended => Err((
                    "failed_lock_contended",
                    format!("other hosts of group {group} took slots at the same moment; try again"),
                )),
                SlotTaken::InUse => Err((
                    "failed_lock_id_in_use",
                    format!("id {id} holds a permit of group {group} that is not a FleetLock slot (a driftless host of that name); use another id"),
                )),
            })
        })
    })
    .await?;
    Ok(match outcome {
        Ok(()) => {
            info!(id = %p.id, group = %p.group, "fleetlock: slot granted");
            answer(StatusCode::OK, None)
        }
        Err((kind, value)) => {
            // Not `info`: anyone who reaches the server can ask.
            debug!(id = %p.id, group = %p.group, "fleetlock: slot refused: {value}");
            refuse(StatusCode::CONFLICT, kind, value)
        }
    })
}

async fn give_back(shared: &Shared, p: &ClientParams) -> Result<Response<Full<Bytes>>> {
    let (group, id) = (p.group.clone(), p.id.clone());
    let released = with_store(shared, move |mut s| {
        Box::pin(async move { s.release_fleetlock_slot(&group, &id).await })
    })
    .await?;
    if released {
        info!(id = %p.id, group = %p.group, "fleetlock: slot given back");
    } else {
        debug!(id = %p.id, group = %p.group, "fleetlock: no slot of this id held; nothing to give back");
    }
    Ok(answer(StatusCode::OK, None))
}
