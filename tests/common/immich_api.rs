//! The Immich API endpoints the real Immich CLI calls, behind the mock's gate.
//!
//! Shapes follow Immich's OpenAPI DTOs (`UserAdminResponseDto`, `ApiKeyResponseDto`,
//! `ServerMediaTypesResponseDto`, `AssetBulkUploadCheckResponseDto`, `AssetMediaResponseDto`).
//! Every endpoint here wants the API key in `x-api-key`, as Immich does. Uploads are parsed as
//! `multipart/form-data` and recorded per mock in an [`ImmichApiState`], since `MockState`
//! belongs to the mock's core.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json as j;

use super::mock::{MockBody, MockState, full, json, not_found};

/// The API key the mock's Immich accepts (with every permission).
pub const API_KEY: &str = "immich-cli-e2e-api-key-6b1d0f";

/// The one user behind [`API_KEY`].
pub const USER_EMAIL: &str = "svc-test@example.com";

/// One `POST /api/assets` as the mock received it.
#[derive(Debug, Clone)]
pub struct UploadRecord {
    /// The asset id the mock answered with.
    pub asset_id: String,
    /// The `filename` of the `assetData` part.
    pub filename: String,
    /// Bytes in the `assetData` part.
    pub size: u64,
    /// Hex SHA-1 of the `assetData` part.
    pub sha1: String,
    /// The request's `x-immich-checksum` header, when the client sent one.
    pub checksum_header: Option<String>,
    /// The text fields of the form (`fileCreatedAt`, `fileSize`, …).
    pub fields: BTreeMap<String, String>,
    /// `"created"` or `"duplicate"`.
    pub status: &'static str,
}

/// What the Immich endpoints remember for one mock.
#[derive(Default)]
pub struct ImmichApiState {
    uploads: Mutex<Vec<UploadRecord>>,
}

/// One entry per live mock; the `Weak` keeps the address from being reused while it is here.
type Registry = Vec<(Weak<MockState>, Arc<ImmichApiState>)>;
static REGISTRY: Mutex<Registry> = Mutex::new(Vec::new());

impl ImmichApiState {
    /// The Immich state belonging to the mock that owns `mock`.
    pub fn of(mock: &Arc<MockState>) -> Arc<ImmichApiState> {
        let mut registry = REGISTRY.lock().unwrap();
        registry.retain(|(owner, _)| owner.strong_count() > 0);
        let weak = Arc::downgrade(mock);
        if let Some((_, state)) = registry.iter().find(|(owner, _)| owner.ptr_eq(&weak)) {
            return state.clone();
        }
        let state = Arc::new(ImmichApiState::default());
        registry.push((weak, state.clone()));
        state
    }

    /// Every upload received so far, in order.
    pub fn uploads(&self) -> Vec<UploadRecord> {
        self.uploads.lock().unwrap().clone()
    }

    fn asset_with_sha1(&self, sha1: &str) -> Option<String> {
        self.uploads
            .lock()
            .unwrap()
            .iter()
            .find(|u| u.sha1.eq_ignore_ascii_case(sha1))
            .map(|u| u.asset_id.clone())
    }
}

/// Answers an Immich API request the mock's core routes do not cover.
pub async fn handle(req: Request<Incoming>, state: &Arc<MockState>) -> http::Response<MockBody> {
    let route = (req.method().clone(), req.uri().path().to_owned());
    let known = matches!(
        (&route.0, route.1.as_str()),
        (&Method::GET, "/api/users/me")
            | (&Method::GET, "/api/api-keys/me")
            | (&Method::GET, "/api/server/media-types")
            | (&Method::POST, "/api/assets/bulk-upload-check")
            | (&Method::POST, "/api/assets")
    );
    if !known {
        return not_found();
    }
    match req.headers().get("x-api-key") {
        Some(key) if key == API_KEY => {}
        Some(_) => return error(StatusCode::UNAUTHORIZED, "Invalid API key"),
        None => return error(StatusCode::UNAUTHORIZED, "Authentication required"),
    }
    let immich = ImmichApiState::of(state);
    match route.1.as_str() {
        "/api/users/me" => json(user()),
        "/api/api-keys/me" => json(j!({
            "id": "5c1a6f0e-2b7d-4c8e-9a3f-0d4e5f6a7b8c",
            "name": "credproxy e2e",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "updatedAt": "2025-01-01T00:00:00.000Z",
            "permissions": ["all"],
        })),
        "/api/server/media-types" => json(media_types()),
        "/api/assets/bulk-upload-check" => bulk_upload_check(req, &immich).await,
        _ => upload_asset(req, &immich).await,
    }
}

/// Immich's error body, as NestJS renders it.
fn error(status: StatusCode, message: &str) -> http::Response<MockBody> {
    let body = j!({
        "message": message,
        "error": status.canonical_reason().unwrap_or(""),
        "statusCode": status.as_u16(),
    });
    full(status, "application/json; charset=utf-8", body.to_string())
}

fn user() -> serde_json::Value {
    j!({
        "id": "0b6f3d2a-8c4e-4f1a-9b7d-2e5c6a8f0d13",
        "email": USER_EMAIL,
        "name": "Service Test",
        "avatarColor": "primary",
        "profileImagePath": "",
        "profileChangedAt": "2025-01-01T00:00:00.000Z",
        "createdAt": "2025-01-01T00:00:00.000Z",
        "updatedAt": "2025-01-01T00:00:00.000Z",
        "deletedAt": null,
        "isAdmin": false,
        "license": null,
        "oauthId": "",
        "quotaSizeInBytes": null,
        "quotaUsageInBytes": 0,
        "shouldChangePassword": false,
        "status": "active",
        "storageLabel": null,
    })
}

fn media_types() -> serde_json::Value {
    j!({
        "image": [
            ".3fr", ".ari", ".arw", ".avif", ".bmp", ".cap", ".cin", ".cr2", ".cr3", ".crw",
            ".dcr", ".dng", ".erf", ".fff", ".gif", ".heic", ".heif", ".hif", ".iiq", ".insp",
            ".jpe", ".jpeg", ".jpg", ".jxl", ".k25", ".kdc", ".mrw", ".nef", ".nrw", ".orf",
            ".ori", ".pef", ".png", ".psd", ".raf", ".raw", ".rw2", ".rwl", ".sr2", ".srf",
            ".srw", ".svg", ".tif", ".tiff", ".webp", ".x3f",
        ],
        "video": [
            ".3gp", ".3gpp", ".avi", ".flv", ".insv", ".m2t", ".m2ts", ".m4v", ".mkv", ".mov",
            ".mp4", ".mpe", ".mpeg", ".mpg", ".mts", ".vob", ".webm", ".wmv",
        ],
        "sidecar": [".xmp"],
    })
}

/// `{"assets":[{"id","checksum"}]}` → accept unknown checksums, reject known ones as duplicates.
async fn bulk_upload_check(
    req: Request<Incoming>,
    immich: &ImmichApiState,
) -> http::Response<MockBody> {
    let Ok(body) = req.into_body().collect().await else {
        return error(StatusCode::BAD_REQUEST, "aborted");
    };
    let Ok(dto) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON");
    };
    let Some(assets) = dto.get("assets").and_then(|a| a.as_array()) else {
        return error(StatusCode::BAD_REQUEST, "assets must be an array");
    };
    let mut results = Vec::new();
    for asset in assets {
        let (Some(id), Some(checksum)) = (
            asset.get("id").and_then(|v| v.as_str()),
            asset.get("checksum").and_then(|v| v.as_str()),
        ) else {
            return error(StatusCode::BAD_REQUEST, "each asset needs id and checksum");
        };
        results.push(match immich.asset_with_sha1(checksum) {
            Some(existing) => j!({
                "id": id,
                "action": "reject",
                "reason": "duplicate",
                "assetId": existing,
                "isTrashed": false,
            }),
            None => j!({"id": id, "action": "accept"}),
        });
    }
    json(j!({ "results": results }))
}

/// One multipart asset upload: 201 `created`, or 200 `duplicate` when the SHA-1 is known.
async fn upload_asset(req: Request<Incoming>, immich: &ImmichApiState) -> http::Response<MockBody> {
    let Some(boundary) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(multipart_boundary)
    else {
        return error(StatusCode::BAD_REQUEST, "expected multipart/form-data");
    };
    let checksum_header = req
        .headers()
        .get("x-immich-checksum")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(body) = req.into_body().collect().await else {
        return error(StatusCode::BAD_REQUEST, "aborted");
    };
    let body = body.to_bytes();
    let parts = match parse_multipart(&body, &boundary) {
        Ok(parts) => parts,
        Err(problem) => return error(StatusCode::BAD_REQUEST, &problem),
    };
    let mut fields = BTreeMap::new();
    let mut asset = None;
    for part in parts {
        match (part.name.as_str(), part.filename) {
            ("assetData", Some(filename)) => asset = Some((filename, part.data)),
            (_, Some(_)) => {}
            (name, None) => {
                let value = String::from_utf8_lossy(part.data).into_owned();
                fields.insert(name.to_owned(), value);
            }
        }
    }
    let Some((filename, data)) = asset else {
        return error(StatusCode::BAD_REQUEST, "assetData must be a file");
    };
    for required in ["fileCreatedAt", "fileModifiedAt"] {
        if !fields.contains_key(required) {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("{required} must be a Date instance"),
            );
        }
    }
    let sha1 = hex::encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        data,
    ));
    let (status, code, asset_id) = match immich.asset_with_sha1(&sha1) {
        Some(existing) => ("duplicate", StatusCode::OK, existing),
        None => {
            let n = immich.uploads.lock().unwrap().len() + 1;
            (
                "created",
                StatusCode::CREATED,
                format!("00000000-0000-4000-8000-{n:012x}"),
            )
        }
    };
    immich.uploads.lock().unwrap().push(UploadRecord {
        asset_id: asset_id.clone(),
        filename,
        size: data.len() as u64,
        sha1,
        checksum_header,
        fields,
        status,
    });
    let body = j!({"id": asset_id, "status": status});
    full(code, "application/json; charset=utf-8", body.to_string())
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.trim().split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty())
}

/// One part of a multipart body.
pub struct Part<'a> {
    /// The form field's name.
    pub name: String,
    /// The file name, for file parts.
    pub filename: Option<String>,
    /// The part's content.
    pub data: &'a [u8],
}

/// Splits a complete `multipart/form-data` body (RFC 7578) into its parts.
pub fn parse_multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, String> {
    let delimiter = format!("--{boundary}").into_bytes();
    let next_delimiter = format!("\r\n--{boundary}").into_bytes();
    let mut at =
        find(body, &delimiter, 0).ok_or("no multipart boundary in body")? + delimiter.len();
    let mut parts = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        if !rest.starts_with(b"\r\n") {
            return Err("malformed multipart delimiter line".to_owned());
        }
        let head_start = at + 2;
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or("unterminated part headers")?;
        let data_start = head_end + 4;
        let data_end =
            find(body, &next_delimiter, data_start).ok_or("multipart body ends inside a part")?;
        let head = std::str::from_utf8(&body[head_start..head_end])
            .map_err(|_| "part headers are not UTF-8")?;
        let disposition = head
            .split("\r\n")
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-disposition"))
            .map(|(_, value)| value.trim())
            .ok_or("part without Content-Disposition")?;
        let params: Vec<(String, String)> = disposition
            .split(';')
            .skip(1)
            .filter_map(|p| p.trim().split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_ascii_lowercase(),
                    v.trim().trim_matches('"').to_owned(),
                )
            })
            .collect();
        let param = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        parts.push(Part {
            name: param("name").ok_or("part without a name")?,
            filename: param("filename"),
            data: &body[data_start..data_end],
        });
        at = data_end + next_delimiter.len();
    }
}

/// The first index at or after `from` where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let mut i = from;
    while i + needle.len() <= haystack.len() {
        let offset = haystack[i..=haystack.len() - needle.len()]
            .iter()
            .position(|&b| b == first)?;
        i += offset;
        if &haystack[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}
