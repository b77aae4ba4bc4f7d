#!/usr/bin/env node
// Webhook receiver for hookrelay's end-to-end tests (Node 20 + express + body-parser +
// standardwebhooks), built from the document-processing contract's "Example webhook handler in Node.js".
//
// CLI (shared with receiver.py):
//   node receiver.js --secret SECRET [--port 0] [--host 127.0.0.1] [--fail-first N]
//
// Prints exactly one line on stdout, `listening on 127.0.0.1:<port>`, then serves:
//   POST <any path>  -> 200 {"received": true} when verified, else 401 with a short reason
//                       (the first N POSTs get 500 when --fail-first N is given)
//   GET /results     -> JSON array of every POST received, in arrival order
'use strict';

const express = require('express');
const bodyParser = require('body-parser');
const crypto = require('crypto');
const net = require('net');
const { parseArgs } = require('util');
const { Webhook } = require('standardwebhooks');

const MAX_BODY = '10mb';

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node receiver.js --secret SECRET [--port 0] [--host 127.0.0.1] ` +
      '[--fail-first N] [--verbose]\n',
  );
  process.exit(2);
}

let args;
try {
  args = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      secret: { type: 'string' },
      host: { type: 'string', default: '127.0.0.1' },
      'fail-first': { type: 'string', default: '0' },
      verbose: { type: 'boolean', default: false },
    },
  }).values;
} catch (e) {
  usage(e.message);
}
if (args.secret === undefined) usage('--secret is required');
const port = Number(args.port);
const failFirst = Number(args['fail-first']);
if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad --port ${args.port}`);
if (!Number.isInteger(failFirst) || failFirst < 0) usage(`bad --fail-first ${args['fail-first']}`);
const loopback =
  args.host === 'localhost' ||
  (net.isIPv4(args.host) && args.host.startsWith('127.')) ||
  (net.isIPv6(args.host) && ['::1', '0:0:0:0:0:0:0:1'].includes(args.host));
if (!loopback) usage(`${JSON.stringify(args.host)} is not a loopback address`);

// Webhook secret (should match the one used by the sender)
const WEBHOOK_SECRET = args.secret;

const app = express();
const keepRawBody = (req, res, buf) => {
  // Store the raw request body for signature verification
  req.rawBody = buf;
};
// The document-processing contract's parser; JSON bodies only.
app.use(bodyParser.json({ limit: MAX_BODY, verify: keepRawBody }));
// Any other content type still gets a raw body to verify (and a 401 if it does not match).
app.use(bodyParser.raw({ type: () => true, limit: MAX_BODY, verify: keepRawBody }));
// A body that is not valid JSON must not short-circuit verification: carry on to the handler.
app.use((err, req, res, next) => {
  req.bodyError = err;
  next();
});
// A request without a body (no Content-Length, no Transfer-Encoding) is never read: its body is
// empty, as in the Python receiver.
app.use((req, res, next) => {
  if (req.rawBody === undefined && req.bodyError === undefined) req.rawBody = Buffer.alloc(0);
  next();
});

let failLeft = failFirst;
const records = [];

function checkHex(req) {
  if (req.rawBody === undefined) {
    return [false, `unreadable body: ${req.bodyError ? req.bodyError.message : 'none'}`];
  }
  // Verify signature
  const signature = req.headers['x-webhook-signature'];
  if (typeof signature !== 'string') return [false, 'missing X-Webhook-Signature'];
  const computedSignature = crypto
    .createHmac('sha256', WEBHOOK_SECRET)
    .update(req.rawBody)
    .digest('hex');
  // Guard: Buffer.from(x, 'hex') silently stops at the first non-hex character and accepts
  // uppercase, and timingSafeEqual throws on a length mismatch. Accept exactly what the
  // contract (and the Python receiver's string comparison) accepts: 64 lowercase hex digits.
  if (!/^[0-9a-f]{64}$/.test(signature)) return [false, 'Invalid signature'];
  if (
    !crypto.timingSafeEqual(Buffer.from(computedSignature, 'hex'), Buffer.from(signature, 'hex'))
  ) {
    return [false, 'Invalid signature'];
  }
  return [true, null];
}

function checkStandard(req) {
  if (req.headers['webhook-signature'] === undefined) return [null, null];
  if (req.rawBody === undefined) return [false, 'unreadable body'];
  const headers = {
    'webhook-id': req.headers['webhook-id'] || '',
    'webhook-timestamp': req.headers['webhook-timestamp'] || '',
    'webhook-signature': req.headers['webhook-signature'],
  };
  try {
    // jsonParse: false -> verify the signature only (the default also JSON.parses the body).
    new Webhook(WEBHOOK_SECRET).verify(req.rawBody, headers, { jsonParse: false });
    return [true, null];
  } catch (e) {
    // WebhookVerificationError, or the constructor's error for a secret that is not base64.
    return [false, `Invalid webhook-signature: ${e.name}: ${e.message}`];
  }
}

// Webhook endpoint: any path
app.post('*', (req, res) => {
  const [hexOk, hexReason] = checkHex(req);
  const [standardOk, standardReason] = checkStandard(req);
  let status;
  let reason = null;
  if (failLeft > 0) {
    failLeft -= 1;
    status = 500;
    reason = 'Simulated failure (--fail-first)';
  } else if (hexOk && standardOk !== false) {
    status = 200;
  } else {
    status = 401;
    reason = hexReason || standardReason;
  }
  records.push({
    received_at: Date.now() / 1000,
    delivery_id: req.headers['x-webhook-delivery'] ?? null,
    event: req.headers['x-webhook-event'] ?? null,
    path: req.originalUrl,
    hex_ok: hexOk,
    standard_ok: standardOk,
    status,
    reason,
    body: req.rawBody === undefined ? '' : req.rawBody.toString('utf8'),
    user_agent: req.headers['user-agent'] ?? null,
    content_type: req.headers['content-type'] ?? null,
  });
  if (args.verbose) {
    process.stderr.write(`${req.method} ${req.originalUrl} -> ${status} ${reason || ''}\n`);
  }
  if (status !== 200) return res.status(status).type('text/plain').send(reason);
  // Acknowledge receipt immediately
  return res.status(200).send({ received: true });
});

app.get('/results', (req, res) => {
  res.status(200).json(records);
});

app.use((req, res) => {
  res.status(404).type('text/plain').send('Not found');
});

const server = app.listen(port, args.host, () => {
  const addr = server.address();
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  process.stdout.write(`listening on ${host}:${addr.port}\n`);
});
server.on('error', (e) => {
  process.stderr.write(`receiver: ${e.message}\n`);
  process.exit(1);
});
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
