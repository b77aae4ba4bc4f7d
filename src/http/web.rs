//! The delivery log page (`/ui/`): plain HTML, CSS and JS from `web/`, embedded in the binary.
//! Served on the API port without auth: the files hold no data, and every call the page makes
//! is a REST API call with the bearer token the person enters.

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

/// Only the page's own files may run or style it; it may talk to this origin only. Values from
/// the API (receivers' error texts, event data) are therefore inert even if one were ever
/// inserted as HTML.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub const INDEX_HTML: &str = include_str!("../../web/index.html");
pub const APP_JS: &str = include_str!("../../web/app.js");
pub const APP_CSS: &str = include_str!("../../web/app.css");

/// The page's routes, for the API router (outside its auth layer).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { to_ui() }))
        .route("/ui", get(|| async { to_ui() }))
        .route(
            "/ui/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/index.html",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { page("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { page("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn to_ui() -> Response {
    let mut response = page("text/plain; charset=utf-8", "see /ui/");
    *response.status_mut() = StatusCode::FOUND;
    response
        .headers_mut()
        .insert(header::LOCATION, header::HeaderValue::from_static("/ui/"));
    response
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Always revalidated: a new hookrelay version's page is used at once.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn get_page(path: &str) -> Response {
        router::<()>()
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_page_response_carries_the_security_headers() {
        for (path, status, content_type) in [
            ("/", StatusCode::FOUND, "text/plain"),
            ("/ui", StatusCode::FOUND, "text/plain"),
            ("/ui/", StatusCode::OK, "text/html"),
            ("/ui/index.html", StatusCode::OK, "text/html"),
            ("/ui/app.js", StatusCode::OK, "text/javascript"),
            ("/ui/app.css", StatusCode::OK, "text/css"),
        ] {
            let response = get_page(path).await;
            assert_eq!(response.status(), status, "{path}");
            let h = response.headers();
            assert_eq!(
                h[header::CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY,
                "{path}"
            );
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer", "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
            assert!(
                h[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with(content_type),
                "{path}"
            );
            if status == StatusCode::FOUND {
                assert_eq!(h[header::LOCATION], "/ui/", "{path}");
            }
        }
        let csp = CONTENT_SECURITY_POLICY;
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{directive}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = INDEX_HTML.to_ascii_lowercase();
        assert!(!html.contains("<style"), "no <style> element");
        assert!(!html.contains(" style="), "no style attribute");
        // Every <script> loads a file and has no body.
        let scripts: Vec<&str> = html.split("<script").skip(1).collect();
        assert!(!scripts.is_empty(), "the page loads its script");
        for script in scripts {
            let (tag, rest) = script.split_once('>').expect("a closed tag");
            assert!(tag.contains("src="), "<script{tag}> has a src");
            assert!(rest.starts_with("</script>"), "<script{tag}> has no body");
        }
        // No inline event handlers (onclick=, onload=, ...) or javascript: URLs.
        for (i, _) in html.match_indices(" on") {
            let attribute: String = html[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            assert!(
                !html[i + 1 + attribute.len()..].starts_with('='),
                "inline handler {attribute}="
            );
        }
        assert!(!html.contains("javascript:"));
    }

    #[test]
    fn the_script_never_parses_api_values_as_html() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!APP_JS.contains(sink), "web/app.js uses {sink}");
        }
    }
}
