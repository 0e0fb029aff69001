use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tower_layer::Layer;

use super::service::Extras;
use super::{AsyncMode, Idempotency, StaleGuard};
use crate::engine::Engine;
use crate::policy::RouteTable;

/// Applies [`Idempotency`] to a service.
#[derive(Debug)]
pub struct IdempotencyLayer<St> {
    engine: Engine<St>,
    routes: Arc<RouteTable>,
    extras: Extras,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            routes: Arc::clone(&self.routes),
            extras: self.extras.clone(),
        }
    }
}

impl<St> IdempotencyLayer<St> {
    /// A layer running requests through `engine` with `routes`' policies.
    #[must_use]
    pub fn new(engine: Engine<St>, routes: RouteTable) -> Self {
        Self {
            engine,
            routes: Arc::new(routes),
            extras: Extras::default(),
        }
    }

    /// Keeps the versions of routes with a stale-event guard
    /// ([`StalePolicy`](crate::policy::StalePolicy)) in `guard`'s store
    /// (protocol §13; see [`StaleGuard`]).
    #[must_use]
    pub fn stale_guard(mut self, guard: StaleGuard) -> Self {
        self.extras.stale_guard = Some(guard);
        self
    }

    /// Serves `mode = "async"` routes with `202 Accepted` into `mode`'s
    /// queue, and answers every path under `/_idem/` itself (protocol §9; see
    /// [`AsyncMode`]). Without it, async routes are served synchronously.
    #[must_use]
    pub fn async_mode(mut self, mode: AsyncMode) -> Self {
        self.extras.async_mode = Some(mode);
        self
    }

    /// Counts every guarded request's execution (reserve, the inner call,
    /// storing its answer) on `tasks`, a [`TaskTracker`] the server owns,
    /// from its start; when its client hangs up mid-execution, the rest of
    /// it is spawned onto `tasks` instead of a bare Tokio task. The
    /// execution outlives the client either way; the server can now also
    /// wait for it at shutdown (`tasks.close()`, then `tasks.wait()`), as
    /// `idem serve` does.
    #[must_use]
    pub fn tasks(mut self, tasks: TaskTracker) -> Self {
        self.extras.tasks = Some(tasks);
        self
    }
}

impl<Svc, St> Layer<Svc> for IdempotencyLayer<St> {
    type Service = Idempotency<Svc, St>;

    fn layer(&self, inner: Svc) -> Self::Service {
        Idempotency::new(inner, self.engine.clone(), Arc::clone(&self.routes))
            .with_extras(self.extras.clone())
    }
}
