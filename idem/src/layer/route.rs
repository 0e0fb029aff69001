//! The first half of phase 1, *resolve*: the request's path in normal form
//! and the route that governs it, found once per request and carried in
//! the request's extensions, so that nothing downstream (the fingerprint,
//! the gateway's proxy) reads another path or matches again.

use std::borrow::Cow;
use std::sync::Arc;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Uri};

use crate::path::{self, PathError};
use crate::policy::{RoutePolicy, RouteTable};

/// How a request was matched against a [`RouteTable`], put into its
/// extensions by [`route`].
///
/// By the time a request whose method participates on some route
/// ([`RouteTable::may_participate`]) carries one, its path is in the normal
/// form of [`crate::path::normalize`] (unless [`RouteMatch::invalid_path`]
/// says it has none), and that form is what the route was matched on, what
/// the fingerprint hashes and what the inner service receives. Any other
/// request keeps its path as sent: it passes through, and idem has nothing
/// to protect in it (rewriting it could only break the upstream's own
/// redirects, `/docs/` → `/docs` → `/docs/` …).
#[derive(Debug, Clone)]
pub struct RouteMatch {
    policy: Arc<RoutePolicy>,
    participates: bool,
    invalid_path: Option<PathError>,
}

impl RouteMatch {
    /// The policy of the first route matching method and path, else the
    /// default policy (also for a path that has no normal form).
    #[must_use]
    pub fn policy(&self) -> &Arc<RoutePolicy> {
        &self.policy
    }

    /// Whether the request is under the layer's protection (or, with an
    /// [`invalid_path`](Self::invalid_path), would be refused for it rather
    /// than passed through).
    #[must_use]
    pub fn participates(&self) -> bool {
        self.participates
    }

    /// Why the path has no normal form, for a request whose method
    /// participates on some route ([`RouteTable::may_participate`]): such a
    /// request is refused (400 `request_path_invalid`). Always `None` for
    /// other requests, which pass through untouched whatever their path.
    #[must_use]
    pub fn invalid_path(&self) -> Option<&PathError> {
        self.invalid_path.as_ref()
    }
}

/// Resolves the route of a request: normalizes its path (rewriting the
/// request target, query kept, when its method participates on some
/// route), matches it against `routes`, and stores the [`RouteMatch`] in
/// `parts.extensions`.
///
/// A request that already carries a `RouteMatch` (resolved earlier in the
/// same stack, as `idem serve` does before the layer runs) is not matched
/// again: that match is returned.
pub fn route(routes: &RouteTable, parts: &mut Parts) -> RouteMatch {
    if let Some(found) = parts.extensions.get::<RouteMatch>() {
        return found.clone();
    }
    let found = if routes.may_participate(&parts.method) {
        match normalize_uri(&mut parts.uri) {
            Ok(()) => matched(routes, &parts.method, parts.uri.path()),
            Err(e) => RouteMatch {
                policy: Arc::clone(routes.default_policy()),
                participates: true,
                invalid_path: Some(e),
            },
        }
    } else {
        // Passes through as sent; only the settings of its route (such as
        // `upstream_timeout`) are looked up, on the normal form.
        match path::normalize(parts.uri.path()) {
            Ok(normal) => matched(routes, &parts.method, &normal),
            Err(_) => RouteMatch {
                policy: Arc::clone(routes.default_policy()),
                participates: false,
                invalid_path: None,
            },
        }
    };
    parts.extensions.insert(found.clone());
    found
}

fn matched(routes: &RouteTable, method: &Method, normal: &str) -> RouteMatch {
    let (policy, participates) = routes.lookup(method, normal);
    RouteMatch {
        policy: Arc::clone(policy),
        participates,
        invalid_path: None,
    }
}

/// Puts the path of `uri` in normal form, keeping its query (and, for an
/// absolute-form target, its scheme and authority).
fn normalize_uri(uri: &mut Uri) -> Result<(), PathError> {
    let normal = match path::normalize(uri.path())? {
        Cow::Borrowed(_) => return Ok(()),
        Cow::Owned(normal) => normal,
    };
    let target = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(target).map_err(|_| PathError::Unrepresentable)?);
    *uri = Uri::from_parts(parts).map_err(|_| PathError::Unrepresentable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .expect("request")
            .into_parts()
            .0
    }

    #[test]
    fn the_target_is_rewritten_once_and_the_query_kept() {
        let table = RouteTable::default();
        let mut p = parts("POST", "http://h:1//a/./b/?x=1&x=2");
        let m = route(&table, &mut p);
        assert!(m.participates() && m.invalid_path().is_none());
        assert_eq!(p.uri, "http://h:1/a/b?x=1&x=2");
        let mut p = parts("POST", "/a%2Fb?x");
        let m = route(&table, &mut p);
        assert!(m.participates());
        assert!(m.invalid_path().is_some());
        assert_eq!(p.uri, "/a%2Fb?x", "left as sent");
        let mut p = parts("GET", "/a%2Fb");
        let m = route(&table, &mut p);
        assert!(!m.participates() && m.invalid_path().is_none());
        let mut p = parts("GET", "//docs/./a/?x");
        assert!(!route(&table, &mut p).participates());
        assert_eq!(p.uri, "//docs/./a/?x", "a pass-through keeps its path");
    }

    #[test]
    fn a_pass_through_gets_the_settings_of_its_route() {
        let slow = RoutePolicy {
            upstream_timeout: std::time::Duration::from_secs(99),
            ..RoutePolicy::default()
        };
        let table = RouteTable::default().route(
            crate::policy::Route::parse_match("/reports/**", Arc::new(slow)).expect("valid"),
        );
        let mut p = parts("GET", "//Reports/x/");
        let m = route(&table, &mut p);
        assert!(!m.participates());
        assert_eq!(m.policy().upstream_timeout.as_secs(), 99);
    }

    #[test]
    fn a_carried_match_is_not_matched_again() {
        let table = RouteTable::default();
        let mut p = parts("GET", "/x");
        let first = route(&table, &mut p);
        p.method = Method::POST;
        let second = route(&table, &mut p);
        assert_eq!(first.participates(), second.participates());
        assert!(Arc::ptr_eq(first.policy(), second.policy()));
    }
}
