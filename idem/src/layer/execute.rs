//! Phase 4, *run*: the engine reserves the key and, if this request wins,
//! calls the inner service, buffers its response and decides what the store
//! keeps (SPEC §3.8–9).

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use std::sync::Arc;
use tower_service::Service;

use super::response::{capture, problem};
use super::service::Identity;
use super::{ResponseBody, UpstreamFailure};
use crate::engine::{Action, Engine, Finish, Outcome};
use crate::policy::{Ambiguous, RoutePolicy};
use crate::problem::ProblemCode;
use crate::store::{BoxError, Store};

/// What the inner service answered, as the caller gets it.
type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// Runs `req` through the engine: executed here at most once per key.
pub(super) async fn run<Svc, St, ReqB, ResB>(
    engine: Engine<St>,
    mut inner: Svc,
    identity: Identity,
    policy: Arc<RoutePolicy>,
    req: Request<Bytes>,
) -> Outcome<Answer<ResB, Svc::Error>>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: From<Bytes>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
    St: Store,
{
    let Identity {
        key,
        fingerprint,
        rules,
    } = identity;
    let op = || async move { execute(&mut inner, req.map(ReqB::from), &policy).await };
    engine.run(&key, fingerprint, &rules, op).await
}

/// Calls the inner service and decides what the store keeps (SPEC §3.9).
async fn execute<Svc, ReqB, ResB>(
    inner: &mut Svc,
    req: Request<ReqB>,
    policy: &RoutePolicy,
) -> Finish<Answer<ResB, Svc::Error>>
where
    Svc: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(e) => {
            return Finish {
                output: Err(e),
                action: Action::Release,
            }
        }
    };
    let failure = res.extensions().get::<UpstreamFailure>().copied();
    let (parts, body) = res.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Finish {
                output: Ok(problem(
                    ProblemCode::UpstreamUnavailable,
                    "the response body failed while it was being read",
                )),
                action: Action::Release,
            }
        }
    };
    let stored = || capture(parts.status, &parts.headers, bytes.clone());
    let action = match failure {
        Some(UpstreamFailure::Unreachable) => Action::Release,
        Some(UpstreamFailure::Timeout | UpstreamFailure::Reset) => match policy.ambiguous {
            Ambiguous::Hold => Action::Hold,
            Ambiguous::Release => Action::Release,
            Ambiguous::Store => Action::Store(stored()),
        },
        None if policy.store_statuses.contains(parts.status.as_u16()) => Action::Store(stored()),
        None => Action::Release,
    };
    Finish {
        output: Ok(Response::from_parts(parts, ResponseBody::full(bytes))),
        action,
    }
}
