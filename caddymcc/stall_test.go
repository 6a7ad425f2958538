package caddymcc

import (
	"io"
	"net/http"
	"testing"
)

// TestFillTimeoutEndsAStalledBody: an upstream that sends part of a body
// and then nothing is given up after fill_timeout: the client's download
// is cut, not left waiting.
func TestFillTimeoutEndsAStalledBody(t *testing.T) {
	o := newOrigin(t)
	o.add("/stall.swu", 200*kib, 195)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		serveRange(w, r, obj, func(w http.ResponseWriter, body []byte) {
			w.Write(body[:1000])
			w.(http.Flusher).Flush()
			<-r.Context().Done() // until the gateway gives up
		})
		return true
	})
	g := startGateway(t, o, "fill_timeout 1s")
	req, _ := http.NewRequestWithContext(waitCtx(t), http.MethodGet, g.url+"/stall.swu?cacheHostOrigin=origin.test", nil)
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil || waitCtx(t).Err() != nil {
		t.Fatalf("a stalled upstream's download ended with %d bytes and %v; want it cut after fill_timeout", n, err)
	}
}
