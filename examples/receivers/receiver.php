<?php
// A hookrelay webhook receiver in PHP 8, built-in functions only, for PHP's built-in server:
//
//   WEBHOOK_SECRET=whsec_... php -S 0.0.0.0:8080 receiver.php
//
// Verifies both signatures of every delivery, prints one JSON line per request (to the server's
// standard output) and answers 200 when every signature it carries is valid, 401 otherwise:
//   - X-Webhook-Signature: lowercase hex HMAC-SHA256 of the raw body, keyed by the secret's text
//     as written (a `whsec_` prefix included).
//   - webhook-signature (Standard Webhooks, sent when the secret is `whsec_<base64>`):
//     `v1,<base64>` HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}", keyed by the
//     DECODED bytes after `whsec_`; the timestamp must be within 5 minutes.

const TOLERANCE_SECONDS = 300;

function hex_signature_ok(string $secret, string $body, ?string $header): bool {
    return $header !== null && hash_equals(hash_hmac('sha256', $body, $secret), $header);
}

function standard_signature_ok(string $secret, string $body, string $id, string $timestamp, string $header): bool {
    if (!str_starts_with($secret, 'whsec_') || !ctype_digit($timestamp)) {
        return false;
    }
    if (abs(time() - (int) $timestamp) > TOLERANCE_SECONDS) {
        return false;
    }
    $key = base64_decode(substr($secret, strlen('whsec_')), true);
    if ($key === false) {
        return false;
    }
    $expected = base64_encode(hash_hmac('sha256', "$id.$timestamp.$body", $key, true));
    foreach (explode(' ', $header) as $entry) {
        if (str_starts_with($entry, 'v1,') && hash_equals($expected, substr($entry, 3))) {
            return true;
        }
    }
    return false;
}

$secret = getenv('WEBHOOK_SECRET');
if ($_SERVER['REQUEST_METHOD'] !== 'POST' || $secret === false || $secret === '') {
    http_response_code($secret ? 405 : 500);
    return;
}
$body = file_get_contents('php://input'); // the raw bytes: never re-serialize before verifying
$header = fn (string $name) => $_SERVER['HTTP_' . strtoupper(str_replace('-', '_', $name))] ?? null;
$hex_ok = hex_signature_ok($secret, $body, $header('X-Webhook-Signature'));
$standard = $header('webhook-signature');
$standard_ok = $standard === null ? null : standard_signature_ok(
    $secret, $body, $header('webhook-id') ?? '', $header('webhook-timestamp') ?? '', $standard);
$verified = $hex_ok && $standard_ok !== false;
file_put_contents('php://stdout', json_encode([
    'verified' => $verified,
    'x_webhook_signature' => $hex_ok,
    'webhook_signature' => $standard_ok,
    'delivery' => $header('X-Webhook-Delivery'),
    'event' => $header('X-Webhook-Event'),
    'body' => $body,
], JSON_UNESCAPED_SLASHES) . "\n");
http_response_code($verified ? 200 : 401);
