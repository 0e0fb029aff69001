use std::sync::Arc;

use tower_layer::Layer;

use super::Idempotency;
use crate::engine::Engine;
use crate::policy::RouteTable;

/// Applies [`Idempotency`] to a service.
#[derive(Debug)]
pub struct IdempotencyLayer<St> {
    engine: Engine<St>,
    routes: Arc<RouteTable>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            routes: Arc::clone(&self.routes),
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
        }
    }
}

impl<Svc, St> Layer<Svc> for IdempotencyLayer<St> {
    type Service = Idempotency<Svc, St>;

    fn layer(&self, inner: Svc) -> Self::Service {
        Idempotency::new(inner, self.engine.clone(), Arc::clone(&self.routes))
    }
}
