package caddymcc

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// Cache keys and upstream requests are built from one normalised path, so
// an origin that does not resolve dot segments cannot store one resource
// under another's key.

func TestNormalizePath(t *testing.T) {
	for in, want := range map[string]string{
		"/":                   "/",
		"/a/b":                "/a/b",
		"/repo/./x.deb":       "/repo/x.deb",
		"/x/../pkg/a.swu":     "/pkg/a.swu",
		"/x/%2e%2e/pkg/a.swu": "/pkg/a.swu",
		"/x/%2E%2e/pkg/a.swu": "/pkg/a.swu",
		"/x/.%2E/pkg/a.swu":   "/pkg/a.swu",
		"/pkg/%2e/a.swu":      "/pkg/a.swu",
		"/../../etc/passwd":   "/etc/passwd",
		"/%2e%2e/%2e%2e/etc":  "/etc",
		"/a/b/..":             "/a/",
		"/a/.":                "/a/",
		"/%70kg/%7Ea%5fb":     "/pkg/~a_b",
		"/a%2fb":              "/a%2Fb",
		"/a/..%2Fb":           "/a/..%2Fb", // one segment named "..%2Fb", not ".."
		"/a/%2e%2e%2fb":       "/a/..%2Fb",
		"/a%20b":              "/a%20b",
		"/a/.hidden/x":        "/a/.hidden/x",
		"/a/..b/x":            "/a/..b/x",
		"/a%25%32%65":         "/a%252e", // an escaped "%" stays escaped: no second decoding
		"/a%":                 "/a%",
		"/a%4":                "/a%4",
	} {
		if got := normalizePath(in); got != want {
			t.Errorf("normalizePath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestClassifyNormalisesKeyAndUpstreamURITogether(t *testing.T) {
	allowed := []originPattern{{host: "origin.test"}}
	cases := []struct {
		target, host, uri string
	}{
		{"/x/../pkg/a.swu?cacheHostOrigin=origin.test", "gw", "/pkg/a.swu"},
		{"/x/%2e%2e/pkg/a.swu?q=1&cacheHostOrigin=origin.test", "gw", "/pkg/a.swu?q=1"},
		{"/x/../pkg/a.swu?q=/../b", "origin.test", "/pkg/a.swu?q=/../b"}, // the query is not a path
		{"http://origin.test", "origin.test", "/"},
		{"http://origin.test?x=1", "origin.test", "/?x=1"},
		{"http://origin.test/a/./b", "origin.test", "/a/b"},
		// The parameter's name is read decoded, as a parent gateway reads it.
		{"/a?cacheHost%4Frigin=origin.test&x=1", "gw", "/a?x=1"},
	}
	for _, c := range cases {
		r := httptest.NewRequest(http.MethodGet, c.target, nil)
		r.Host = c.host
		tg, err := classify(r, allowed)
		if err != nil {
			t.Errorf("GET %s (Host %s) refused: %v", c.target, c.host, err)
			continue
		}
		if tg.uri != c.uri || tg.key != "origin.test"+c.uri {
			t.Errorf("GET %s (Host %s) = uri %q key %q, want uri %q and key origin.test%s", c.target, c.host, tg.uri, tg.key, c.uri, c.uri)
		}
	}
}

// uriLog makes the origin record the request-target of every request for a
// stored object, as it arrived on the wire.
func uriLog(o *testOrigin) func() []string {
	var mu sync.Mutex
	var uris []string
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		mu.Lock()
		uris = append(uris, r.RequestURI)
		mu.Unlock()
		return false
	})
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), uris...)
	}
}

func TestDotSegmentSpellingsShareOneEntryAndReachOriginNormalised(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/pkg/a.swu", 150*kib, 201)
	uris := uriLog(o)
	g := startGateway(t, o, "")
	for i, p := range []string{"/x/../pkg/a.swu", "/pkg/a.swu", "/pkg/./a.swu", "/x/%2e%2e/pkg/a.swu", "/../../pkg/a.swu", "/%70kg/%2E/a.swu"} {
		resp, got := rawRequest(t, g, "GET "+p+"?cacheHostOrigin=origin.test HTTP/1.1", "Host: 127.0.0.1")
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("GET %s: status %d, equal %v", p, resp.StatusCode, sum(got) == sum(want))
		}
		if cs := resp.Header.Get("Cache-Status"); i > 0 && cs != csHit {
			t.Errorf("GET %s: Cache-Status %q, want a hit on the entry of /pkg/a.swu", p, cs)
		}
	}
	g.waitFills()
	if log := o.log(); len(log) != len(uris()) {
		t.Errorf("origin was asked for paths it does not have: %+v", log)
	}
	got := uris()
	if len(got) == 0 {
		t.Fatal("origin never asked")
	}
	for _, u := range got {
		if u != "/pkg/a.swu" {
			t.Errorf("origin was asked for %q, want exactly /pkg/a.swu", u)
		}
	}
}

func TestCanonicalAliasesNormaliseLikeOtherOrigins(t *testing.T) {
	o := newOrigin(t)
	const path = "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
	want := o.add(path, 150*kib, 202)
	uris := uriLog(o)
	g := startGateway(t, o, "canonical deb.debian.org ftp.de.debian.org ftp.us.debian.org")
	for i, c := range []struct{ path, host string }{
		{"/debian/dists/../pool/main/h/hello/hello_2.10-3_amd64.deb", "ftp.de.debian.org"},
		{path, "ftp.us.debian.org"},
		{"/debian/pool/main/h/./hello/hello_2.10-3_amd64.deb", "deb.debian.org"},
		{"/debian/pool/main/%2e%2e/main/h/hello/hello_2.10-3_amd64.deb", "ftp.us.debian.org"},
	} {
		resp, got := rawRequest(t, g, "GET "+c.path+"?cacheHostOrigin="+c.host+" HTTP/1.1", "Host: 127.0.0.1")
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("GET %s via %s: status %d, equal %v", c.path, c.host, resp.StatusCode, sum(got) == sum(want))
		}
		if cs := resp.Header.Get("Cache-Status"); i > 0 && cs != csHit {
			t.Errorf("GET %s via %s: Cache-Status %q, want a hit on the canonical entry", c.path, c.host, cs)
		}
	}
	g.waitFills()
	log := o.log()
	if len(log) == 0 || log[0].host != "ftp.de.debian.org" {
		t.Errorf("origin saw %+v; want the mirror the first client named", log)
	}
	for _, u := range uris() {
		if u != path {
			t.Errorf("origin was asked for %q, want exactly %s", u, path)
		}
	}
}

func TestAbsoluteFormWithoutPathAsksForRoot(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/", 10*kib, 203)
	uris := uriLog(o)
	g := startGateway(t, o, "")
	for _, label := range []string{"cold", "hit"} {
		resp, got := rawRequest(t, g, "GET http://origin.test HTTP/1.1", "Host: origin.test")
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("%s GET http://origin.test: status %d, equal %v", label, resp.StatusCode, sum(got) == sum(want))
		}
	}
	g.waitFills()
	if got := uris(); len(got) != 1 || got[0] != "/" {
		t.Errorf("origin was asked for %q, want one request for /", got)
	}
}

func TestHostilePathsNeverAliasAnotherKey(t *testing.T) {
	o := newOrigin(t)
	secret := o.add("/secret.bin", 10*kib, 204)
	// The origin decodes %2F and serves other bytes there.
	other := o.add("/a/../secret.bin", 10*kib, 205)
	g := startGateway(t, o, "")
	readAll(t, g.get("/secret.bin", "origin.test"))
	// "..%2F" is not a dot segment: whatever the origin makes of it, the
	// answer is its own entry, fetched for exactly that path.
	resp, got := rawRequest(t, g, "GET /a/..%2Fsecret.bin?cacheHostOrigin=origin.test HTTP/1.1", "Host: 127.0.0.1")
	if resp.StatusCode != 200 || sum(got) == sum(secret) || sum(got) != sum(other) {
		t.Errorf("/a/..%%2Fsecret.bin: status %d, equal to /secret.bin %v, equal to its own object %v", resp.StatusCode, sum(got) == sum(secret), sum(got) == sum(other))
	}
	if cs := resp.Header.Get("Cache-Status"); strings.Contains(cs, "hit") {
		t.Errorf("/a/..%%2Fsecret.bin: Cache-Status %q, want a miss of its own", cs)
	}
}
