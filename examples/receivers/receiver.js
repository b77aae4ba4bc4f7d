#!/usr/bin/env node
// A hookrelay webhook receiver in Node.js, built-in modules only (node:http, node:crypto).
//
// Verifies both signatures of every delivery, prints one JSON line per request and answers 200
// when every signature it carries is valid, 401 otherwise:
//   - X-Webhook-Signature: lowercase hex HMAC-SHA256 of the raw body, keyed by the secret's text
//     as written (a `whsec_` prefix included).
//   - webhook-signature (Standard Webhooks, sent when the secret is `whsec_<base64>`):
//     `v1,<base64>` HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}", keyed by the
//     DECODED bytes after `whsec_`; the timestamp must be within 5 minutes.
//
//   WEBHOOK_SECRET=whsec_... node receiver.js [--port 8080] [--host 0.0.0.0]
"use strict";
const crypto = require("node:crypto");
const http = require("node:http");

const SECRET = process.env.WEBHOOK_SECRET;
if (!SECRET) throw new Error("set WEBHOOK_SECRET");
const TOLERANCE_SECONDS = 300;

function same(a, b) {
  const x = Buffer.from(a), y = Buffer.from(b);
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

function hexSignatureOk(body, header) {
  const expected = crypto.createHmac("sha256", SECRET).update(body).digest("hex");
  return typeof header === "string" && same(expected, header);
}

function standardSignatureOk(body, id, timestamp, header) {
  if (!SECRET.startsWith("whsec_")) return false;
  if (!/^\d+$/.test(timestamp) || Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_SECONDS) return false;
  const key = Buffer.from(SECRET.slice("whsec_".length), "base64");
  const signed = Buffer.concat([Buffer.from(`${id}.${timestamp}.`), body]);
  const expected = crypto.createHmac("sha256", key).update(signed).digest("base64");
  return header.split(" ").some((e) => e.startsWith("v1,") && same(expected, e.slice(3)));
}

const args = process.argv.slice(2);
const option = (name, fallback) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);

const server = http.createServer((req, res) => {
  if (req.method !== "POST") { res.writeHead(405).end(); return; }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks); // the raw bytes: never re-serialize before verifying
    const hexOk = hexSignatureOk(body, req.headers["x-webhook-signature"]);
    const standard = req.headers["webhook-signature"];
    const standardOk = standard === undefined ? null
      : standardSignatureOk(body, req.headers["webhook-id"] || "", req.headers["webhook-timestamp"] || "", standard);
    const verified = hexOk && standardOk !== false;
    console.log(JSON.stringify({
      verified, x_webhook_signature: hexOk, webhook_signature: standardOk,
      delivery: req.headers["x-webhook-delivery"] ?? null, event: req.headers["x-webhook-event"] ?? null,
      body: body.toString("utf8"),
    }));
    res.writeHead(verified ? 200 : 401).end();
  });
});
server.listen(Number(option("--port", "8080")), option("--host", "0.0.0.0"), () => {
  const { address, port } = server.address();
  console.log(`listening on ${address}:${port}`);
});
