package caddymcc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
)

func TestFiftyColdClientsFetchEachBlockOnce(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/herd.swu", 2<<20+5555, 10)
	g := startGateway(t, o, "")

	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			resp, err := testClient.Get(g.url + "/herd.swu?cacheHostOrigin=origin.test")
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != 200 || sum(got) != sum(want) {
				errs <- fmt.Errorf("status %d, %d bytes, err %v, equal %v", resp.StatusCode, len(got), err, sum(got) == sum(want))
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if sent := o.bytesSent(); sent != int64(len(want)) {
		t.Errorf("origin sent %d bytes for a %d byte object: ratio %.3f, want 1.000", sent, len(want), float64(sent)/float64(len(want)))
	}
	seen := map[string]bool{}
	for _, r := range o.log() {
		if seen[r.rangeHeader] {
			t.Errorf("range %s fetched twice", r.rangeHeader)
		}
		seen[r.rangeHeader] = true
	}
}

func TestFirstByteArrivesWhileOriginStillSendsBlockZero(t *testing.T) {
	o := newOrigin(t)
	o.add("/slow.swu", 200*kib, 11)
	g := startGateway(t, o, "")
	release := newGate(t)
	o.holdAfter(100, release)

	req, _ := http.NewRequestWithContext(waitCtx(t), http.MethodGet, g.url+"/slow.swu?cacheHostOrigin=origin.test", nil)
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatalf("no response while the origin holds block 0: %v", err)
	}
	defer resp.Body.Close()
	first := make([]byte, 100)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatalf("first 100 bytes did not arrive while the origin holds the rest of block 0: %v", err)
	}
	o.mu.Lock()
	wantFirst := o.objects["/slow.swu"].data[:100]
	o.mu.Unlock()
	if !bytes.Equal(first, wantFirst) {
		t.Fatal("first bytes differ")
	}
}

func TestClientDisconnectMidFillOtherClientCompletes(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/dc.swu", 300*kib, 12)
	g := startGateway(t, o, "")
	release := newGate(t)
	o.holdAfter(10000, release)

	ctxA, cancelA := context.WithCancel(waitCtx(t))
	reqA, _ := http.NewRequestWithContext(ctxA, http.MethodGet, g.url+"/dc.swu?cacheHostOrigin=origin.test", nil)
	respA, err := testClient.Do(reqA)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(respA.Body, make([]byte, 5000)); err != nil {
		t.Fatal(err)
	}
	cancelA() // client A leaves in the middle of block 0's fill
	respA.Body.Close()

	reqB, _ := http.NewRequestWithContext(waitCtx(t), http.MethodGet, g.url+"/dc.swu?cacheHostOrigin=origin.test", nil)
	respB, err := testClient.Do(reqB)
	if err != nil {
		t.Fatal(err)
	}
	defer respB.Body.Close()
	if _, err := io.ReadFull(respB.Body, make([]byte, 5000)); err != nil {
		t.Fatal(err)
	}
	release.open()
	rest, err := io.ReadAll(respB.Body)
	if err != nil {
		t.Fatalf("client B cut off after A left: %v", err)
	}
	if sum(append(append([]byte{}, want[:5000]...), rest...)) != sum(want) {
		t.Fatal("client B's body differs")
	}
	if sent := o.bytesSent(); sent != int64(len(want)) {
		t.Errorf("origin sent %d bytes for %d: the fill was cancelled or repeated", sent, len(want))
	}
}

// readBody reads the body and reports whether it ended cleanly.
func readBody(resp *http.Response) ([]byte, error) {
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

func TestLyingUpstreams(t *testing.T) {
	cases := []struct {
		name string
		hook func(w http.ResponseWriter, r *http.Request, obj *originObject) bool
		// wantStatus is the status when the lie is seen before the answer
		// starts (0: the lie comes later and the connection must be cut).
		wantStatus int
	}{
		{"truncated body", func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
			serveRange(w, r, obj, func(w http.ResponseWriter, body []byte) {
				w.Write(body[:len(body)/2])
				w.(http.Flusher).Flush()
				panic(http.ErrAbortHandler)
			})
			return true
		}, 0},
		{"wrong range", func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 1-65536/%d", len(obj.data)))
			w.Header().Set("Etag", obj.etag)
			w.WriteHeader(http.StatusPartialContent)
			w.Write(obj.data[1:65537])
			return true
		}, http.StatusBadGateway},
		{"open-ended total", func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
			w.Header().Set("Content-Range", "bytes 0-65535/*")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(obj.data[:65536])
			return true
		}, http.StatusBadGateway},
		{"short 200", func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
			w.Header().Set("Content-Length", strconv.Itoa(len(obj.data)))
			w.Header().Set("Etag", obj.etag)
			w.WriteHeader(http.StatusOK)
			w.Write(obj.data[:100000])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}, 0},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := newOrigin(t)
			path := fmt.Sprintf("/lie%d.bin", i)
			want := o.add(path, 300*kib, uint64(20+i))
			g := startGateway(t, o, "")
			o.setHook(c.hook)
			resp := g.get(path, "origin.test")
			got, err := readBody(resp)
			switch {
			case c.wantStatus != 0 && resp.StatusCode != c.wantStatus:
				t.Errorf("status %d, want %d", resp.StatusCode, c.wantStatus)
			case c.wantStatus == 0 && err == nil:
				t.Errorf("status %d and a clean body of %d bytes: the connection must be cut", resp.StatusCode, len(got))
			}
			if resp.StatusCode == 200 && err == nil && sum(got) != sum(want) {
				t.Error("served wrong bytes as a whole body")
			}
			if resp.StatusCode >= 400 && resp.StatusCode < 500 {
				t.Errorf("a lying upstream gave a %d; DO agents would ban the cache", resp.StatusCode)
			}

			// Nothing wrong was stored: with an honest origin, every byte
			// matches.
			g.waitFills()
			o.setHook(nil)
			resp = g.get(path, "origin.test")
			got, err = readBody(resp)
			if err != nil || resp.StatusCode != 200 || sum(got) != sum(want) {
				t.Fatalf("after the lie: status %d err %v equal %v", resp.StatusCode, err, sum(got) == sum(want))
			}
		})
	}
}

func TestOriginIgnoringRangeStillWorks(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/norange.bin", 700*kib+3, 30)
	g := startGateway(t, o, "")
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		w.Header().Set("Etag", obj.etag)
		w.Header().Set("Content-Length", strconv.Itoa(len(obj.data)))
		w.WriteHeader(http.StatusOK)
		w.Write(obj.data)
		return true
	})
	resp := g.get("/norange.bin", "origin.test", "Range", "bytes=300000-400000")
	got, err := readBody(resp)
	if err != nil || resp.StatusCode != 206 || sum(got) != sum(want[300000:400001]) {
		t.Fatalf("range through a Range-ignoring origin: status %d err %v equal %v", resp.StatusCode, err, sum(got) == sum(want[300000:400001]))
	}
	resp = g.get("/norange.bin", "origin.test")
	got, err = readBody(resp)
	if err != nil || resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("whole object: status %d err %v", resp.StatusCode, err)
	}
	if n := len(o.log()); n != 1 {
		t.Errorf("origin asked %d times; its one whole answer should have filled every block", n)
	}
}

func TestETagChangeBetweenBlocksNeverMixesVersions(t *testing.T) {
	o := newOrigin(t)
	old := o.add("/v.swu", 640*kib, 40)
	g := startGateway(t, o, "")
	// Block 0 of the old version gets stored.
	resp := g.get("/v.swu", "origin.test", "Range", "bytes=0-100")
	if b, err := readBody(resp); err != nil || sum(b) != sum(old[:101]) {
		t.Fatalf("priming: %v", err)
	}
	g.waitFills()
	newer := o.add("/v.swu", 640*kib, 41) // same length, new ETag

	resp = g.get("/v.swu", "origin.test")
	got, err := readBody(resp)
	if err == nil && sum(got) != sum(newer) && sum(got) != sum(old) {
		t.Fatal("a complete body mixing two versions")
	}
	// The changed object was dropped: the next download is the new version.
	resp = g.get("/v.swu", "origin.test")
	got, err = readBody(resp)
	if err != nil || sum(got) != sum(newer) {
		t.Fatalf("after the change: err %v, new version %v", err, sum(got) == sum(newer))
	}
}

func TestOriginNotFoundPassesThroughUncached(t *testing.T) {
	o := newOrigin(t)
	g := startGateway(t, o, "")
	for i := 0; i < 2; i++ {
		resp := g.get("/nope.bin", "origin.test")
		body, _ := readBody(resp)
		if resp.StatusCode != 404 || !strings.Contains(string(body), "no such object") {
			t.Fatalf("status %d body %q, want the origin's 404", resp.StatusCode, body)
		}
	}
	if n := len(o.log()); n != 2 {
		t.Errorf("origin asked %d times, want 2 (a 404 is not cached)", n)
	}
}

func TestUpstreamDownGives502(t *testing.T) {
	o := newOrigin(t)
	g := startGateway(t, o, "")
	o.srv.Close()
	resp := g.get("/any.bin", "origin.test")
	readBody(resp)
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", resp.StatusCode)
	}
}

func TestReloadThroughAdminAPIMidDownload(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/reload.swu", 900*kib, 50)
	g := startGateway(t, o, "")
	release := newGate(t)
	o.holdAfter(1000, release)
	req, _ := http.NewRequestWithContext(waitCtx(t), http.MethodGet, g.url+"/reload.swu?cacheHostOrigin=origin.test", nil)
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 1000)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatal(err)
	}

	// Reload with another max_size through the admin API.
	port, _ := strconv.Atoi(strings.TrimPrefix(g.url, "http://127.0.0.1:"))
	cfg := g.config(o, port, "max_size 100MiB")
	lr, err := http.Post("http://"+g.adminAddr+"/load", "application/json", bytes.NewReader(cfg))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := readBody(lr)
	if lr.StatusCode != 200 {
		t.Fatalf("reload: %d %s", lr.StatusCode, body)
	}
	release.open()
	rest, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || sum(append(head, rest...)) != sum(want) {
		t.Fatalf("download across the reload: err %v, equal %v", err, sum(append(head, rest...)) == sum(want))
	}
	// The cache survived the reload: the next download is a hit.
	sent := o.bytesSent()
	resp = g.get("/reload.swu", "origin.test")
	got, err := readBody(resp)
	if err != nil || sum(got) != sum(want) || resp.Header.Get("Cache-Status") != "caddy-mcc; hit" {
		t.Fatalf("after reload: err %v equal %v Cache-Status %q", err, sum(got) == sum(want), resp.Header.Get("Cache-Status"))
	}
	if o.bytesSent() != sent {
		t.Error("the reload lost cached blocks")
	}
}

func TestBlockSizeChangeIsConfigError(t *testing.T) {
	o := newOrigin(t)
	o.add("/b.bin", 100*kib, 60)
	g := startGateway(t, o, "")
	readBody(g.get("/b.bin", "origin.test"))

	port, _ := strconv.Atoi(strings.TrimPrefix(g.url, "http://127.0.0.1:"))
	cfg := g.config(o, port, "")
	cfg = bytes.Replace(cfg, []byte(`"block_size":65536`), []byte(`"block_size":131072`), 1)
	lr, err := http.Post("http://"+g.adminAddr+"/load", "application/json", bytes.NewReader(cfg))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := readBody(lr)
	if lr.StatusCode == 200 || !strings.Contains(string(body), "65536") || !strings.Contains(string(body), "131072") {
		t.Fatalf("reload with another block size: %d %s; want an error naming both sizes", lr.StatusCode, body)
	}
	// The running config still serves.
	resp := g.get("/b.bin", "origin.test")
	readBody(resp)
	if resp.StatusCode != 200 {
		t.Fatalf("after the refused reload: %d", resp.StatusCode)
	}
}

func TestRefusalsNeverReachUpstream(t *testing.T) {
	o := newOrigin(t)
	o.add("/ok.bin", 1000, 70)
	g := startGateway(t, o, "")
	cases := []struct {
		query  string
		host   string
		status int
	}{
		{"cacheHostOrigin=evil.com", "", 403},
		{"cacheHostOrigin=origin.test@evil.com", "", 403},
		{"cacheHostOrigin=origin.test%40evil.com", "", 403},
		{"cacheHostOrigin=user@origin.test", "", 403},
		{"cacheHostOrigin=origin.test.evil.com", "", 403},
		{"cacheHostOrigin=origin.test%2Eevil.com", "", 403},
		{"cacheHostOrigin=origin.test:80", "", 403},
		{"cacheHostOrigin=origin.test%3A80", "", 403},
		{"cacheHostOrigin=origin.test.", "", 403},
		{"cacheHostOrigin=origin.test%00", "", 403},
		{"cacheHostOrigin=origin.test%2F..%2Fevil", "", 403},
		{"cacheHostOrigin=%25", "", 403},
		{"cacheHostOrigin=", "", 403},
		{"cacheHostOrigin=cdn.test", "", 403},
		{"cacheHostOrigin=xcdn.test", "", 403},
		{"cacheHostOrigin=origin.test&cacheHostOrigin=evil.com", "", 403},
		{"", "", 403},
		{"", "evil.com", 403},
		{"ok=1", "origin.test.evil.com", 403},
		{"cacheHostOrigin=ORIGIN.TEST", "", 200},
		{"cacheHostOrigin=Origin.Test", "", 200},
		{"cacheHostOrigin=origin%2Etest", "", 200},
		{"", "origin.test", 200},
		{"", "ORIGIN.test:80", 200},
	}
	for _, c := range cases {
		t.Run(c.query+"|"+c.host, func(t *testing.T) {
			before := len(o.log())
			req, _ := http.NewRequest(http.MethodGet, g.url+"/ok.bin?"+c.query, nil)
			if c.host != "" {
				req.Host = c.host
			}
			resp, err := testClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := readBody(resp)
			if resp.StatusCode != c.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, c.status)
			}
			if c.status == 403 {
				if len(o.log()) != before {
					t.Error("a refused request reached the origin")
				}
				if !strings.HasPrefix(string(body), "caddy-mcc: ") {
					t.Errorf("403 body %q gives no reason", body)
				}
			}
		})
	}
	for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, "PURGE"} {
		req, _ := http.NewRequest(m, g.url+"/ok.bin?cacheHostOrigin=origin.test", strings.NewReader("x"))
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		readBody(resp)
		if resp.StatusCode != 405 || resp.Header.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s: status %d Allow %q", m, resp.StatusCode, resp.Header.Get("Allow"))
		}
	}
}
