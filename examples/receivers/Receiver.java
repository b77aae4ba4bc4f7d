// A hookrelay webhook receiver in Java 17, JDK only (com.sun.net.httpserver, javax.crypto).
//
// Verifies both signatures of every delivery, prints one JSON line per request and answers 200
// when every signature it carries is valid, 401 otherwise:
//   - X-Webhook-Signature: lowercase hex HMAC-SHA256 of the raw body, keyed by the secret's text
//     as written (a `whsec_` prefix included).
//   - webhook-signature (Standard Webhooks, sent when the secret is `whsec_<base64>`):
//     `v1,<base64>` HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}", keyed by the
//     DECODED bytes after `whsec_`; the timestamp must be within 5 minutes.
//
//   WEBHOOK_SECRET=whsec_... java Receiver.java [--port 8080] [--host 0.0.0.0]

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.util.Base64;
import java.util.HexFormat;
import java.util.List;
import java.util.concurrent.Executors;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

public class Receiver {
    static final String SECRET = System.getenv("WEBHOOK_SECRET");
    static final long TOLERANCE_SECONDS = 300;

    static byte[] mac(byte[] key, byte[] message) throws GeneralSecurityException {
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(key, "HmacSHA256"));
        return mac.doFinal(message);
    }

    static boolean same(String a, String b) {
        return MessageDigest.isEqual(a.getBytes(StandardCharsets.UTF_8), b.getBytes(StandardCharsets.UTF_8));
    }

    static boolean hexSignatureOk(byte[] body, String header) throws GeneralSecurityException {
        String expected = HexFormat.of().formatHex(mac(SECRET.getBytes(StandardCharsets.UTF_8), body));
        return header != null && same(expected, header);
    }

    static boolean standardSignatureOk(byte[] body, String id, String timestamp, String header)
            throws GeneralSecurityException {
        if (!SECRET.startsWith("whsec_")) return false;
        byte[] key;
        long ts;
        try {
            key = Base64.getDecoder().decode(SECRET.substring("whsec_".length()));
            ts = Long.parseLong(timestamp);
        } catch (IllegalArgumentException e) {
            return false;
        }
        if (Math.abs(System.currentTimeMillis() / 1000 - ts) > TOLERANCE_SECONDS) return false;
        byte[] prefix = (id + "." + timestamp + ".").getBytes(StandardCharsets.UTF_8);
        byte[] signed = new byte[prefix.length + body.length];
        System.arraycopy(prefix, 0, signed, 0, prefix.length);
        System.arraycopy(body, 0, signed, prefix.length, body.length);
        String expected = Base64.getEncoder().encodeToString(mac(key, signed));
        for (String entry : header.split(" ")) {
            if (entry.startsWith("v1,") && same(expected, entry.substring(3))) return true;
        }
        return false;
    }

    static String json(String s) {
        if (s == null) return "null";
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) out.append(String.format("\\u%04x", (int) c)); else out.append(c);
                }
            }
        }
        return out.append('"').toString();
    }

    static void handle(HttpExchange exchange) throws IOException {
        try (exchange) {
            if (!exchange.getRequestMethod().equals("POST")) {
                exchange.sendResponseHeaders(405, -1);
                return;
            }
            byte[] body = exchange.getRequestBody().readAllBytes(); // the raw bytes
            var headers = exchange.getRequestHeaders();
            boolean hexOk = hexSignatureOk(body, headers.getFirst("X-Webhook-Signature"));
            String standard = headers.getFirst("webhook-signature");
            Boolean standardOk = standard == null ? null : standardSignatureOk(
                body, String.valueOf(headers.getFirst("webhook-id")),
                String.valueOf(headers.getFirst("webhook-timestamp")), standard);
            boolean verified = hexOk && !Boolean.FALSE.equals(standardOk);
            String line = "{\"verified\":" + verified + ",\"x_webhook_signature\":" + hexOk
                + ",\"webhook_signature\":" + standardOk
                + ",\"delivery\":" + json(headers.getFirst("X-Webhook-Delivery"))
                + ",\"event\":" + json(headers.getFirst("X-Webhook-Event"))
                + ",\"body\":" + json(new String(body, StandardCharsets.UTF_8)) + "}";
            synchronized (System.out) {
                System.out.println(line);
                System.out.flush();
            }
            exchange.sendResponseHeaders(verified ? 200 : 401, -1);
        } catch (GeneralSecurityException e) {
            throw new IOException(e);
        }
    }

    public static void main(String[] args) throws IOException {
        if (SECRET == null || SECRET.isEmpty()) throw new IllegalStateException("set WEBHOOK_SECRET");
        List<String> a = List.of(args);
        String host = a.contains("--host") ? a.get(a.indexOf("--host") + 1) : "0.0.0.0";
        int port = a.contains("--port") ? Integer.parseInt(a.get(a.indexOf("--port") + 1)) : 8080;
        HttpServer server = HttpServer.create(new InetSocketAddress(host, port), 0);
        server.createContext("/", Receiver::handle);
        server.setExecutor(Executors.newFixedThreadPool(4));
        server.start();
        System.out.println("listening on " + host + ":" + server.getAddress().getPort());
        System.out.flush();
    }
}
