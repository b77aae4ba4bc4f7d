#!/usr/bin/env python3
"""A hookrelay webhook receiver in Python, standard library only.

Verifies both signatures of every delivery, prints one JSON line per request and answers 200
when every signature it carries is valid, 401 otherwise:
  - X-Webhook-Signature: lowercase hex HMAC-SHA256 of the raw body, keyed by the secret's text as
    written (a `whsec_` prefix included).
  - webhook-signature (Standard Webhooks, sent when the secret is `whsec_<base64>`): `v1,<base64>`
    HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}", keyed by the DECODED bytes after
    `whsec_`; the timestamp must be within 5 minutes.

    WEBHOOK_SECRET=whsec_... python3 receiver.py [--port 8080] [--host 0.0.0.0]
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ["WEBHOOK_SECRET"]
TOLERANCE_SECONDS = 300


def hex_signature_ok(body: bytes, header: str | None) -> bool:
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


def standard_signature_ok(body: bytes, msg_id: str, timestamp: str, header: str) -> bool:
    if not SECRET.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(SECRET[len("whsec_"):])
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            return False
    except ValueError:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, entry[len("v1,"):])
        for entry in header.split()
        if entry.startswith("v1,")
    )


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hex_ok = hex_signature_ok(body, self.headers.get("X-Webhook-Signature"))
        standard = self.headers.get("webhook-signature")
        standard_ok = None
        if standard is not None:
            standard_ok = standard_signature_ok(
                body,
                self.headers.get("webhook-id", ""),
                self.headers.get("webhook-timestamp", ""),
                standard,
            )
        verified = hex_ok and standard_ok is not False
        print(json.dumps({
            "verified": verified,
            "x_webhook_signature": hex_ok,
            "webhook_signature": standard_ok,
            "delivery": self.headers.get("X-Webhook-Delivery"),
            "event": self.headers.get("X-Webhook-Event"),
            "body": body.decode("utf-8", "replace"),
        }), flush=True)
        self.send_response(200 if verified else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()
        # Deliveries are acknowledged fast; real work belongs in a queue, deduplicated on
        # X-Webhook-Delivery (a delivery can arrive more than once).

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
