package caddymcc

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Tests in this file pin the shared-cache rules (sharing.go): one client's
// request never decides what another client gets.

// waitCollapsed waits until n more client waits collapsed onto fills of
// c than before. Joining a fill has no signal of its own; the counter is
// the observable, and waitCtx bounds the wait.
func waitCollapsed(t *testing.T, c *cache, before int64, n int) {
	t.Helper()
	ctx := waitCtx(t)
	for c.stats.collapsed.Load()-before < int64(n) {
		select {
		case <-ctx.Done():
			t.Fatalf("only %d of %d clients joined", c.stats.collapsed.Load()-before, n)
		case <-time.After(time.Millisecond):
		}
	}
}

// getWith fetches path through the gateway with headers, on a connection
// of its own, and returns the status, body and Cache-Status.
func getWith(t *testing.T, g *gateway, path string, hdr ...string) (int, []byte, string) {
	t.Helper()
	resp, done := getOwnConn(t, g, path, "origin.test", hdr...)
	defer done()
	body := readAll(t, resp)
	return resp.StatusCode, body, resp.Header.Get("Cache-Status")
}

func TestCredentialedAnswerIsNeverSharedNorForwardedByFills(t *testing.T) {
	o := newOrigin(t)
	secret := o.add("/secret.swu", 100*kib, 100)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			http.Error(w, "who are you", http.StatusUnauthorized)
			return true
		}
		return false
	})
	g := startGateway(t, o, "")
	code, body, cs := getWith(t, g, "/secret.swu", "Authorization", "Bearer s3cret")
	if code != 200 || !bytes.Equal(body, secret) || !strings.Contains(cs, "fwd=bypass") {
		t.Fatalf("with credentials: %d, equal %v, Cache-Status %q", code, bytes.Equal(body, secret), cs)
	}
	g.waitFills()
	code, body, _ = getWith(t, g, "/secret.swu")
	if code != http.StatusUnauthorized || bytes.Contains(body, secret[:64]) {
		t.Errorf("without credentials after an authenticated download: %d (%d bytes); want the origin's 401", code, len(body))
	}
	// A cookie counts as credentials too.
	code, _, cs = getWith(t, g, "/secret.swu", "Cookie", "session=1")
	if code != http.StatusUnauthorized || !strings.Contains(cs, "fwd=bypass") {
		t.Errorf("with a cookie: %d, Cache-Status %q", code, cs)
	}
	for _, r := range o.log() {
		if r.rangeHeader != "" && (r.header.Get("Authorization") != "" || r.header.Get("Cookie") != "") {
			t.Errorf("a fill carried a client's credentials: %v", r.header)
		}
	}
	if n := cacheOf(t, g).store.Stats().Objects; n != 0 {
		t.Errorf("%d objects stored from credentialed requests", n)
	}
}

func TestStoredPublicAnswerServesCredentialedClients(t *testing.T) {
	o := newOrigin(t)
	pub := o.add("/pub.swu", 100*kib, 101)
	o.setCacheControl("/pub.swu", "public, max-age=3600")
	priv := o.add("/plain.swu", 100*kib, 102)
	g := startGateway(t, o, "")
	download(t, g, "/pub.swu", "origin.test", pub, csMiss)
	download(t, g, "/plain.swu", "origin.test", priv, csMiss)
	g.waitFills()
	before := len(o.log())
	if code, body, cs := getWith(t, g, "/pub.swu", "Authorization", "Bearer x"); code != 200 || !bytes.Equal(body, pub) || cs != csHit {
		t.Errorf("public object with credentials: %d, equal %v, Cache-Status %q; want a hit", code, bytes.Equal(body, pub), cs)
	}
	if n := len(o.log()); n != before {
		t.Errorf("a hit on a public object asked the origin %d times", n-before)
	}
	// Without public, s-maxage or must-revalidate the request goes upstream
	// as sent, credentials included.
	if code, body, cs := getWith(t, g, "/plain.swu", "Authorization", "Bearer x"); code != 200 || !bytes.Equal(body, priv) || cs != "caddy-mcc; fwd=bypass; detail=credentials" {
		t.Errorf("stored object without public, with credentials: %d, equal %v, Cache-Status %q", code, bytes.Equal(body, priv), cs)
	}
	log := o.log()
	if last := log[len(log)-1]; last.header.Get("Authorization") != "Bearer x" {
		t.Errorf("the passed-through request lost its credentials: %v", last.header)
	}
}

// clientBody is what the origin of TestPrivateAnswerReachesOnlyItsClient
// sends a client: bytes of its own.
func clientBody(id string) []byte {
	return bytes.Repeat([]byte("client "+id+";"), 20000)
}

func TestPrivateAnswerReachesOnlyItsClient(t *testing.T) {
	for _, cc := range []string{"private, max-age=60", "no-store"} {
		t.Run(cc, func(t *testing.T) {
			o := newOrigin(t)
			o.add("/me.swu", 1, 103)
			const n = 5
			g := startGateway(t, o, "")
			c := cacheOf(t, g)
			joined := c.stats.collapsed.Load()
			o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
				id := r.Header.Get("X-Client")
				if id == "" {
					// The fill's request: hold its answer until the other
					// clients have joined the fill.
					id = "fill"
					waitCollapsed(t, c, joined, n-1)
				}
				w.Header().Set("Cache-Control", cc)
				w.Header().Set("Etag", `"`+id+`"`)
				http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(clientBody(id)))
				return true
			})
			var wg sync.WaitGroup
			bodies := make([][]byte, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, bodies[i], _ = getWith(t, g, "/me.swu", "X-Client", strconv.Itoa(i))
				}()
			}
			wg.Wait()
			fillAnswers := 0
			for i, b := range bodies {
				switch {
				case bytes.Equal(b, clientBody("fill")):
					fillAnswers++
				case !bytes.Equal(b, clientBody(strconv.Itoa(i))):
					t.Errorf("client %d got %d bytes that are neither its own answer nor its fill's", i, len(b))
				}
			}
			if fillAnswers != 1 {
				t.Errorf("%d clients got the fill's %s answer, want exactly the one whose request started it", fillAnswers, cc)
			}
		})
	}
}

func TestOneClientsPastEndRangeDoesNotDecideForOthers(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/e.swu", 100*kib, 104)
	g := startGateway(t, o, "")
	c := cacheOf(t, g)
	joined := c.stats.collapsed.Load()
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		if r.Header.Get("Range") == "bytes=1048576-1310719" {
			waitCollapsed(t, c, joined, 1) // the second client joined
		}
		return false
	})
	var wg sync.WaitGroup
	wg.Add(1)
	var pastCode int
	var pastRange string
	go func() {
		defer wg.Done()
		resp, done := getOwnConn(t, g, "/e.swu", "origin.test", "Range", "bytes=1048576-", "X-Client", "past", "User-Agent", "Microsoft-Delivery-Optimization-Lite/10.0.0.1")
		defer done()
		readAll(t, resp)
		pastCode, pastRange = resp.StatusCode, resp.Header.Get("Content-Range")
	}()
	waitFirstRequest(t, o)
	code, body, _ := getWith(t, g, "/e.swu", "X-Client", "whole")
	wg.Wait()
	if pastCode != http.StatusRequestedRangeNotSatisfiable || pastRange != fmt.Sprintf("bytes */%d", len(want)) {
		t.Errorf("the past-end client: %d, Content-Range %q", pastCode, pastRange)
	}
	if code != 200 || !bytes.Equal(body, want) {
		t.Errorf("the client that joined it: %d, equal %v; want the whole object", code, bytes.Equal(body, want))
	}
	for _, r := range o.log() {
		if r.header.Get("X-Client") != "" || strings.Contains(r.header.Get("User-Agent"), "Delivery-Optimization") {
			t.Errorf("a fill carried the client's headers: %v", r.header)
		}
	}
}

// waitFirstRequest waits until the origin got a request.
func waitFirstRequest(t *testing.T, o *testOrigin) {
	t.Helper()
	ctx, cancel := context.WithTimeout(waitCtx(t), 20*time.Second)
	defer cancel()
	for len(o.log()) == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("the origin got no request")
		case <-time.After(time.Millisecond):
		}
	}
}

// serveWithout serves obj like the harness origin, but with the given
// ETag (none when empty) and a Last-Modified.
func serveWithout(w http.ResponseWriter, r *http.Request, data []byte, etag string) {
	if etag != "" {
		w.Header().Set("Etag", etag)
	}
	http.ServeContent(w, r, "", time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), bytes.NewReader(data))
}

func TestNoStrongValidatorNeverCombinesRanges(t *testing.T) {
	for _, etag := range []string{"", `W/"weak"`} {
		t.Run("etag "+etag, func(t *testing.T) {
			o := newOrigin(t)
			a := o.add("/big.swu", 640*kib, 105)
			b := o.add("/other.swu", 640*kib, 106) // the same length, other bytes
			small := o.add("/small.swu", 100*kib, 107)
			var mu sync.Mutex
			served := 0
			o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
				data := obj.data
				if r.URL.Path == "/big.swu" {
					// Every other answer is another version of the same
					// length and date.
					mu.Lock()
					if served%2 == 1 {
						data = b
					}
					served++
					mu.Unlock()
				}
				serveWithout(w, r, data, etag)
				return true
			})
			g := startGateway(t, o, "")
			for range 3 {
				code, body, cs := getWith(t, g, "/big.swu")
				if code != 200 || !bytes.Equal(body, a) && !bytes.Equal(body, b) {
					t.Fatalf("status %d: %d bytes of neither version (mixed versions)", code, len(body))
				}
				if cs != "caddy-mcc; fwd=bypass; detail=no-strong-validator" {
					t.Errorf("Cache-Status %q, want a pass-through", cs)
				}
			}
			// An object that one answer carries whole is stored.
			download(t, g, "/small.swu", "origin.test", small, csMiss)
			g.waitFills()
			download(t, g, "/small.swu", "origin.test", small, csHit)
		})
	}
}

func TestVaryingAnswersPassThrough(t *testing.T) {
	o := newOrigin(t)
	o.add("/v.swu", 1, 108)
	enc := o.add("/enc.swu", 100*kib, 109)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		if r.URL.Path == "/enc.swu" {
			w.Header().Set("Vary", "Accept-Encoding")
			return false
		}
		w.Header().Set("Vary", "Accept-Language")
		serveWithout(w, r, clientBody(r.Header.Get("Accept-Language")), `"`+r.Header.Get("Accept-Language")+`"`)
		return true
	})
	g := startGateway(t, o, "")
	for _, lang := range []string{"fr", "en", "fr"} {
		code, body, cs := getWith(t, g, "/v.swu", "Accept-Language", lang)
		if code != 200 || !bytes.Equal(body, clientBody(lang)) || cs != "caddy-mcc; fwd=bypass; detail=vary" {
			t.Errorf("Accept-Language %s: %d, own variant %v, Cache-Status %q", lang, code, bytes.Equal(body, clientBody(lang)), cs)
		}
	}
	// Vary: Accept-Encoding alone is cached: fills always ask for identity.
	download(t, g, "/enc.swu", "origin.test", enc, csMiss)
	g.waitFills()
	download(t, g, "/enc.swu", "origin.test", enc, csHit)
}

func TestShrunkObjectIsDropped(t *testing.T) {
	o := newOrigin(t)
	o.add("/s.swu", 640*kib, 110)
	g := startGateway(t, o, "")
	c := cacheOf(t, g)
	if code, _, _ := getWith(t, g, "/s.swu", "Range", "bytes=0-65535"); code != 206 {
		t.Fatalf("first block: %d", code)
	}
	g.waitFills()
	shorter := o.add("/s.swu", 128*kib, 110)
	code, _, _ := getWith(t, g, "/s.swu", "Range", "bytes=327680-393215")
	if code != http.StatusRequestedRangeNotSatisfiable {
		t.Errorf("a range past the new end: %d, want 416", code)
	}
	g.waitFills()
	if obj, err := c.store.Get("origin.test/s.swu"); err == nil {
		if obj.Size() != int64(len(shorter)) {
			t.Errorf("the store still has the old %d-byte version after the upstream's 416", obj.Size())
		}
		obj.Close()
	}
	if code, body, _ := getWith(t, g, "/s.swu"); code != 200 || !bytes.Equal(body, shorter) {
		t.Errorf("whole object after it shrank: %d, %d bytes, equal %v", code, len(body), bytes.Equal(body, shorter))
	}
}

// TestLateLearnerFindsTheStoredObject: a request that missed the object,
// then joined learning only after another request's learning fill had
// stored the object and ended, once fetched the object's first window
// again (the herd's 1.25x).
func TestLateLearnerFindsTheStoredObject(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/late.swu", 200*kib, 120)
	g := startGateway(t, o, "")
	c := cacheOf(t, g)
	missed, resume := make(chan struct{}), make(chan struct{})
	var held atomic.Bool
	c.beforeLearn = func(string) {
		if held.CompareAndSwap(false, true) {
			close(missed)
			<-resume
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if code, body, _ := getWith(t, g, "/late.swu"); code != 200 || !bytes.Equal(body, want) {
			t.Errorf("the late learner: %d, equal %v", code, bytes.Equal(body, want))
		}
	}()
	<-missed
	download(t, g, "/late.swu", "origin.test", want, csMiss)
	g.waitFills()
	close(resume)
	wg.Wait()
	if sent := o.bytesSent(); sent != int64(len(want)) {
		t.Errorf("the origin sent %d bytes for a %d-byte object", sent, len(want))
	}
}

// TestColdHerdFetchesEachByteOnceEveryTime runs a cold herd many times: in
// one of five rounds of 100 clients the origin once sent 1.25x the object,
// because a client could find a new object before its learning fill had
// claimed its blocks.
func TestColdHerdFetchesEachByteOnceEveryTime(t *testing.T) {
	o := newOrigin(t)
	g := startGateway(t, o, "")
	const rounds, clients, size = 20, 30, 1024*kib + 777
	for round := range rounds {
		path := fmt.Sprintf("/herd-%d.swu", round)
		want := o.add(path, size, uint64(200+round))
		sent0 := o.bytesSent()
		start := make(chan struct{})
		var wg sync.WaitGroup
		for range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				resp := g.get(path, "origin.test")
				if got := readAll(t, resp); resp.StatusCode != 200 || !bytes.Equal(got, want) {
					t.Errorf("round %d: status %d, equal %v", round, resp.StatusCode, bytes.Equal(got, want))
				}
			}()
		}
		close(start)
		wg.Wait()
		if sent := o.bytesSent() - sent0; sent != size {
			t.Fatalf("round %d: the origin sent %d bytes for a %d-byte object (%.3fx)", round, sent, size, float64(sent)/size)
		}
	}
}

// TestMirrorsWithOwnETagsNeverCutOrDrop: under canonical, regional mirrors
// compute their own ETags for the same file. A download through one mirror
// of an object first filled through another was cut and the stored copy
// dropped, again and again.
func TestMirrorsWithOwnETagsNeverCutOrDrop(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/m.swu", 640*kib, 140)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		// The same bytes, an ETag of each host's own.
		serveWithout(w, r, obj.data, `"`+r.Host+`"`)
		return true
	})
	g := startGateway(t, o, "canonical origin.test mirror.test")
	if code, _, _ := getWith(t, g, "/m.swu", "Range", "bytes=0-65535"); code != 206 {
		t.Fatalf("first block through origin.test: %d", code)
	}
	g.waitFills()
	before := len(o.log())
	for _, mirror := range []string{"mirror.test", "mirror.test"} {
		resp, done := getOwnConn(t, g, "/m.swu", mirror)
		got := readAll(t, resp)
		done()
		if resp.StatusCode != 200 || !bytes.Equal(got, want) {
			t.Fatalf("through %s: %d, %d bytes, equal %v", mirror, resp.StatusCode, len(got), bytes.Equal(got, want))
		}
		g.waitFills()
	}
	for _, r := range o.log()[before:] {
		if r.host != "origin.test" {
			t.Errorf("a fill of the version origin.test created went to %s", r.host)
		}
	}
	if resp := g.get("/m.swu", "mirror.test"); resp.Header.Get("Cache-Status") != csHit {
		t.Errorf("third download through the mirror: Cache-Status %q, want a hit on the kept copy", resp.Header.Get("Cache-Status"))
	} else {
		readAll(t, resp)
	}
}

// TestPassThroughOfAStalledUpstreamEnds: a passed-through request once
// waited for a stalled upstream forever; it gets 504 after fill_timeout.
func TestPassThroughOfAStalledUpstreamEnds(t *testing.T) {
	o := newOrigin(t)
	o.add("/stall.swu", 100*kib, 190)
	release := newGate(t)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		<-release.ch
		return false
	})
	g := startGateway(t, o, "fill_timeout 1s")
	req, _ := http.NewRequestWithContext(waitCtx(t), http.MethodGet, g.url+"/stall.swu?cacheHostOrigin=origin.test", nil)
	req.Header.Set("Authorization", "Bearer x")
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatalf("a pass-through to a stalled upstream: %v", err)
	}
	readAll(t, resp)
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("status %d, want 504", resp.StatusCode)
	}
}

// TestStoreErrorPassThroughCarriesOnlyTheUpstreamsHeaders: when a stored
// version's file is gone under a hit, the request is passed through; the
// stored version's ETag and length once stayed in the answer beside the
// upstream's (the hostile-upstream soak found v1's bytes under v0's ETag).
func TestStoreErrorPassThroughCarriesOnlyTheUpstreamsHeaders(t *testing.T) {
	o := newOrigin(t)
	o.add("/moved.swu", 300*kib, 191)
	g := startGateway(t, o, "")
	readAll(t, g.get("/moved.swu", "origin.test"))
	g.waitFills()
	newer := o.add("/moved.swu", 200*kib, 192)
	if err := os.Rename(filepath.Join(g.storeDir(), "data"), filepath.Join(g.storeDir(), "data.away")); err != nil {
		t.Fatal(err)
	}
	resp := g.get("/moved.swu", "origin.test")
	body := readAll(t, resp)
	if !bytes.Equal(body, newer) || resp.Header.Values("Etag")[0] != fmt.Sprintf(`"%x-%d"`, 192, len(newer)) || len(resp.Header.Values("Etag")) != 1 {
		t.Errorf("Etag %q, Content-Length %q, %d bytes, equal %v; want only the upstream's", resp.Header.Values("Etag"), resp.Header.Values("Content-Length"), len(body), bytes.Equal(body, newer))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != "caddy-mcc; fwd=bypass; detail=store-error" {
		t.Errorf("Cache-Status %q", cs)
	}
}

// TestPastEndResumeWithIfRangeAsksUpstreamOnce: a resume (Range with
// If-Range) past the end of an object not stored yet gets its 416 from the
// one learning request's length, not after asking again and again.
func TestPastEndResumeWithIfRangeAsksUpstreamOnce(t *testing.T) {
	o := newOrigin(t)
	o.add("/short.swu", 100*kib, 98)
	g := startGateway(t, o, "")
	resp := g.get("/short.swu", "origin.test", "Range", "bytes=200000-", "If-Range", `"an-etag"`)
	readAll(t, resp)
	if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get("Content-Range") != "bytes */102400" {
		t.Errorf("status %d, Content-Range %q; want 416 bytes */102400", resp.StatusCode, resp.Header.Get("Content-Range"))
	}
	if n := len(o.log()); n != 1 {
		t.Errorf("the origin was asked %d times, want once", n)
	}
}

// TestNextRequestAfterAPrivateAnswerIsAMissOfItsOwn: once a learning fill
// turns out private, later requests do not collapse onto it (to be passed
// through) while it finishes: each starts a fill of its own. The origin
// holds each answer's end (the last chunk) until the test is done, so the
// first fill is still in flight when the second request comes.
func TestNextRequestAfterAPrivateAnswerIsAMissOfItsOwn(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/mine.bin", 40*kib, 99)
	g := startGateway(t, o, "")
	release := newGate(t)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		hdr := w.Header()
		hdr.Set("Etag", obj.etag)
		hdr.Set("Cache-Control", "private")
		hdr.Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", len(obj.data)-1, len(obj.data)))
		w.WriteHeader(http.StatusPartialContent) // chunked: its end is the last chunk
		w.Write(obj.data)
		w.(http.Flusher).Flush()
		<-release.ch
		return true
	})
	for i := range 2 {
		resp := g.get("/mine.bin", "origin.test")
		got := readAll(t, resp)
		if resp.StatusCode != 200 || sum(got) != sum(want) || resp.Header.Get("Cache-Status") != "caddy-mcc; fwd=miss" {
			t.Errorf("request %d: %d, equal %v, Cache-Status %q; want a miss of its own", i, resp.StatusCode, sum(got) == sum(want), resp.Header.Get("Cache-Status"))
		}
	}
	release.open()
}
