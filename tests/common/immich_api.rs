//! The Immich API endpoints the real Immich CLI calls, behind the mock's gate.

use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use super::mock::{MockBody, MockState, not_found};

/// Answers an Immich API request the mock's core routes do not cover.
pub async fn handle(_req: Request<Incoming>, _state: &Arc<MockState>) -> http::Response<MockBody> {
    not_found()
}
