package caddymcc

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// testOrigin is a real HTTP origin on loopback serving deterministic objects
// with ETags and Range support, counting what it sends.
type testOrigin struct {
	t   *testing.T
	srv *httptest.Server

	mu       sync.Mutex
	objects  map[string]*originObject
	requests []originRequest
	sent     int64 // body bytes written
	hook     func(w http.ResponseWriter, r *http.Request, obj *originObject) bool
}

type originObject struct {
	data  []byte
	etag  string
	ctype string
	cc    string // Cache-Control, when set
}

type originRequest struct {
	path, query, rangeHeader, host string
}

func newOrigin(t *testing.T) *testOrigin {
	o := &testOrigin{t: t, objects: make(map[string]*originObject)}
	o.srv = httptest.NewServer(http.HandlerFunc(o.serve))
	t.Cleanup(o.srv.Close)
	return o
}

// addr is the origin's host:port.
func (o *testOrigin) addr() string { return strings.TrimPrefix(o.srv.URL, "http://") }

// add stores an object of n deterministic bytes at path and returns it.
func (o *testOrigin) add(path string, n int, seed uint64) []byte {
	data := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, uint64(n)))
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for k := 0; k < 8; k++ {
			data[i+k] = byte(v >> (8 * k))
		}
	}
	for i := n - n%8; i < n; i++ {
		data[i] = byte(r.Uint32())
	}
	o.mu.Lock()
	o.objects[path] = &originObject{data: data, etag: fmt.Sprintf(`"%x-%d"`, seed, n), ctype: "application/octet-stream"}
	o.mu.Unlock()
	return data
}

// setCacheControl gives the object at path a Cache-Control header.
func (o *testOrigin) setCacheControl(path, cc string) {
	o.mu.Lock()
	o.objects[path].cc = cc
	o.mu.Unlock()
}

func (o *testOrigin) setHook(h func(w http.ResponseWriter, r *http.Request, obj *originObject) bool) {
	o.mu.Lock()
	o.hook = h
	o.mu.Unlock()
}

func (o *testOrigin) serve(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	obj := o.objects[r.URL.Path]
	o.requests = append(o.requests, originRequest{r.URL.Path, r.URL.RawQuery, r.Header.Get("Range"), r.Host})
	hook := o.hook
	o.mu.Unlock()
	if obj == nil {
		http.Error(w, "no such object", http.StatusNotFound)
		return
	}
	cw := &countingWriter{ResponseWriter: w, o: o}
	if hook != nil && hook(cw, r, obj) {
		return
	}
	w.Header().Set("Etag", obj.etag)
	w.Header().Set("Content-Type", obj.ctype)
	if obj.cc != "" {
		w.Header().Set("Cache-Control", obj.cc)
	}
	http.ServeContent(cw, r, "", time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), bytes.NewReader(obj.data))
}

// bytesSent returns the body bytes the origin sent, once every fill in
// flight has ended: a client can have the last bytes of a fill before the
// origin's handler has counted its last write.
func (o *testOrigin) bytesSent() int64 {
	waitAllFills()
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.sent
}

func (o *testOrigin) log() []originRequest {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]originRequest(nil), o.requests...)
}

type countingWriter struct {
	http.ResponseWriter
	o *testOrigin
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.o.mu.Lock()
	c.o.sent += int64(n)
	c.o.mu.Unlock()
	return n, err
}

func (c *countingWriter) Flush() { http.NewResponseController(c.ResponseWriter).Flush() }

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// gateway is Caddy running in this process with the mcc handler in front of
// reverse_proxy to a test origin.
type gateway struct {
	t         *testing.T
	url       string // http://127.0.0.1:port
	adminAddr string
	dir       string
}

// gatewayConfig is the Caddyfile of a test gateway: a top gateway whose
// reverse_proxy dials the test origin and sends the origin's host.
const gatewayConfig = testGlobals + `http://:{{port}} {
	bind 127.0.0.1
	mcc {
		dir {{dir}}/store
		block_size 64KiB
		read_ahead 256KiB
		min_free 0
		origins origin.test *.cdn.test
		fill_timeout 5s{{extra}}
	}
	reverse_proxy {{origin}} {
		rewrite {http.mcc.origin_uri}
		header_up Host {http.mcc.origin_host}
	}
}
`

// startGateway loads a Caddy config built from gatewayConfig. Caddy is
// process-global, so gateway tests do not run in parallel.
func startGateway(t *testing.T, o *testOrigin, extra string) *gateway {
	t.Helper()
	g := &gateway{t: t, dir: t.TempDir(), adminAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	port := freePort(t)
	g.url = fmt.Sprintf("http://127.0.0.1:%d", port)
	g.load(g.config(o, port, extra))
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return g
}

func (g *gateway) config(o *testOrigin, port int, extra string) []byte {
	r := strings.NewReplacer("{{admin}}", g.adminAddr, "{{dir}}", g.dir, "{{port}}", fmt.Sprint(port), "{{origin}}", o.addr(), "{{extra}}", "\n\t\t"+extra)
	return adapt(g.t, r.Replace(gatewayConfig))
}

func (g *gateway) load(cfg []byte) {
	g.t.Helper()
	if err := caddy.Load(cfg, true); err != nil {
		g.t.Fatalf("loading config: %v", err)
	}
}

// get fetches url for path from the gateway with extra headers.
func (g *gateway) get(path, origin string, hdr ...string) *http.Response {
	g.t.Helper()
	req, err := http.NewRequest(http.MethodGet, g.url+path+"?cacheHostOrigin="+origin, nil)
	if err != nil {
		g.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := testClient.Do(req)
	if err != nil {
		g.t.Fatalf("GET %s: %v", path, err)
	}
	return resp
}

// testClient never follows redirects, never asks for gzip and has no
// connection limit.
var testClient = &http.Client{
	Transport: &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 200},
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// readAll reads a response body and closes it.
func readAll(t *testing.T, resp *http.Response) []byte {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading body: %v", err)
	}
	return b
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// storedBlocks counts the data files of the gateway's store, as a check
// that something reached the disk.
func (g *gateway) storeDir() string { return filepath.Join(g.dir, "store") }

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// waitFills waits until no fill of the gateway's store is in flight, for
// tests whose next step must not join a fill started by the previous one.
func (g *gateway) waitFills() {
	caches.Range(func(k, v any) bool {
		if k == g.storeDir() {
			v.(*cache).running.Wait()
		}
		return true
	})
}

// waitAllFills waits until no fill of any store is in flight.
func waitAllFills() {
	caches.Range(func(_, v any) bool {
		v.(*cache).running.Wait()
		return true
	})
}

// testGlobals is the global options block of the test configs: the admin
// API on loopback, no automatic HTTPS, nothing persisted outside the
// test's directory, quiet logs.
const testGlobals = `{
	admin {{admin}}
	auto_https off
	persist_config off
	storage file_system {{dir}}/caddy
	log {
		level ERROR
	}
}
`

// adapt turns a test Caddyfile into JSON config.
func adapt(t *testing.T, text string) []byte {
	t.Helper()
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v", err)
	}
	return cfg
}

// loadCaddyfile loads a test Caddyfile into this process's Caddy (a
// reload when one is running); startCaddyfile also stops Caddy when the
// test ends.
func loadCaddyfile(t *testing.T, text string) {
	t.Helper()
	if err := caddy.Load(adapt(t, text), true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
}

func startCaddyfile(t *testing.T, text string) {
	t.Helper()
	loadCaddyfile(t, text)
	t.Cleanup(func() { caddy.Stop() })
}
