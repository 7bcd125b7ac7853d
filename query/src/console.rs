//! The web console: three static files compiled into the binary, served at `/`. They hold
//! no data; every figure on the page comes from the authenticated REST API, called with
//! the token the user signs in with. A strict Content-Security-Policy allows scripts,
//! styles and connections to this origin only.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The console's files, for the OpenAPI document.
pub fn endpoints() -> Vec<custos_http::openapi::Endpoint> {
    use custos_http::openapi::Endpoint;
    vec![
        Endpoint::new(
            "GET",
            "/",
            "console",
            "The web console (static; data only through the API)",
        )
        .answer(200, "text/html"),
        Endpoint::new("GET", "/console/console.js", "console", "The console's script").answer(200, "text/javascript"),
        Endpoint::new("GET", "/console/console.css", "console", "The console's style sheet").answer(200, "text/css"),
    ]
}

/// `/`, `/console/console.js`, `/console/console.css`.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}
