package caddymcc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"
	"golang.org/x/net/html"
)

// Tests in this file pin the operations side: the summary, the metrics,
// the admin routes and the command line, against a gateway running in
// this process.

// holdPeriods stretches the summary period to an hour, so that only the
// test closes periods (with closePeriod) and the period figures are exact.
// Call it before starting the gateway.
func holdPeriods(t *testing.T) {
	old := summaryPeriod
	summaryPeriod = time.Hour
	t.Cleanup(func() { summaryPeriod = old })
}

// cacheOf returns the gateway's cache once its store is open and its
// ledger has taken its first sample.
func cacheOf(t *testing.T, g *gateway) *cache {
	t.Helper()
	c, err := findCache(waitCtx(t), g.storeDir())
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

func TestCountersAddUpForMissPartialHit(t *testing.T) {
	holdPeriods(t)
	o := newOrigin(t)
	const block = harnessBlockSize
	want := o.add("/four.bin", 4*block, 70)
	reached := make(chan int, 16)
	withholdBlockEnds(t, o, block, reached)
	g, summaryURL := startOpsGateway(t, o)
	c := cacheOf(t, g)

	// A miss of block 0, a partial hit (block 0 from disk, 1-3 fetched),
	// then a hit of all four blocks.
	resp, done := getOwnConn(t, g, "/four.bin", "origin.test", "Range", fmt.Sprintf("bytes=0-%d", block-1))
	got := readReporting(t, resp, block, reached)
	done()
	if resp.StatusCode != 206 || !bytes.Equal(got, want[:block]) || resp.Header.Get("Cache-Status") != csMiss {
		t.Fatalf("block 0: status %d, %d bytes, Cache-Status %q", resp.StatusCode, len(got), resp.Header.Get("Cache-Status"))
	}
	g.waitFills()
	resp, done = getOwnConn(t, g, "/four.bin", "origin.test")
	got = readReporting(t, resp, block, reached)
	done()
	if resp.StatusCode != 200 || !bytes.Equal(got, want) || resp.Header.Get("Cache-Status") != "caddy-mcc; fwd=partial" {
		t.Fatalf("whole object: status %d, %d bytes, Cache-Status %q", resp.StatusCode, len(got), resp.Header.Get("Cache-Status"))
	}
	g.waitFills()
	download(t, g, "/four.bin", "origin.test", want, csHit)
	c.closePeriod(time.Now())

	const hit, miss = block + 4*block, block + 3*block
	var s summary
	adminJSON(t, g, http.MethodGet, "/mcc/summary", nil, &s)
	wantBytes := byteSummary{HitBytes: hit, MissBytes: miss, EgressBytes: hit + miss, HitRatioBytes: float64(hit) / float64(hit+miss)}
	if s.byteSummary != wantBytes {
		t.Errorf("lifetime bytes %+v, want %+v", s.byteSummary, wantBytes)
	}
	if s.Period.byteSummary != wantBytes {
		t.Errorf("period bytes %+v, want %+v (all the traffic was in the one period)", s.Period.byteSummary, wantBytes)
	}
	if s.UpstreamBytes != 4*block || s.Objects != 1 || s.BytesOnDisk != 4*block || s.UpstreamErrors != 0 || s.FillsInFlight != 0 {
		t.Errorf("upstream_bytes %d objects %d bytes_on_disk %d upstream_errors %d fills_in_flight %d; want %d 1 %d 0 0",
			s.UpstreamBytes, s.Objects, s.BytesOnDisk, s.UpstreamErrors, s.FillsInFlight, 4*block, 4*block)
	}
	for st, n := range map[string]int64{"hit": 1, "miss": 1, "partial": 1, "bypass": 0, "error": 0} {
		if s.Requests[st] != n {
			t.Errorf("requests[%s] = %d, want %d", st, s.Requests[st], n)
		}
	}
	if s.Dir != g.storeDir() {
		t.Errorf("dir %q, want %q", s.Dir, g.storeDir())
	}

	// The handler answers the same, mounted beside mcc and on its own
	// site naming the store; the closed period was saved to disk.
	for _, u := range []string{g.url + "/summary", summaryURL + "/anything"} {
		resp, err := testClient.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		var hs summary
		if err := json.Unmarshal(readAll(t, resp), &hs); err != nil || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("%s: %v, Content-Type %q", u, err, resp.Header.Get("Content-Type"))
		}
		if hs.byteSummary != wantBytes || hs.Dir != g.storeDir() {
			t.Errorf("%s: %+v in %s, want %+v", u, hs.byteSummary, hs.Dir, wantBytes)
		}
	}
	saved, err := loadTotals(g.storeDir())
	if err != nil || saved.HitBytes != hit || saved.MissBytes != miss || saved.UpstreamBytes != 4*block {
		t.Errorf("%s: %+v, %v", counterFile, saved, err)
	}
	resp, err = http.Post(g.url+"/summary", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST to the summary: %d, want 405", resp.StatusCode)
	}
}

func TestLifetimeCountersSurviveRestart(t *testing.T) {
	holdPeriods(t)
	o := newOrigin(t)
	want := o.add("/r.bin", 320*kib, 71)
	g := startGateway(t, o, "")
	cacheOf(t, g)
	download(t, g, "/r.bin", "origin.test", want, csMiss)
	g.waitFills()
	download(t, g, "/r.bin", "origin.test", want, csHit)
	var before summary
	adminJSON(t, g, http.MethodGet, "/mcc/summary", nil, &before)
	n := int64(len(want))
	if before.EgressBytes != 2*n || before.UpstreamBytes != n || before.Requests["hit"] != 1 || before.Requests["miss"] != 1 {
		t.Fatalf("before restart: %+v", before)
	}

	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	g.load(g.config(o, gatewayPort(g), ""))
	cacheOf(t, g)
	download(t, g, "/r.bin", "origin.test", want, csHit)

	var after summary
	adminJSON(t, g, http.MethodGet, "/mcc/summary", nil, &after)
	if after.HitBytes != before.HitBytes+n || after.MissBytes != before.MissBytes || after.UpstreamBytes != n {
		t.Errorf("after restart: hitBytes %d missBytes %d upstream_bytes %d; want %d %d %d",
			after.HitBytes, after.MissBytes, after.UpstreamBytes, before.HitBytes+n, before.MissBytes, n)
	}
	if after.Requests["hit"] != 2 || after.Requests["miss"] != 1 {
		t.Errorf("after restart: requests %v, want 2 hits and 1 miss", after.Requests)
	}
	if !after.Since.Equal(before.Since) {
		t.Errorf("since moved from %v to %v across the restart", before.Since, after.Since)
	}
	// The period belongs to this run: it starts from the loaded totals.
	if after.Period.HitBytes != n || after.Period.MissBytes != 0 {
		t.Errorf("period after restart: %+v, want %d hit bytes only", after.Period.byteSummary, n)
	}
}

// scrape reads the admin API's /metrics.
func scrape(t *testing.T, g *gateway) map[string]*dto.MetricFamily {
	t.Helper()
	status, data := adminCall(t, g, http.MethodGet, "/metrics", nil)
	if status != 200 {
		t.Fatalf("/metrics: %d %s", status, data)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// metricValue returns the value of the metric of fams with the given
// labels besides dir (which must be the gateway's store); -1 if absent.
func metricValue(t *testing.T, g *gateway, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		if got["dir"] != g.storeDir() {
			continue
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if got[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

func TestMetricsStillMoveAfterReload(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/m.bin", 320*kib, 72)
	g := startGateway(t, o, "")
	download(t, g, "/m.bin", "origin.test", want, csMiss)
	g.waitFills()
	n := float64(len(want))

	m := scrape(t, g)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"caddy_mcc_requests_total", []string{"status", "miss"}, 1},
		{"caddy_mcc_requests_total", []string{"status", "hit"}, 0},
		{"caddy_mcc_upstream_bytes_total", nil, n},
		{"caddy_mcc_stored_objects", nil, 1},
		{"caddy_mcc_stored_bytes", nil, n},
		{"caddy_mcc_fills_in_flight", nil, 0},
		{"caddy_mcc_fill_errors_total", []string{"kind", "timeout"}, 0},
		{"caddy_mcc_evictions_total", nil, 0},
		{"caddy_mcc_max_size_bytes", nil, 0},
	} {
		if got := metricValue(t, g, m, c.name, c.labels...); got != c.want {
			t.Errorf("before reload: %s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	fromCache := metricValue(t, g, m, "caddy_mcc_served_bytes_total", "source", "cache")
	fromUpstream := metricValue(t, g, m, "caddy_mcc_served_bytes_total", "source", "upstream")
	if fromCache+fromUpstream != n || fromUpstream <= 0 {
		t.Errorf("served bytes: cache %v + upstream %v, want %v with some from upstream", fromCache, fromUpstream, n)
	}
	fills := metricValue(t, g, m, "caddy_mcc_fills_total")
	if fills < 1 || metricValue(t, g, m, "caddy_mcc_fill_duration_seconds") != fills {
		t.Errorf("fills_total %v, fill_duration_seconds count %v: want equal and at least 1", fills, metricValue(t, g, m, "caddy_mcc_fill_duration_seconds"))
	}

	// A reload gives the config a new registry: the collector must be in
	// it, and the counters must go on from where they were.
	cfg := g.config(o, gatewayPort(g), "read_ahead 128KiB")
	if status, body := adminCall(t, g, http.MethodPost, "/load", json.RawMessage(cfg)); status != 200 {
		t.Fatalf("reload: %d %s", status, body)
	}
	download(t, g, "/m.bin", "origin.test", want, csHit)
	// The admin endpoint as operators scrape it, and the new config's
	// own registry: until the old admin server has shut down, a scrape
	// may still reach it.
	actx := caddy.ActiveContext()
	active, err := actx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatalf("gathering the active registry: %v", err)
	}
	fams := map[string]*dto.MetricFamily{}
	for _, f := range active {
		fams[f.GetName()] = f
	}
	for src, m := range map[string]map[string]*dto.MetricFamily{"admin /metrics": scrape(t, g), "active registry": fams} {
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"caddy_mcc_requests_total", []string{"status", "miss"}, 1},
			{"caddy_mcc_requests_total", []string{"status", "hit"}, 1},
			{"caddy_mcc_served_bytes_total", []string{"source", "cache"}, fromCache + n},
			{"caddy_mcc_served_bytes_total", []string{"source", "upstream"}, fromUpstream},
			{"caddy_mcc_fills_total", nil, fills},
		} {
			if got := metricValue(t, g, m, c.name, c.labels...); got != c.want {
				t.Errorf("after reload, %s: %s%v = %v, want %v", src, c.name, c.labels, got, c.want)
			}
		}
	}
}

func TestPurgeMakesNextRequestAMiss(t *testing.T) {
	o := newOrigin(t)
	a := o.add("/a.bin", 300*kib, 73)
	b := o.add("/dir/b.bin", 300*kib, 74)
	g := startGateway(t, o, "")
	download(t, g, "/a.bin", "origin.test", a, csMiss)
	download(t, g, "/a.bin", "x.cdn.test", a, csMiss)
	download(t, g, "/dir/b.bin", "x.cdn.test", b, csMiss)
	g.waitFills()

	var res struct{ Purged int }
	adminJSON(t, g, http.MethodPost, "/mcc/purge", purgeRequest{Origin: "Origin.Test"}, &res)
	if res.Purged != 1 {
		t.Errorf("purging origin.test purged %d objects, want 1", res.Purged)
	}
	download(t, g, "/a.bin", "x.cdn.test", a, csHit)
	download(t, g, "/a.bin", "origin.test", a, csMiss)

	adminJSON(t, g, http.MethodPost, "/mcc/purge", purgeRequest{Prefix: "x.cdn.test/dir/"}, &res)
	if res.Purged != 1 {
		t.Errorf("purging prefix x.cdn.test/dir/ purged %d objects, want 1", res.Purged)
	}
	download(t, g, "/a.bin", "x.cdn.test", a, csHit)
	download(t, g, "/dir/b.bin", "x.cdn.test", b, csMiss)

	for _, c := range []struct {
		method string
		body   any
		want   int
	}{
		{http.MethodPost, map[string]string{}, 400},
		{http.MethodPost, purgeRequest{Origin: "origin.test", Prefix: "x"}, 400},
		{http.MethodPost, purgeRequest{Origin: "not a host"}, 400},
		{http.MethodPost, map[string]string{"orign": "origin.test"}, 400},
		{http.MethodGet, nil, 405},
	} {
		if status, body := adminCall(t, g, c.method, "/mcc/purge", c.body); status != c.want {
			t.Errorf("%s /mcc/purge %v: %d %s, want %d", c.method, c.body, status, body, c.want)
		}
	}
}

func TestObjectsListAndDelete(t *testing.T) {
	o := newOrigin(t)
	a := o.add("/a.bin", 300*kib, 75)
	b := o.add("/b.bin", 270*kib, 76)
	g := startGateway(t, o, "")
	download(t, g, "/a.bin", "origin.test", a, csMiss)
	download(t, g, "/b.bin", "x.cdn.test", b, csMiss)
	g.waitFills()

	var page objectList
	adminJSON(t, g, http.MethodGet, "/mcc/objects", nil, &page)
	if page.Total != 2 || len(page.Objects) != 2 {
		t.Fatalf("objects: %+v, want 2", page)
	}
	first := page.Objects[0]
	if first.Key != "origin.test/a.bin" || first.Origin != "origin.test" || first.Size != int64(len(a)) || first.BytesPresent != int64(len(a)) || first.LastAccess.IsZero() {
		t.Errorf("first object %+v", first)
	}
	adminJSON(t, g, http.MethodGet, "/mcc/objects?offset=1&limit=1", nil, &page)
	if page.Total != 2 || len(page.Objects) != 1 || page.Objects[0].Key != "x.cdn.test/b.bin" || page.Objects[0].Origin != "x.cdn.test" {
		t.Errorf("second page: %+v", page)
	}
	adminJSON(t, g, http.MethodGet, "/mcc/objects?origin=x.cdn.test", nil, &page)
	if page.Total != 1 || len(page.Objects) != 1 || page.Objects[0].Key != "x.cdn.test/b.bin" {
		t.Errorf("objects of x.cdn.test: %+v", page)
	}

	var del struct{ Deleted int }
	adminJSON(t, g, http.MethodDelete, "/mcc/objects?key=origin.test/a.bin", nil, &del)
	if del.Deleted != 1 {
		t.Errorf("delete: %+v", del)
	}
	if status, body := adminCall(t, g, http.MethodDelete, "/mcc/objects?key=origin.test/a.bin", nil); status != 404 {
		t.Errorf("deleting it again: %d %s, want 404", status, body)
	}
	download(t, g, "/b.bin", "x.cdn.test", b, csHit)
	download(t, g, "/a.bin", "origin.test", a, csMiss)

	for _, q := range []string{"?limit=0", "?limit=x", "?offset=-1", "?origin=a&prefix=b"} {
		if status, body := adminCall(t, g, http.MethodGet, "/mcc/objects"+q, nil); status != 400 {
			t.Errorf("GET /mcc/objects%s: %d %s, want 400", q, status, body)
		}
	}
	if status, _ := adminCall(t, g, http.MethodDelete, "/mcc/objects", nil); status != 400 {
		t.Errorf("DELETE without a key: %d, want 400", status)
	}
	if status, _ := adminCall(t, g, http.MethodGet, "/mcc/objects?dir=/no/such/store", nil); status != 404 {
		t.Errorf("objects of an unknown store: %d, want 404", status)
	}
}

// prefetch posts urls to the admin API and returns the results by index.
func prefetch(t *testing.T, g *gateway, urls ...string) []prefetchResult {
	t.Helper()
	status, data := adminCall(t, g, http.MethodPost, "/mcc/prefetch", prefetchRequest{URLs: urls})
	if status != 200 {
		t.Fatalf("prefetch: %d %s", status, data)
	}
	out := make([]prefetchResult, len(urls))
	sc := bufio.NewScanner(bytes.NewReader(data))
	lines := 0
	for sc.Scan() {
		var r prefetchResult
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.Index < 0 || r.Index >= len(urls) || r.URL != urls[r.Index] {
			t.Fatalf("prefetch line %q: %v", sc.Text(), err)
		}
		out[r.Index] = r
		lines++
	}
	if lines != len(urls) {
		t.Fatalf("prefetch answered %d lines for %d URLs", lines, len(urls))
	}
	return out
}

func TestPrefetchMakesDownloadsFullHits(t *testing.T) {
	o := newOrigin(t)
	objs := map[string][]byte{
		"/p1.bin":     o.add("/p1.bin", 300*kib+1, 77),
		"/p2.bin":     o.add("/p2.bin", 260*kib, 78),
		"/dir/p3.bin": o.add("/dir/p3.bin", 1*mib+5, 79),
	}
	g := startGateway(t, o, "")
	var urls []string
	for p := range objs {
		urls = append(urls, g.url+p+"?cacheHostOrigin=origin.test")
	}
	for i, r := range prefetch(t, g, urls...) {
		path := strings.TrimPrefix(strings.Split(urls[i], "?")[0], g.url)
		if r.Status != 200 || r.Error != "" || r.Bytes != int64(len(objs[path])) || r.CacheStatus != csMiss {
			t.Errorf("prefetch %s: %+v", path, r)
		}
	}
	g.waitFills()
	sent, asked := o.bytesSent(), len(o.log())
	for p, want := range objs {
		download(t, g, p, "origin.test", want, csHit)
	}
	if o.bytesSent() != sent || len(o.log()) != asked {
		t.Errorf("downloads after the prefetch reached the origin: %d more bytes, %d more requests", o.bytesSent()-sent, len(o.log())-asked)
	}

	// Only the gateway's own listeners are fetched from.
	refused := []string{
		"file:///etc/passwd",
		"http://192.0.2.1/p1.bin?cacheHostOrigin=origin.test",
		"http://" + o.addr() + "/p1.bin",
		"http://user@" + strings.TrimPrefix(g.url, "http://") + "/p1.bin?cacheHostOrigin=origin.test",
		"::",
	}
	for i, r := range prefetch(t, g, refused...) {
		if r.Error == "" || r.Status != 0 {
			t.Errorf("prefetch %s: %+v, want refused", refused[i], r)
		}
	}
	if len(o.log()) != asked {
		t.Error("a refused prefetch reached the origin")
	}
	r := prefetch(t, g, g.url+"/missing.bin?cacheHostOrigin=origin.test")[0]
	if r.Status != 404 || r.Error == "" {
		t.Errorf("prefetch of a missing object: %+v, want a 404 failure", r)
	}
	for _, body := range []any{prefetchRequest{}, prefetchRequest{URLs: urls, Concurrency: 99}} {
		if status, data := adminCall(t, g, http.MethodPost, "/mcc/prefetch", body); status != 400 {
			t.Errorf("prefetch %+v: %d %s, want 400", body, status, data)
		}
	}
}

// findAll returns the elements named tag under n.
func findAll(n *html.Node, tag string) []*html.Node {
	var out []*html.Node
	for c := range n.Descendants() {
		if c.Type == html.ElementNode && c.Data == tag {
			out = append(out, c)
		}
	}
	return out
}

func attr(n *html.Node, name string) string {
	for _, a := range n.Attr {
		if a.Key == name {
			return a.Val
		}
	}
	return ""
}

func TestSummaryPageRendersHTML(t *testing.T) {
	holdPeriods(t)
	o := newOrigin(t)
	want := o.add("/h.bin", 300*kib, 80)
	g, _ := startOpsGateway(t, o)
	c := cacheOf(t, g)
	download(t, g, "/h.bin", "origin.test", want, csMiss)
	g.waitFills()
	c.closePeriod(time.Now())
	download(t, g, "/h.bin", "origin.test", want, csHit)
	c.closePeriod(time.Now())

	get := func(u, accept string) (*http.Response, []byte) {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("Accept", accept)
		resp, err := adminClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp, readAll(t, resp)
	}
	browser := "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
	for _, u := range []string{g.url + "/summary", "http://" + g.adminAddr + "/mcc/summary"} {
		resp, body := get(u, browser)
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
			t.Fatalf("%s: %d %q", u, resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		// Well formed as XML, so every element is closed.
		dec := xml.NewDecoder(bytes.NewReader(body))
		for {
			if _, err := dec.Token(); err == io.EOF {
				break
			} else if err != nil {
				t.Fatalf("%s: not well formed: %v\n%s", u, err, body)
			}
		}
		doc, err := html.Parse(bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if titles := findAll(doc, "title"); len(titles) == 0 || titles[0].FirstChild == nil || titles[0].FirstChild.Data != "caddy-mcc summary" {
			t.Errorf("%s: no page title", u)
		}
		svgs := findAll(doc, "svg")
		if len(svgs) != 1 {
			t.Fatalf("%s: %d svg elements, want 1", u, len(svgs))
		}
		var bars int
		for _, r := range findAll(svgs[0], "rect") {
			if attr(r, "class") == "egress" {
				bars++
			}
		}
		if bars != 2 {
			t.Errorf("%s: %d egress bars, want one for each of the 2 periods", u, bars)
		}
		paths := findAll(svgs[0], "path")
		if len(paths) != 1 || !strings.HasPrefix(attr(paths[0], "d"), "M") || !strings.Contains(attr(paths[0], "d"), "L") {
			t.Errorf("%s: hit ratio path %v, want one line over two periods", u, paths)
		}
		text := &strings.Builder{}
		for n := range doc.Descendants() {
			if n.Type == html.TextNode {
				text.WriteString(n.Data + " ")
			}
		}
		for _, s := range []string{"hitRatioBytes", "100.0%", "300 KiB", g.storeDir()} {
			if !strings.Contains(text.String(), s) {
				t.Errorf("%s: page text lacks %q", u, s)
			}
		}
	}
	if resp, body := get(g.url+"/summary", "application/json, text/html;q=0.5"); resp.Header.Get("Content-Type") != "application/json" || !json.Valid(body) {
		t.Errorf("JSON preferred: got %q", resp.Header.Get("Content-Type"))
	}
	if resp, _ := get(g.url+"/summary?format=html", "application/json"); resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Errorf("format=html: got %q", resp.Header.Get("Content-Type"))
	}
}

func TestWantsHTML(t *testing.T) {
	for _, c := range []struct {
		accept, query string
		want          bool
	}{
		{"", "", false},
		{"*/*", "", false},
		{"application/json", "", false},
		{"text/html", "", true},
		{"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "", true},
		{"application/json, text/html;q=0.5", "", false},
		{"text/html;q=0", "", false},
		{"text/html", "format=json", false},
		{"", "format=html", true},
	} {
		r, _ := http.NewRequest(http.MethodGet, "/summary?"+c.query, nil)
		r.Header.Set("Accept", c.accept)
		if got := wantsHTML(r); got != c.want {
			t.Errorf("Accept %q, query %q: html %v, want %v", c.accept, c.query, got, c.want)
		}
	}
}

// runMcc runs `caddy mcc args...` as the caddy binary would, and returns
// what it printed.
func runMcc(args ...string) (string, error) {
	root := &cobra.Command{Use: "mcc"}
	caddycmd.Commands()["mcc"].CobraFunc(root)
	root.SetArgs(args)
	out := &bytes.Buffer{}
	root.SetOut(out)
	root.SetErr(out)
	err := root.Execute()
	return out.String(), err
}

func TestCommandsRunAgainstLiveServer(t *testing.T) {
	o := newOrigin(t)
	a := o.add("/c1.bin", 300*kib, 81)
	b := o.add("/c2.bin", 260*kib, 82)
	g := startGateway(t, o, "")

	list := filepath.Join(t.TempDir(), "urls.txt")
	text := "# warm the rollout\n\n" + g.url + "/c1.bin?cacheHostOrigin=origin.test\n  " + g.url + "/c2.bin?cacheHostOrigin=origin.test  \n"
	if err := os.WriteFile(list, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runMcc("prefetch", "--file", list, "--address", g.adminAddr)
	if err != nil {
		t.Fatalf("prefetch: %v\n%s", err, out)
	}
	if !strings.Contains(out, "prefetched 2 of 2 URLs, 560 KiB; 0 failed") || strings.Count(out, " ok ") != 2 {
		t.Errorf("prefetch printed:\n%s", out)
	}
	g.waitFills()
	download(t, g, "/c1.bin", "origin.test", a, csHit)
	download(t, g, "/c2.bin", "origin.test", b, csHit)

	out, err = runMcc("stats", "--address", g.adminAddr)
	if err != nil {
		t.Fatalf("stats: %v\n%s", err, out)
	}
	// How the cold bytes split between hit and miss depends on how far
	// read-ahead ran ahead of the prefetch; the totals do not.
	for _, s := range []string{"store              " + g.storeDir(), "hit ratio", "upstream bytes     560 KiB", "objects            2", "requests           hit 2, partial 0, miss 2", "bytes on disk      560 KiB of no cap"} {
		if !strings.Contains(out, s) {
			t.Errorf("stats lacks %q:\n%s", s, out)
		}
	}
	out, err = runMcc("stats", "--json", "--address", g.adminAddr, "--dir", g.storeDir())
	var s summary
	if err != nil || json.Unmarshal([]byte(out), &s) != nil || s.Objects != 2 || s.UpstreamBytes != int64(len(a)+len(b)) {
		t.Errorf("stats --json: %v\n%s", err, out)
	}

	bad := filepath.Join(t.TempDir(), "bad.txt")
	os.WriteFile(bad, []byte(g.url+"/none.bin?cacheHostOrigin=origin.test\n"), 0o644)
	out, err = runMcc("prefetch", "--file", bad, "--address", g.adminAddr)
	if err == nil || !strings.Contains(out, "FAILED") {
		t.Errorf("prefetch of a missing object: err %v\n%s", err, out)
	}
	if _, err := runMcc("stats", "--address", g.adminAddr, "--dir", "/no/such/store"); err == nil {
		t.Error("stats of an unknown store succeeded")
	}
}

func TestProgressBarOnTerminal(t *testing.T) {
	out := &bytes.Buffer{}
	p := &progress{w: out, total: 4, tty: true}
	p.add(prefetchResult{URL: "http://gw/a", Status: 200, Bytes: 1 << 20})
	p.add(prefetchResult{URL: "http://gw/b", Status: 502, Error: "502 Bad Gateway"})
	p.finish()
	got := out.String()
	for _, s := range []string{
		"\r\x1b[K[#######.......................] 1/4 URLs, 1.0 MiB",
		"\r\x1b[KFAILED http://gw/b: 502 Bad Gateway\n",
		"[###############...............] 2/4 URLs, 1.0 MiB, 1 failed\n",
	} {
		if !strings.Contains(got, s) {
			t.Errorf("progress output lacks %q:\n%q", s, got)
		}
	}
}

func TestSummaryDirectiveGoesBeforeMcc(t *testing.T) {
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(`
http://:8080 {
	mcc {
		dir /var/cache/mcc
	}
	reverse_proxy 127.0.0.1:9
	mcc_summary /summary {
		dir /var/cache/mcc
	}
}
`), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	var parsed struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Routes []struct {
						Handle []map[string]any `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &parsed); err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, srv := range parsed.Apps.HTTP.Servers {
		for _, r := range srv.Routes {
			for _, h := range r.Handle {
				order = append(order, fmt.Sprint(h["handler"]))
				if h["handler"] == "mcc_summary" && h["dir"] != "/var/cache/mcc" {
					t.Errorf("mcc_summary dir = %v", h["dir"])
				}
			}
		}
	}
	if strings.Join(order, " ") != "mcc_summary mcc reverse_proxy" {
		t.Errorf("handlers in order %v, want mcc_summary before mcc and reverse_proxy", order)
	}

	for _, bad := range []string{"mcc_summary extra", "mcc_summary {\n\tdir\n}", "mcc_summary {\n\tdir a b\n}", "mcc_summary {\n\tsize 1\n}"} {
		d := caddyfile.NewTestDispenser(bad)
		if err := new(Summary).UnmarshalCaddyfile(d); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// TestReadAheadBytesCountAsMisses pins the byte definition against timing:
// a block this request's own read-ahead stored before the client reached it
// is a miss, and so is every byte of an object learned by the request.
func TestReadAheadBytesCountAsMisses(t *testing.T) {
	o := newOrigin(t)
	small := o.add("/small.bin", 3*64*kib, 80) // within one read-ahead
	big := o.add("/big.bin", 10*64*kib, 81)
	g := startGateway(t, o, "")
	c := cacheOf(t, g)

	download(t, g, "/small.bin", "origin.test", small, csMiss)
	if hit, miss := c.stats.hitBytes.Load(), c.stats.missBytes.Load(); hit != 0 || miss != int64(len(small)) {
		t.Fatalf("cold download of a learned object: hit %d miss %d, want 0 and %d", hit, miss, len(small))
	}
	// Block 0 of big is stored first, then the whole object is asked for:
	// only block 0's bytes are hits, however fast the fills run.
	resp, done := getOwnConn(t, g, "/big.bin", "origin.test", "Range", "bytes=0-65535")
	readAll(t, resp)
	done()
	g.waitFills()
	hit0, miss0 := c.stats.hitBytes.Load(), c.stats.missBytes.Load()
	download(t, g, "/big.bin", "origin.test", big, "caddy-mcc; fwd=partial")
	if hit, miss := c.stats.hitBytes.Load()-hit0, c.stats.missBytes.Load()-miss0; hit != 64*kib || miss != int64(len(big))-64*kib {
		t.Fatalf("partial download: hit %d miss %d, want %d and %d", hit, miss, 64*kib, len(big)-64*kib)
	}
}
