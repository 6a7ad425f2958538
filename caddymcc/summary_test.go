package caddymcc

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"golang.org/x/net/html"
)

// Tests in this file pin the summary and its counters: the byte
// counts, their persistence, the HTML page and the mcc_summary directive.

func TestCountersAddUpForMissPartialHit(t *testing.T) {
	o := newOrigin(t)
	const block = harnessBlockSize
	want := o.add("/four.bin", 4*block, 70)
	reached := make(chan int, 16)
	withholdBlockEnds(t, o, block, reached)
	g, summaryURL := startOpsGateway(t, o)
	c := cacheOf(t, g)
	c.holdPeriods()

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
	o := newOrigin(t)
	want := o.add("/r.bin", 320*kib, 71)
	g := startGateway(t, o, "")
	cacheOf(t, g).holdPeriods()
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
	cacheOf(t, g).holdPeriods()
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
	o := newOrigin(t)
	want := o.add("/h.bin", 300*kib, 80)
	g, _ := startOpsGateway(t, o)
	c := cacheOf(t, g)
	c.holdPeriods()
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
