#!/usr/bin/env python3
"""Webhook receiver for hookrelay's end-to-end tests (Python 3.11 stdlib + standardwebhooks).

Verifies each POST the way the document-processing contract tells integrators to: `X-Webhook-Signature` with the
contract's own `verify_webhook_signature` (copied verbatim below), and, when the request carries a
Standard Webhooks `webhook-signature` header, with the official `standardwebhooks` library.

CLI (shared with receiver.js):
    python receiver.py --secret SECRET [--port 0] [--host 127.0.0.1] [--fail-first N]

Prints exactly one line on stdout, `listening on 127.0.0.1:<port>`, then serves:
    POST <any path>  -> 200 {"received": true} when verified, else 401 with a short reason
                        (the first N POSTs get 500 when --fail-first N is given)
    GET /results     -> JSON array of every POST received, in arrival order
"""

# --- Document-processing contract: "Signature Verification" (verbatim) -------------------------------------
import hmac
import hashlib

def verify_webhook_signature(payload, signature, secret):
    """
    Verify the webhook signature.
    
    Args:
        payload (str): The raw request body
        signature (str): The signature from the X-Webhook-Signature header
        secret (str): Your webhook secret
        
    Returns:
        bool: True if signature is valid, False otherwise
    """
    computed_signature = hmac.new(
        secret.encode('utf-8'),
        payload.encode('utf-8'),
        hashlib.sha256
    ).hexdigest()
    
    return hmac.compare_digest(computed_signature, signature)
# --- end of the contract's code -----------------------------------------------------------------


import argparse
import ipaddress
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

MAX_BODY = 10 * 1024 * 1024


def check_hex(body: bytes, signature: str | None, secret: str) -> tuple[bool, str | None]:
    """`X-Webhook-Signature` check: the contract's function, guarded so that bad input is a 401."""
    if signature is None:
        return False, "missing X-Webhook-Signature"
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        return False, "body is not UTF-8"
    try:
        ok = verify_webhook_signature(payload, signature, secret)
    except TypeError:
        # hmac.compare_digest refuses str arguments with non-ASCII characters.
        ok = False
    return ok, None if ok else "Invalid signature"


def check_standard(body: bytes, headers, secret: str) -> tuple[bool | None, str | None]:
    """Standard Webhooks check; None when the request has no `webhook-signature` header."""
    if headers.get("webhook-signature") is None:
        return None, None
    wanted = ("webhook-id", "webhook-timestamp", "webhook-signature")
    # The library lowercases the keys itself; pass only the three it reads.
    sw_headers = {name: headers.get(name) or "" for name in wanted}
    try:
        # json_parse=False: verify the signature only (the default also json.loads the body).
        Webhook(secret).verify(body, sw_headers, json_parse=False)
    except Exception as e:  # WebhookVerificationError, but also ValueError / binascii.Error
        # from malformed headers or a secret that is not base64, which the library lets escape.
        return False, f"Invalid webhook-signature: {type(e).__name__}: {e}"
    return True, None


class State:
    def __init__(self, secret: str, fail_first: int):
        self.secret = secret
        self.fail_left = fail_first
        self.records: list[dict] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hookrelay-test-receiver-py"
    sys_version = ""
    state: State  # set on the subclass made in main()

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value) -> None:
        self._send(status, json.dumps(value).encode("utf-8"), "application/json")

    def _send_text(self, status: int, text: str) -> None:
        self._send(status, text.encode("utf-8"), "text/plain; charset=utf-8")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            raise ValueError("bad Content-Length")
        return self.rfile.read(length)

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/results":
            with self.state.lock:
                records = list(self.state.records)
            self._send_json(HTTPStatus.OK, records)
        else:
            self._send_text(HTTPStatus.NOT_FOUND, "Not found")

    def do_POST(self):
        state = self.state
        try:
            body = self._read_body()
        except (ValueError, OSError) as e:
            self.close_connection = True
            body, read_error = b"", f"unreadable body: {e}"
        else:
            read_error = None

        if read_error is None:
            hex_ok, hex_reason = check_hex(body, self.headers.get("X-Webhook-Signature"), state.secret)
            standard_ok, standard_reason = check_standard(body, self.headers, state.secret)
        else:
            hex_ok, hex_reason, standard_ok, standard_reason = False, read_error, None, None

        with state.lock:
            if state.fail_left > 0:
                state.fail_left -= 1
                status, reason = HTTPStatus.INTERNAL_SERVER_ERROR, "Simulated failure (--fail-first)"
            elif hex_ok and standard_ok is not False:
                status, reason = HTTPStatus.OK, None
            else:
                status, reason = HTTPStatus.UNAUTHORIZED, hex_reason or standard_reason
            state.records.append(
                {
                    "received_at": time.time(),
                    "delivery_id": self.headers.get("X-Webhook-Delivery"),
                    "event": self.headers.get("X-Webhook-Event"),
                    "path": self.path,
                    "hex_ok": hex_ok,
                    "standard_ok": standard_ok,
                    "status": int(status),
                    "reason": reason,
                    "body": body.decode("utf-8", errors="replace"),
                    "user_agent": self.headers.get("User-Agent"),
                    "content_type": self.headers.get("Content-Type"),
                }
            )

        if status == HTTPStatus.OK:
            self._send_json(status, {"received": True})
        else:
            self._send_text(status, reason)


def loopback_only(host: str) -> str:
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{host!r} is not a loopback address")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--secret", required=True, help="the webhook secret, as written")
    parser.add_argument("--host", type=loopback_only, default="127.0.0.1")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N",
                        help="answer the first N POSTs with 500")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)

    handler = type("BoundHandler", (Handler,), {"state": State(args.secret, args.fail_first)})
    server_class = ThreadingHTTPServer
    if ":" in args.host:  # ::1
        server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((args.host, args.port), handler)
    server.verbose = args.verbose
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
