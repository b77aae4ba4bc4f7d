#!/usr/bin/env python3
"""Checks both receivers by hand, without cargo: signs requests the way hookrelay does and
asserts each receiver's answers and /results records.

    hack/receivers.sh && tests/receivers/.venv/bin/python tests/receivers/selftest.py [-v]

Stdlib only. It computes its signatures itself (it does not import the receivers' code), so it is
an independent check of the wire contract: hex HMAC-SHA256 of the body keyed by the secret text,
and Standard Webhooks `v1,` + base64(HMAC-SHA256(base64decode(secret[6:]), "{id}.{ts}.{body}")).
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PYTHON = os.path.join(HERE, ".venv", "bin", "python")
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PLAIN = "your_webhook_secret"
VERBOSE = "-v" in sys.argv

RECEIVERS = {
    "python": [VENV_PYTHON, os.path.join(HERE, "receiver.py")],
    "node": ["node", os.path.join(HERE, "receiver.js")],
}


def body_of(event: str, document_id: int) -> bytes:
    payload = {
        "event": event,
        "timestamp": "2023-06-15T10:35:00Z",
        "data": {"document_id": document_id, "status": "completed"},
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def signed_headers(body: bytes, secret: str, delivery_id: str, event: str, ts: int | None = None):
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "hookrelay-selftest/1",
        "X-Webhook-Event": event,
        "X-Webhook-Delivery": delivery_id,
        "X-Webhook-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }
    if secret.startswith("whsec_"):
        ts = int(time.time()) if ts is None else ts
        key = base64.b64decode(secret[len("whsec_"):])
        mac = hmac.new(key, f"{delivery_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        headers["webhook-id"] = delivery_id
        headers["webhook-timestamp"] = str(ts)
        headers["webhook-signature"] = "v1," + base64.b64encode(mac).decode()
    return headers


class Receiver:
    def __init__(self, name: str, *args: str):
        self.name = name
        self.proc = subprocess.Popen(
            RECEIVERS[name] + list(args), stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline().strip()
        prefix = "listening on 127.0.0.1:"
        assert line.startswith(prefix), f"{name}: first line was {line!r}"
        self.port = int(line[len(prefix):])
        self.first_line = line

    def request(self, method: str, path: str, body: bytes = b"", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data.decode()

    def results(self):
        status, data = self.request("GET", "/results")
        assert status == 200
        return json.loads(data)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


passed = failed = 0


def check(label: str, cond: bool, detail: str = ""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
    if VERBOSE or not cond:
        print(f"  {'ok  ' if cond else 'FAIL'} {label}{'  ' + detail if detail else ''}")


def run(name: str):
    print(f"== {name}")
    r = Receiver(name, "--secret", WHSEC, "--port", "0")
    print(f"  started: {r.first_line}")
    try:
        body = body_of("document.completed", 123)
        h = signed_headers(body, WHSEC, "dlv-1", "document.completed")
        st, txt = r.request("POST", "/hooks/a", body, h)
        check("correct -> 200 {received: true}", st == 200 and json.loads(txt) == {"received": True},
              f"{st} {txt}")

        tampered = body.replace(b"123", b"124")
        st, txt = r.request("POST", "/hooks/a", tampered, h)
        check("tampered body -> 401", st == 401, f"{st} {txt}")

        h_wrong = signed_headers(body, "whsec_c2VjcmV0LXByZXZpb3Vz", "dlv-2", "document.completed")
        st, txt = r.request("POST", "/hooks/a", body, h_wrong)
        check("wrong secret -> 401", st == 401, f"{st} {txt}")

        st, txt = r.request("POST", "/hooks/a", body, {"Content-Type": "application/json"})
        check("no signature headers -> 401", st == 401, f"{st} {txt}")

        h_bad = dict(h, **{"X-Webhook-Signature": "zz", "webhook-signature": "garbage"})
        st, txt = r.request("POST", "/hooks/a", body, h_bad)
        check("malformed signature headers -> 401", st == 401, f"{st} {txt}")

        h_hex_only = {k: v for k, v in h.items() if not k.startswith("webhook-")}
        st, txt = r.request("POST", "/hooks/a", body, h_hex_only)
        check("hex only with a whsec secret -> 200", st == 200, f"{st} {txt}")

        h_std_wrong = dict(h, **{"webhook-signature": h_wrong["webhook-signature"]})
        st, txt = r.request("POST", "/hooks/a", body, h_std_wrong)
        check("hex right, webhook-signature wrong -> 401", st == 401, f"{st} {txt}")

        old = signed_headers(body, WHSEC, "dlv-old", "document.completed", ts=int(time.time()) - 600)
        st, txt = r.request("POST", "/hooks/a", body, old)
        check("webhook-timestamp 10 min old -> 401", st == 401, f"{st} {txt}")

        rotated = dict(h, **{"webhook-signature": h_wrong["webhook-signature"] + " " + h["webhook-signature"]})
        st, txt = r.request("POST", "/hooks/a", body, rotated)
        check("rotation: two space-separated v1 signatures, one right -> 200", st == 200, f"{st} {txt}")

        st, txt = r.request("POST", "/hooks/a", b"not json", signed_headers(b"not json", WHSEC, "dlv-nj", "x"))
        check("signed non-JSON body -> 200", st == 200, f"{st} {txt}")

        st, _ = r.request("GET", "/nope")
        check("GET elsewhere -> 404", st == 404)

        res = r.results()
        check("results: one record per POST", len(res) == 10, str(len(res)))
        first = res[0]
        expected = {
            "delivery_id": "dlv-1", "event": "document.completed", "path": "/hooks/a",
            "hex_ok": True, "standard_ok": True, "status": 200, "body": body.decode(),
            "user_agent": "hookrelay-selftest/1", "content_type": "application/json",
        }
        check("results[0] fields", all(first.get(k) == v for k, v in expected.items()), json.dumps(first))
        flags = [(x["hex_ok"], x["standard_ok"], x["status"]) for x in res]
        want = [
            (True, True, 200), (False, False, 401), (False, False, 401), (False, None, 401),
            (False, False, 401), (True, None, 200), (True, False, 401), (True, False, 401),
            (True, True, 200), (True, True, 200),
        ]
        check("results: hex_ok/standard_ok/status per request", flags == want, str(flags))
        if VERBOSE:
            print("  GET /results[0..3] =", json.dumps(res[:3], indent=None))
            for x in res[1:]:
                print(f"    {x['status']} hex_ok={x['hex_ok']} standard_ok={x['standard_ok']} reason={x['reason']!r}")
    finally:
        r.stop()

    r = Receiver(name, "--secret", WHSEC, "--port", "0", "--fail-first", "2")
    try:
        h = signed_headers(body, WHSEC, "dlv-retry", "document.completed")
        statuses = [r.request("POST", "/retry", body, h)[0] for _ in range(3)]
        check("--fail-first 2 -> 500, 500, 200", statuses == [500, 500, 200], str(statuses))
        res = r.results()
        check("--fail-first records", [(x["status"], x["delivery_id"], x["hex_ok"]) for x in res]
              == [(500, "dlv-retry", True), (500, "dlv-retry", True), (200, "dlv-retry", True)], json.dumps(res))
    finally:
        r.stop()

    r = Receiver(name, "--secret", PLAIN, "--port", "0")
    try:
        h = signed_headers(body, PLAIN, "dlv-plain", "document.completed")
        st, txt = r.request("POST", "/plain", body, h)
        check("plain secret: hex only -> 200", st == 200, f"{st} {txt}")
        h_std = dict(h, **{"webhook-id": "x", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,AAAA"})
        st, txt = r.request("POST", "/plain", body, h_std)
        check("plain secret + stray webhook-signature -> 401, no crash", st == 401, f"{st} {txt}")
        res = r.results()
        check("plain secret: standard_ok null", res[0]["standard_ok"] is None and res[0]["hex_ok"] is True,
              json.dumps(res[0]))
        if VERBOSE:
            print("  plain GET /results =", json.dumps(res))
    finally:
        r.stop()


def main():
    for name in RECEIVERS:
        run(name)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
