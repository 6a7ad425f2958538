package caddymcc

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
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
	// serving counts handlers running; quiet is closed while there are
	// none (a handler's last bytes can reach the gateway before its Write
	// returns and counts them).
	serving int
	quiet   chan struct{}
}

type originObject struct {
	data  []byte
	etag  string
	ctype string
	cc    string // Cache-Control, when set
}

type originRequest struct {
	path, query, rangeHeader, host string
	header                         http.Header
}

func newOrigin(t *testing.T) *testOrigin {
	o := &testOrigin{t: t, objects: make(map[string]*originObject), quiet: make(chan struct{})}
	close(o.quiet)
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
	if o.serving++; o.serving == 1 {
		o.quiet = make(chan struct{})
	}
	defer func() {
		o.mu.Lock()
		if o.serving--; o.serving == 0 {
			close(o.quiet)
		}
		o.mu.Unlock()
	}()
	obj := o.objects[r.URL.Path]
	o.requests = append(o.requests, originRequest{r.URL.Path, r.URL.RawQuery, r.Header.Get("Range"), r.Host, r.Header.Clone()})
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
	quiet := o.quiet
	o.mu.Unlock()
	select {
	case <-quiet:
	case <-waitCtx(o.t).Done():
		o.t.Errorf("origin handlers still running")
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.sent
}

func (o *testOrigin) log() []originRequest {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]originRequest(nil), o.requests...)
}

// expectRanges checks that the origin got requests for these Range
// headers, in this order, and no others.
func (o *testOrigin) expectRanges(want ...string) {
	o.t.Helper()
	var got []string
	for _, r := range o.log() {
		got = append(got, r.rangeHeader)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		o.t.Errorf("the origin was asked for %q, want %q", got, want)
	}
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
// It never returns a port it returned before in this process: a test
// takes several (admin, sites) before anything listens on them, and the
// kernel may hand out a just-closed port again, which Caddy's listeners
// (SO_REUSEPORT) would then share, the admin API answering site requests.
func freePort(t *testing.T) int {
	portsMu.Lock()
	defer portsMu.Unlock()
	for {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
}

var (
	portsMu    sync.Mutex
	portsGiven = make(map[int]bool)
)

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

// startGateway loads a Caddy config built from gatewayConfig, with extra
// lines in the mcc block. Caddy is process-global, so gateway tests do not
// run in parallel.
func startGateway(t *testing.T, o *testOrigin, extra string) *gateway {
	t.Helper()
	return startGatewayFrom(t, o, strings.Replace(gatewayConfig, "{{extra}}", "\n\t\t"+extra, 1))
}

// startGatewayFrom is startGateway for a config text of gatewayConfig's
// form (its placeholders) that a test changed.
func startGatewayFrom(t *testing.T, o *testOrigin, text string) *gateway {
	t.Helper()
	g := &gateway{t: t, dir: t.TempDir(), adminAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	port := freePort(t)
	g.url = fmt.Sprintf("http://127.0.0.1:%d", port)
	r := strings.NewReplacer("{{admin}}", g.adminAddr, "{{dir}}", g.dir, "{{port}}", fmt.Sprint(port), "{{origin}}", o.addr(), "{{extra}}", "")
	g.load(adapt(t, r.Replace(text)))
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

// serveRange answers r like a Range-honouring origin would, writing the
// bytes of the requested range through write, which may pause or cut the
// body.
func serveRange(w http.ResponseWriter, r *http.Request, obj *originObject, write func(w http.ResponseWriter, body []byte)) {
	start, end := int64(0), int64(len(obj.data))-1
	status := http.StatusOK
	if rg := r.Header.Get("Range"); rg != "" {
		ranges, err := parseRange(rg, int64(len(obj.data)))
		if err != nil || len(ranges) != 1 {
			http.Error(w, "bad range", http.StatusRequestedRangeNotSatisfiable)
			return
		}
		start, end = ranges[0].start, ranges[0].start+ranges[0].length-1
		status = http.StatusPartialContent
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end, len(obj.data)))
	}
	w.Header().Set("Etag", obj.etag)
	w.Header().Set("Content-Length", strconv.FormatInt(end-start+1, 10))
	w.WriteHeader(status)
	write(w, obj.data[start:end+1])
}

// gate holds origin handlers until the test opens it; it opens at cleanup
// too, so a failing test does not leave handlers blocked.
type gate struct {
	ch   chan struct{}
	once sync.Once
}

func newGate(t *testing.T) *gate {
	g := &gate{ch: make(chan struct{})}
	t.Cleanup(g.open)
	return g
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

// waitCtx bounds a wait that would otherwise hang the test run if the
// behaviour under test is broken; it is not a timing assertion.
func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// holdAfter makes the origin answer like a Range-honouring origin but
// stop after the first n bytes of each body until release opens.
func (o *testOrigin) holdAfter(n int, release *gate) {
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		serveRange(w, r, obj, func(w http.ResponseWriter, body []byte) {
			w.Write(body[:n])
			w.(http.Flusher).Flush()
			<-release.ch
			w.Write(body[n:])
		})
		return true
	})
}

// chainConfig is one Caddy config with three gateways on loopback: top
// (dials the origin), middle (whose parent is top) and bottom (whose parent
// is middle), each with a store of its own, as nested ISA-95 levels are.
// cacheSite is the Caddyfile site of one test cache level named name on
// port (a placeholder such as {{top}}), its store in {{dir}}/name, with
// extra mcc lines and the proxy line(s) that fill its misses.
func cacheSite(port, name, extra, proxy string) string {
	if extra != "" {
		extra = "\t\t" + extra + "\n"
	}
	return "http://:" + port + " {\n\tbind 127.0.0.1\n\tmcc {\n\t\tdir {{dir}}/" + name +
		"\n\t\tblock_size 64KiB\n\t\tmin_free 0\n\t\torigins origin.test\n\t\tname " + name + "\n" + extra +
		"\t}\n\t" + proxy + "\n}\n"
}

// cacheOf returns the gateway's cache once its store is open and its
// ledger has taken its first sample.
func cacheOf(t *testing.T, g *gateway) *cache {
	t.Helper()
	return cacheAt(t, g.storeDir())
}

// cacheAt returns the cache of store directory dir once its store is open
// and its ledger has taken its first sample.
func cacheAt(t *testing.T, dir string) *cache {
	t.Helper()
	c, err := findCache(waitCtx(t), dir)
	if err != nil {
		t.Fatalf("finding the cache: %v", err)
	}
	return c
}

func gatewayPort(g *gateway) int {
	port, _ := strconv.Atoi(strings.TrimPrefix(g.url, "http://127.0.0.1:"))
	return port
}

// opsConfig is the harness's gateway with the summary mounted twice: at
// /summary in the gateway's own site (so before mcc), and as a site of
// its own on summaryPort that names the store.
func opsConfig(t *testing.T, g *gateway, o *testOrigin, summaryPort int) []byte {
	t.Helper()
	const bind = "\tbind 127.0.0.1\n"
	if !strings.Contains(gatewayConfig, bind) {
		t.Fatal("gatewayConfig has no bind line to put mcc_summary after")
	}
	text := strings.Replace(gatewayConfig, bind, bind+"\tmcc_summary /summary\n", 1) +
		"http://:{{sport}} {\n\tbind 127.0.0.1\n\tmcc_summary {\n\t\tdir {{dir}}/store\n\t}\n}\n"
	r := strings.NewReplacer("{{admin}}", g.adminAddr, "{{dir}}", g.dir, "{{port}}", strconv.Itoa(gatewayPort(g)),
		"{{origin}}", o.addr(), "{{extra}}", "", "{{sport}}", strconv.Itoa(summaryPort))
	return adapt(t, r.Replace(text))
}

// startOpsGateway starts the harness's gateway with the summary mounted,
// as startGateway does; it returns the summary site's URL.
func startOpsGateway(t *testing.T, o *testOrigin) (*gateway, string) {
	t.Helper()
	g := &gateway{t: t, dir: t.TempDir(), adminAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	g.url = fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	sport := freePort(t)
	g.load(opsConfig(t, g, o, sport))
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return g, fmt.Sprintf("http://127.0.0.1:%d", sport)
}

// unserved reports whether err means the server closed a new connection
// without reading the request. Right after a reload that happens: on Linux
// each config listens on its own SO_REUSEPORT socket, and connections still
// queued on the old one when it closes are reset. Such a request can be
// sent again.
func unserved(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// adminClient opens a connection per call: a reload replaces the admin
// server, and a kept-alive connection would still reach the old one.
var adminClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// adminCall sends a request to the gateway's admin API, with body as JSON
// unless it is nil, and returns the status and body.
func adminCall(t *testing.T, g *gateway, method, path string, body any) (int, []byte) {
	t.Helper()
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			t.Fatal(err)
		}
	}
	var resp *http.Response
	for attempt := 0; ; attempt++ {
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(payload)
		}
		req, err := http.NewRequestWithContext(waitCtx(t), method, "http://"+g.adminAddr+path, rd)
		if err != nil {
			t.Fatal(err)
		}
		resp, err = adminClient.Do(req)
		if err == nil {
			break
		}
		if !unserved(err) || attempt == 2 {
			t.Fatalf("%s %s: %v", method, path, err)
		}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading: %v", method, path, err)
	}
	return resp.StatusCode, data
}

// adminJSON is adminCall for an answer that must be 200 and JSON.
func adminJSON(t *testing.T, g *gateway, method, path string, body, out any) {
	t.Helper()
	status, data := adminCall(t, g, method, path, body)
	if status != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, status, data)
	}
	if err := json.Unmarshal(data, out); err != nil {
		t.Fatalf("%s %s: %v in %s", method, path, err, data)
	}
}

// getOwnConn sends a GET for path to the gateway on a connection of its
// own, asking the server to close it after the answer. The server closes
// it only once the request's handler has returned, so after done returns
// the handler has counted every byte it sent: a client that has read the
// whole body may otherwise look at the counters a moment before the
// handler adds its last bytes.
func getOwnConn(t *testing.T, g *gateway, path, origin string, hdr ...string) (resp *http.Response, done func()) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, g.url+path+"?cacheHostOrigin="+origin, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	req.Close = true
	var br *bufio.Reader
	for attempt := 0; ; attempt++ {
		conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		if err = req.Write(conn); err == nil {
			br = bufio.NewReader(conn)
			resp, err = http.ReadResponse(br, req)
		}
		if err == nil {
			break
		}
		if !unserved(err) || attempt == 2 {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	return resp, func() {
		t.Helper()
		if _, err := io.Copy(io.Discard, br); err != nil {
			t.Fatalf("GET %s: waiting for the server to close: %v", path, err)
		}
	}
}

// download gets path from the gateway whole, checks the body and the
// Cache-Status, and returns once the handler is done.
func download(t *testing.T, g *gateway, path, origin string, want []byte, wantStatus string) {
	t.Helper()
	resp, done := getOwnConn(t, g, path, origin)
	got := readAll(t, resp)
	done()
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("GET %s for %s: status %d, body equal %v", path, origin, resp.StatusCode, sum(got) == sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != wantStatus {
		t.Fatalf("GET %s for %s: Cache-Status %q, want %q", path, origin, cs, wantStatus)
	}
}

const (
	csHit  = "caddy-mcc; hit"
	csMiss = "caddy-mcc; fwd=miss"
)

// withholdBlockEnds makes the origin hold back the last byte of every block
// it sends until the client has received a first byte of that block (the
// client reports block indexes on reached). A block then cannot land on
// disk before the client's request has claimed it, so which bytes are hits
// and which are misses does not depend on how far the fill runs ahead.
func withholdBlockEnds(t *testing.T, o *testOrigin, block int, reached <-chan int) {
	ctx := waitCtx(t)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		serveRange(w, r, obj, func(w http.ResponseWriter, body []byte) {
			start := 0
			if cr := w.Header().Get("Content-Range"); cr != "" {
				fmt.Sscanf(cr, "bytes %d-", &start)
			}
			for off := 0; off < len(body); off += block {
				piece := body[off:min(off+block, len(body))]
				w.Write(piece[:len(piece)-1])
				w.(http.Flusher).Flush()
				for got := -1; got != (start+off)/block; {
					select {
					case got = <-reached:
					case <-ctx.Done():
						return
					}
				}
				w.Write(piece[len(piece)-1:])
			}
		})
		return true
	})
}

// readReporting reads a body that starts at offset 0 of the object,
// reporting on reached each block of which a first byte arrived.
func readReporting(t *testing.T, resp *http.Response, block int, reached chan<- int) []byte {
	t.Helper()
	defer resp.Body.Close()
	var out []byte
	buf := make([]byte, 8192)
	next := 0
	for {
		n, err := resp.Body.Read(buf)
		out = append(out, buf[:n]...)
		for ; next*block < len(out); next++ {
			select {
			case reached <- next:
			default:
			}
		}
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("reading body: %v", err)
		}
	}
}
