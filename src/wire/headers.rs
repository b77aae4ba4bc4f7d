//! A Webhook's own request headers (`spec.headers`, `spec.headersFrom`), checked once when the
//! Webhook is resolved and sent with each attempt.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::ByteString;
use reqwest::header::{HeaderName, HeaderValue};

use crate::crd::{MAX_HEADER_VALUE, MAX_HEADERS, RESERVED_HEADER_PREFIXES, RESERVED_HEADERS};

/// Headers added to every attempt of one Webhook, in order; values from a Secret are marked
/// sensitive (never printed by the HTTP stack's Debug).
pub type CustomHeaders = Arc<[(HeaderName, HeaderValue)]>;

/// Whether hookrelay refuses to let a Webhook set `name` (any case).
pub fn is_reserved_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    RESERVED_HEADERS.contains(&name.as_str())
        || RESERVED_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The static headers, then those of the Secret (which win over a static one of the same name).
/// The error names the offending header, never a value: it goes to the Webhook's status.
pub fn custom_headers(
    fixed: &BTreeMap<String, String>,
    from_secret: Option<(&str, &BTreeMap<String, ByteString>)>,
) -> Result<CustomHeaders, String> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
    let secret_pairs = from_secret
        .into_iter()
        .flat_map(|(secret, data)| data.iter().map(move |(k, v)| (Some(secret), k, &v.0[..])));
    let fixed_pairs = fixed.iter().map(|(k, v)| (None, k, v.as_bytes()));
    for (secret, name, value) in fixed_pairs.chain(secret_pairs) {
        let origin = match secret {
            Some(secret) => format!("key {name:?} of Secret {secret} (headersFrom)"),
            None => format!("header {name:?} (headers)"),
        };
        if is_reserved_header(name) {
            return Err(format!(
                "{origin}: {name} cannot be set, hookrelay sends it itself or it is hop-by-hop; use a name of your own, such as X-Api-Key"
            ));
        }
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            format!("{origin}: not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
        })?;
        if value.len() > MAX_HEADER_VALUE {
            return Err(format!(
                "{origin}: the value is longer than {MAX_HEADER_VALUE} bytes"
            ));
        }
        // Printable ASCII and tab only: no line breaks that would split the request.
        if !value
            .iter()
            .all(|b| *b == b'\t' || (b' '..=b'~').contains(b))
        {
            return Err(format!(
                "{origin}: the value must be printable ASCII on one line"
            ));
        }
        let mut value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("{origin}: the value is not a valid header value"))?;
        value.set_sensitive(secret.is_some());
        out.retain(|(n, _)| *n != header);
        out.push((header, value));
    }
    if out.len() > MAX_HEADERS {
        return Err(format!(
            "{} headers, at most {MAX_HEADERS} are sent: remove some from headers or from the headersFrom Secret",
            out.len()
        ));
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn secret(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn static_and_secret_headers_are_sent_the_secret_winning() {
        let data = secret(&[("Authorization", "Bearer s3cr3t"), ("X-Tenant", "b")]);
        let h = custom_headers(
            &map(&[("X-Tenant", "a"), ("X-Env", "prod")]),
            Some(("hdrs", &data)),
        )
        .unwrap();
        let got: Vec<(String, String, bool)> = h
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.to_str().unwrap().to_owned(),
                    v.is_sensitive(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("x-env".into(), "prod".into(), false),
                ("authorization".into(), "Bearer s3cr3t".into(), true),
                ("x-tenant".into(), "b".into(), true),
            ]
        );
    }

    #[test]
    fn reserved_names_are_refused_in_any_case_naming_the_header_not_the_value() {
        for name in [
            "X-Webhook-Signature",
            "x-webhook-anything",
            "Webhook-Signature",
            "Host",
            "Content-Type",
            "Transfer-Encoding",
            "Proxy-Authorization",
            "traceparent",
            "Connection",
        ] {
            assert!(is_reserved_header(name), "{name}");
            let data = secret(&[(name, "top-secret-value")]);
            let err = custom_headers(&BTreeMap::new(), Some(("hdrs", &data))).unwrap_err();
            assert!(err.contains(name) && err.contains("cannot be set"), "{err}");
            assert!(!err.contains("top-secret-value"), "{err}");
        }
        assert!(!is_reserved_header("Authorization"));
        assert!(!is_reserved_header("X-Webhooks-Tenant"));
    }

    #[test]
    fn bad_names_values_and_too_many_headers_are_refused() {
        let bad_name = secret(&[("X Space", "v")]);
        let err = custom_headers(&BTreeMap::new(), Some(("hdrs", &bad_name))).unwrap_err();
        assert!(err.contains("not an HTTP header name"), "{err}");
        let injected = secret(&[("X-A", "v\r\nX-Webhook-Signature: forged")]);
        let err = custom_headers(&BTreeMap::new(), Some(("hdrs", &injected))).unwrap_err();
        assert!(err.contains("one line") && !err.contains("forged"), "{err}");
        let long = "v".repeat(MAX_HEADER_VALUE + 1);
        let err = custom_headers(&map(&[("X-A", &long)]), None).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        let many: BTreeMap<String, String> = (0..=MAX_HEADERS)
            .map(|i| (format!("X-H{i}"), "v".into()))
            .collect();
        let err = custom_headers(&many, None).unwrap_err();
        assert!(err.contains("at most 32"), "{err}");
    }

    /// The API server's rules for `spec.headers` are generated from the same lists.
    #[test]
    fn the_crd_refuses_the_same_reserved_names() {
        let crd = serde_json::to_string(&<crate::crd::Webhook as kube::CustomResourceExt>::crd())
            .unwrap();
        for name in RESERVED_HEADERS {
            assert!(crd.contains(&format!("'{name}'")), "{name}");
        }
        for prefix in RESERVED_HEADER_PREFIXES {
            assert!(crd.contains(&format!("startsWith('{prefix}')")), "{prefix}");
        }
    }
}
