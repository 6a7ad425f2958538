package caddymcc

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// rawRequest sends a request line and headers as written, as apt with
// Acquire::http::Proxy does (absolute form), and reads the answer.
func rawRequest(t *testing.T, g *gateway, lines ...string) (*http.Response, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, strings.Join(lines, "\r\n")+"\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func TestAptProxyModeAbsoluteForm(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", 150*kib, 96)
	g := startGateway(t, o, "")
	for _, label := range []string{"cold", "hit"} {
		resp, got := rawRequest(t, g, "GET http://origin.test/debian/pool/main/h/hello/hello_2.10-3_amd64.deb HTTP/1.1", "Host: origin.test")
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("%s absolute-form GET: status %d, equal %v", label, resp.StatusCode, sum(got) == sum(want))
		}
	}
	if n := len(o.log()); n != 1 {
		t.Errorf("origin asked %d times for one object", n)
	}
	resp, body := rawRequest(t, g, "GET http://evil.test/debian/x.deb HTTP/1.1", "Host: evil.test")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("absolute-form request for another host: %d %s, want 403", resp.StatusCode, body)
	}
	resp, body = rawRequest(t, g, "CONNECT origin.test:443 HTTP/1.1", "Host: origin.test:443")
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("CONNECT: %d %s, want 405", resp.StatusCode, body)
	}
}

func TestCanonicalMirrorsShareOneCacheKey(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/debian/dists/bookworm/main/binary-amd64/Packages.xz", 90*kib, 97)
	g := startGateway(t, o, "canonical deb.debian.org ftp.de.debian.org ftp.us.debian.org")
	path := "/debian/dists/bookworm/main/binary-amd64/Packages.xz"
	for i, mirror := range []string{"ftp.de.debian.org", "ftp.us.debian.org", "deb.debian.org"} {
		resp := g.get(path, mirror)
		got := readAll(t, resp)
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("via %s: status %d, equal %v", mirror, resp.StatusCode, sum(got) == sum(want))
		}
		cs := resp.Header.Get("Cache-Status")
		if i == 0 && !strings.Contains(cs, "fwd=miss") || i > 0 && cs != "caddy-mcc; hit" {
			t.Errorf("via %s: Cache-Status %q", mirror, cs)
		}
	}
	if log := o.log(); len(log) != 1 || log[0].host != "ftp.de.debian.org" {
		t.Errorf("origin saw %+v; want one request, to the mirror the first client named", log)
	}
}

func TestStaleObjectRevalidatesWith304(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/debian/dists/bookworm/InRelease", 70*kib, 98)
	o.setCacheControl("/debian/dists/bookworm/InRelease", "max-age=0")
	g := startGateway(t, o, "")
	path := "/debian/dists/bookworm/InRelease"
	readAll(t, g.get(path, "origin.test"))
	sent := o.bytesSent()
	for i := 0; i < 3; i++ {
		resp := g.get(path, "origin.test")
		got := readAll(t, resp)
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("revalidated answer %d: status %d, equal %v", i, resp.StatusCode, sum(got) == sum(want))
		}
		if cs := resp.Header.Get("Cache-Status"); cs != "caddy-mcc; fwd=stale; fwd-status=304" {
			t.Errorf("Cache-Status %q, want a 304 revalidation", cs)
		}
	}
	if o.bytesSent() != sent {
		t.Errorf("304 revalidations moved %d body bytes", o.bytesSent()-sent)
	}
	log := o.log()
	if len(log) != 4 {
		t.Fatalf("origin asked %d times, want 1 fetch and 3 revalidations", len(log))
	}
}

func TestChangedIndexIsReplacedWholeByTheNewVersion(t *testing.T) {
	o := newOrigin(t)
	path := "/debian/dists/bookworm/main/binary-amd64/Packages.xz"
	o.add(path, 300*kib, 99)
	g := startGateway(t, o, "index_ttl 1ns")
	readAll(t, g.get(path, "origin.test"))
	newer := o.add(path, 280*kib, 100) // a new index, another length
	resp := g.get(path, "origin.test")
	got := readAll(t, resp)
	if resp.StatusCode != 200 || sum(got) != sum(newer) {
		t.Fatalf("after the index changed: status %d, new version %v (%d bytes)", resp.StatusCode, sum(got) == sum(newer), len(got))
	}
	// Package files never go stale: one request, ever.
	deb := o.add("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", 50*kib, 101)
	before := len(o.log())
	for i := 0; i < 3; i++ {
		if got := readAll(t, g.get("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", "origin.test")); sum(got) != sum(deb) {
			t.Fatal("deb differs")
		}
	}
	if n := len(o.log()) - before; n != 1 {
		t.Errorf("a .deb was asked upstream %d times, want once", n)
	}
}

func TestStaleIndexServedWhenUpstreamIsDown(t *testing.T) {
	o := newOrigin(t)
	path := "/debian/dists/bookworm/InRelease"
	want := o.add(path, 20*kib, 102)
	g := startGateway(t, o, "index_ttl 1ns")
	readAll(t, g.get(path, "origin.test"))
	g.waitFills()
	o.srv.Close()
	resp := g.get(path, "origin.test")
	got := readAll(t, resp)
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("upstream down: status %d, equal %v", resp.StatusCode, sum(got) == sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); !strings.Contains(cs, "detail=stale-upstream-error") || !strings.Contains(cs, "ttl=-") {
		t.Errorf("Cache-Status %q does not say the answer is stale", cs)
	}
}

func TestRemoveDotSegments(t *testing.T) {
	for in, want := range map[string]string{
		"/a/b":            "/a/b",
		"/repo/./x.deb":   "/repo/x.deb",
		"/a/b/../c":       "/a/c",
		"/a/b/..":         "/a/",
		"/a/.":            "/a/",
		"/../../etc/pass": "/etc/pass",
		"/a/.hidden/x":    "/a/.hidden/x",
		"/a/..b/x":        "/a/..b/x",
	} {
		if got := removeDotSegments(in); got != want {
			t.Errorf("removeDotSegments(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestLifetimeFollowsOriginThenAptDefaults(t *testing.T) {
	h := &Handler{indexTTL: defaultIndexTTL}
	meta := freshMeta
	cases := []struct {
		name    string
		m       rangestore.Meta
		uri     string
		ttl     time.Duration
		expires bool
	}{
		{"max-age", meta("Cache-Control", "public, max-age=600"), "/f.swu", 600 * time.Second, true},
		{"s-maxage wins", meta("Cache-Control", "max-age=600, s-maxage=60"), "/f.swu", 60 * time.Second, true},
		{"age counts", meta("Cache-Control", "max-age=600", metaAge, "100"), "/f.swu", 500 * time.Second, true},
		{"no-cache", meta("Cache-Control", "no-cache"), "/f.swu", 0, true},
		{"private", meta("Cache-Control", "private, max-age=600"), "/f.swu", 0, true},
		{"expires minus date", meta("Expires", "Thu, 01 Jan 2026 01:00:00 GMT", metaDate, "Thu, 01 Jan 2026 00:00:00 GMT"), "/f.swu", time.Hour, true},
		{"bad expires is expired", meta("Expires", "0"), "/f.swu", 0, true},
		{"InRelease default", meta(), "/debian/dists/stable/InRelease", 30 * time.Second, true},
		{"Packages.xz default", meta(), "/debian/dists/stable/main/binary-amd64/Packages.xz", 30 * time.Second, true},
		{"diff Index default", meta(), "/debian/dists/stable/main/binary-amd64/Packages.diff/Index", 30 * time.Second, true},
		{"by-hash immutable", meta(), "/debian/dists/stable/main/binary-amd64/by-hash/SHA256/abcd", 0, false},
		{"deb immutable", meta(), "/debian/pool/main/h/hello/hello_2.10_amd64.deb", 0, false},
		{"orig tarball immutable", meta(), "/debian/pool/main/h/hello/hello_2.10.orig.tar.gz", 0, false},
		{"update image never stale", meta(), "/westus2/inst/id/f.swu", 0, false},
		{"origin max-age beats apt default", meta("Cache-Control", "max-age=5"), "/debian/dists/stable/InRelease", 5 * time.Second, true},
	}
	for _, c := range cases {
		ttl, expires := h.freshnessLifetime(c.m, c.uri)
		if ttl != c.ttl || expires != c.expires {
			t.Errorf("%s: lifetime %s, expires %v; want %s, %v", c.name, ttl, expires, c.ttl, c.expires)
		}
	}
}

func TestConcurrentRevalidationsCollapseIntoOne(t *testing.T) {
	o := newOrigin(t)
	path := "/debian/dists/bookworm/InRelease"
	want := o.add(path, 30*kib, 103)
	o.setCacheControl(path, "max-age=0")
	g := startGateway(t, o, "")
	readAll(t, g.get(path, "origin.test"))
	c := cacheOf(t, g)

	release := newGate(t)
	var mu sync.Mutex
	conditional := 0
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		if r.Header.Get("If-None-Match") == "" {
			return false
		}
		mu.Lock()
		conditional++
		mu.Unlock()
		<-release.ch
		return false // http.ServeContent answers 304
	})
	const n = 10
	joined := c.stats.collapsed.Load()
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := testClient.Get(g.url + path + "?cacheHostOrigin=origin.test")
			if err != nil {
				errs <- err.Error()
				return
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || sum(got) != sum(want) {
				errs <- fmt.Sprintf("status %d err %v equal %v", resp.StatusCode, err, sum(got) == sum(want))
			}
		}()
	}
	// Every client but the first joins the first one's revalidation; the
	// counter says when they all have (bounded, in case one never does).
	for deadline := time.Now().Add(10 * time.Second); c.stats.collapsed.Load()-joined < n-1; {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d clients joined the revalidation", c.stats.collapsed.Load()-joined, n-1)
		}
		runtime.Gosched()
	}
	release.open()
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	waitAllFills()
	mu.Lock()
	defer mu.Unlock()
	if conditional != 1 {
		t.Errorf("%d conditional requests reached the origin, want 1", conditional)
	}
}

func TestNoStoreAndPrivateAreNeverKept(t *testing.T) {
	for _, cc := range []string{"no-store", "private, max-age=600"} {
		t.Run(cc, func(t *testing.T) {
			o := newOrigin(t)
			want := o.add("/secret.bin", 700*kib, 104) // several fills
			o.setCacheControl("/secret.bin", cc)
			g := startGateway(t, o, "")
			c := cacheOf(t, g)
			for i := 0; i < 2; i++ {
				resp := g.get("/secret.bin", "origin.test")
				got := readAll(t, resp)
				if resp.StatusCode != 200 || sum(got) != sum(want) {
					t.Fatalf("request %d: status %d, equal %v", i, resp.StatusCode, sum(got) == sum(want))
				}
				if cs := resp.Header.Get("Cache-Status"); !strings.Contains(cs, "fwd=miss") {
					t.Errorf("request %d: Cache-Status %q, want a miss every time", i, cs)
				}
				if st := c.store.Stats(); st.Objects != 0 {
					t.Errorf("after request %d: %d objects indexed", i, st.Objects)
				}
			}
			if sent := o.bytesSent(); sent != 2*int64(len(want)) {
				t.Errorf("origin sent %d bytes for two requests of %d", sent, len(want))
			}
			expectNoDataFiles(t, g)
		})
	}
}

func TestNoCacheRevalidatesEveryTime(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/nc.bin", 200*kib, 105)
	o.setCacheControl("/nc.bin", "no-cache")
	g := startGateway(t, o, "")
	for i := 0; i < 3; i++ {
		resp := g.get("/nc.bin", "origin.test")
		got := readAll(t, resp)
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("request %d: status %d, equal %v", i, resp.StatusCode, sum(got) == sum(want))
		}
		if cs := resp.Header.Get("Cache-Status"); i > 0 && cs != "caddy-mcc; fwd=stale; fwd-status=304" {
			t.Errorf("request %d: Cache-Status %q, want a 304 revalidation", i, cs)
		}
	}
	if sent := o.bytesSent(); sent != int64(len(want)) {
		t.Errorf("origin sent %d body bytes; want the object once, then 304s", sent)
	}
}

func TestConcurrentNoStoreClientsAllGetTheirBytes(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/ns.bin", 30*kib, 106)
	o.setCacheControl("/ns.bin", "no-store")
	g := startGateway(t, o, "")
	c := cacheOf(t, g)
	var wg sync.WaitGroup
	errs := make(chan string, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := testClient.Get(g.url + "/ns.bin?cacheHostOrigin=origin.test")
			if err != nil {
				errs <- err.Error()
				return
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || sum(got) != sum(want) {
				errs <- fmt.Sprintf("status %d err %v equal %v", resp.StatusCode, err, sum(got) == sum(want))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if st := c.store.Stats(); st.Objects != 0 {
		t.Errorf("%d objects indexed of a no-store response", st.Objects)
	}
	expectNoDataFiles(t, g)
}

// expectNoDataFiles stops Caddy, which waits for every request to end and
// closes the store, and checks that no object data is left on disk.
func expectNoDataFiles(t *testing.T, g *gateway) {
	t.Helper()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(g.storeDir(), "data", "*", "*"))
	if len(files) != 0 {
		t.Errorf("data files left of a no-store response: %v", files)
	}
}
