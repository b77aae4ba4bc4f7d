// A hookrelay webhook receiver in Go, standard library only.
//
// Verifies both signatures of every delivery, prints one JSON line per request and answers 200
// when every signature it carries is valid, 401 otherwise:
//   - X-Webhook-Signature: lowercase hex HMAC-SHA256 of the raw body, keyed by the secret's text
//     as written (a `whsec_` prefix included).
//   - webhook-signature (Standard Webhooks, sent when the secret is `whsec_<base64>`):
//     `v1,<base64>` HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}", keyed by the
//     DECODED bytes after `whsec_`; the timestamp must be within 5 minutes.
//
//	WEBHOOK_SECRET=whsec_... go run . [-port 8080] [-host 0.0.0.0]
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

const toleranceSeconds = 300

var secret = os.Getenv("WEBHOOK_SECRET")

func mac(key, message []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(message)
	return m.Sum(nil)
}

func hexSignatureOK(body []byte, header string) bool {
	expected := hex.EncodeToString(mac([]byte(secret), body))
	return header != "" && hmac.Equal([]byte(expected), []byte(header))
}

func standardSignatureOK(body []byte, id, timestamp, header string) bool {
	encoded, ok := strings.CutPrefix(secret, "whsec_")
	if !ok {
		return false
	}
	key, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil {
		return false
	}
	ts, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil || abs(time.Now().Unix()-ts) > toleranceSeconds {
		return false
	}
	signed := append([]byte(id+"."+timestamp+"."), body...)
	expected := base64.StdEncoding.EncodeToString(mac(key, signed))
	for _, entry := range strings.Fields(header) {
		if sig, ok := strings.CutPrefix(entry, "v1,"); ok && hmac.Equal([]byte(expected), []byte(sig)) {
			return true
		}
	}
	return false
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

func main() {
	host := flag.String("host", "0.0.0.0", "address to listen on")
	port := flag.Int("port", 8080, "port (0: any)")
	flag.Parse()
	if secret == "" {
		fmt.Fprintln(os.Stderr, "set WEBHOOK_SECRET")
		os.Exit(2)
	}
	var out sync.Mutex
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		body, err := io.ReadAll(r.Body) // the raw bytes: never re-serialize before verifying
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		hexOK := hexSignatureOK(body, r.Header.Get("X-Webhook-Signature"))
		var standardOK *bool
		if header := r.Header.Get("webhook-signature"); header != "" {
			ok := standardSignatureOK(body, r.Header.Get("webhook-id"), r.Header.Get("webhook-timestamp"), header)
			standardOK = &ok
		}
		verified := hexOK && (standardOK == nil || *standardOK)
		line, _ := json.Marshal(map[string]any{
			"verified": verified, "x_webhook_signature": hexOK, "webhook_signature": standardOK,
			"delivery": r.Header.Get("X-Webhook-Delivery"), "event": r.Header.Get("X-Webhook-Event"),
			"body": string(body),
		})
		out.Lock()
		fmt.Println(string(line))
		out.Unlock()
		if verified {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusUnauthorized)
		}
	})
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening on %s\n", listener.Addr())
	fmt.Fprintln(os.Stderr, http.Serve(listener, nil))
	os.Exit(1)
}
