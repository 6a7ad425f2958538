package caddymcc

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Tests in this file pin what the cache does with upstream answers that
// lie or break: nothing wrong is stored or served, and the process stays
// up.

// TestHugeOrMalformedTotalIs502AndStoresNothing: an upstream total beyond
// max_object_size (or near 2^63, which once sized rangestore's arrays and
// crashed the process) is refused, logged and not stored.
func TestHugeOrMalformedTotalIs502AndStoresNothing(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/big.swu", 200*kib, 90)
	g := startGateway(t, o, "max_object_size 1GiB")
	c := cacheOf(t, g)
	for _, total := range []string{"9223372036854775807", "1099511627776", "1073741825", "-5", "12x"} {
		o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
			start, end := wantedSpan(r.Header.Get("Range"))
			w.Header().Set("Etag", obj.etag)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%s", start, end, total))
			w.Header().Set("Content-Length", strconv.FormatInt(end-start+1, 10))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(make([]byte, end-start+1))
			return true
		})
		resp := g.get("/big.swu", "origin.test")
		readAll(t, resp)
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("total %s: status %d, want 502", total, resp.StatusCode)
		}
		g.waitFills()
		if n := c.store.Stats().Objects; n != 0 {
			t.Fatalf("total %s: %d objects stored", total, n)
		}
	}
	// The same object from an honest upstream is served and stored.
	o.setHook(nil)
	download(t, g, "/big.swu", "origin.test", want, csMiss)
	if n := c.store.Stats().Objects; n != 1 {
		t.Errorf("%d objects stored after an honest answer, want 1", n)
	}
}

// TestRangeNearMaxInt64NeverOverflowsUpstreamRange: a client's range start
// near 2^63 must not become a negative or overflowing Range upstream.
func TestRangeNearMaxInt64NeverOverflowsUpstreamRange(t *testing.T) {
	o := newOrigin(t)
	o.add("/r.swu", 100*kib, 91)
	g := startGateway(t, o, "")
	for _, rg := range []string{"bytes=9223372036854710272-", "bytes=9223372036854710272-9223372036854775806", "bytes=9223372036854775807-"} {
		resp := g.get("/r.swu", "origin.test", "Range", rg)
		readAll(t, resp)
		if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get("Content-Range") != fmt.Sprintf("bytes */%d", 100*kib) {
			t.Errorf("%s: status %d, Content-Range %q; want 416 with bytes */%d", rg, resp.StatusCode, resp.Header.Get("Content-Range"), 100*kib)
		}
	}
	g.waitFills()
	for _, r := range o.log() {
		start, end, ok := parseUpstreamRange(r.rangeHeader)
		if !ok || start < 0 || end < start {
			t.Errorf("the origin was asked for %q", r.rangeHeader)
		}
	}
}

// parseUpstreamRange parses the "bytes=a-b" a fill sends.
func parseUpstreamRange(s string) (start, end int64, ok bool) {
	a, b, found := strings.Cut(strings.TrimPrefix(s, "bytes="), "-")
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	return start, end, found && strings.HasPrefix(s, "bytes=") && err1 == nil && err2 == nil
}

func init() {
	caddy.RegisterModule(new(panicHandler))
	httpcaddyfile.RegisterHandlerDirective("mcc_test_panic", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		return new(panicHandler), nil
	})
}

// panicHandler is a test handler between mcc and reverse_proxy that panics
// on paths containing /panic/, as a buggy module might.
type panicHandler struct{}

func (*panicHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.mcc_test_panic", New: func() caddy.Module { return new(panicHandler) }}
}

func (*panicHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if strings.Contains(r.URL.Path, "/panic/") {
		panic("mcc_test_panic: " + r.URL.Path)
	}
	return next.ServeHTTP(w, r)
}

// TestPanickingUpstreamHandlerFailsOnlyItsFill: a panic under a fill (here
// in a handler between mcc and reverse_proxy) answers 502 and leaves the
// process serving.
func TestPanickingUpstreamHandlerFailsOnlyItsFill(t *testing.T) {
	o := newOrigin(t)
	o.add("/panic/a.swu", 100*kib, 92)
	want := o.add("/ok/b.swu", 100*kib, 93)
	// route keeps the order as written: mcc, then the panicking handler
	// that its fills pass through.
	cfg := strings.Replace(gatewayConfig, "\tmcc {", "\troute {\n\tmcc {", 1)
	cfg = strings.Replace(cfg, "\treverse_proxy {{origin}} {", "\tmcc_test_panic\n\treverse_proxy {{origin}} {", 1)
	cfg = strings.Replace(cfg, "\t\theader_up Host {http.mcc.origin_host}\n\t}\n", "\t\theader_up Host {http.mcc.origin_host}\n\t}\n\t}\n", 1)
	g := startGatewayFrom(t, o, cfg)

	for i := 0; i < 3; i++ {
		resp := g.get("/panic/a.swu", "origin.test")
		readAll(t, resp)
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("a panicking fill answered %d, want 502", resp.StatusCode)
		}
	}
	download(t, g, "/ok/b.swu", "origin.test", want, csMiss)
	if n := cacheOf(t, g).stats.fillErrors[fillUpstream].Load(); n < 3 {
		t.Errorf("fill errors of kind upstream = %d, want at least 3", n)
	}
}

// TestStoreOpenLogsRecoveryInOneLine: opening the store logs one line
// with what recovery did (issue 10, point 13).
func TestStoreOpenLogsRecoveryInOneLine(t *testing.T) {
	o := newOrigin(t)
	cfg := strings.Replace(gatewayConfig, "\tlog {\n\t\tlevel ERROR\n\t}", "\tlog {\n\t\toutput file {{dir}}/caddy.log\n\t\tformat json\n\t\tlevel INFO\n\t}", 1)
	g := startGatewayFrom(t, o, cfg)
	logFile := filepath.Join(g.dir, "caddy.log")
	cacheOf(t, g)
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	var lines []map[string]any
	for _, l := range strings.Split(string(b), "\n") {
		var entry map[string]any
		if json.Unmarshal([]byte(l), &entry) == nil && entry["msg"] == "store open" {
			lines = append(lines, entry)
		}
	}
	if len(lines) != 1 {
		t.Fatalf("%d 'store open' lines in the log, want 1:\n%s", len(lines), b)
	}
	for _, k := range []string{"dir", "clean_shutdown", "objects", "blocks_checked", "torn_blocks_dropped", "took"} {
		if _, ok := lines[0][k]; !ok {
			t.Errorf("the 'store open' line has no %s: %v", k, lines[0])
		}
	}
}
