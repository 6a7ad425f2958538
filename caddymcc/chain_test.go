package caddymcc

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// toOrigin fills a top level's misses from the test origin.
const toOrigin = "reverse_proxy {{origin}} {\n\t\trewrite {http.mcc.origin_uri}\n\t\theader_up Host {http.mcc.origin_host}\n\t}"

var chainConfig = testGlobals +
	cacheSite("{{top}}", "top", "read_ahead 256KiB", toOrigin) +
	cacheSite("{{middle}}", "middle", "read_ahead 256KiB", "reverse_proxy {{middle_parent}}") +
	cacheSite("{{bottom}}", "bottom", "read_ahead 256KiB", "reverse_proxy 127.0.0.1:{{middle}}")

type chain struct {
	top, middle, bottom string // base URLs
	dir                 string
}

// startChain loads the three-level config; middleParent is where the
// middle level forwards its misses ("" for the top level).
func startChain(t *testing.T, o *testOrigin, loop bool) *chain {
	t.Helper()
	dir := t.TempDir()
	ports := [3]int{freePort(t), freePort(t), freePort(t)}
	parent := fmt.Sprintf("127.0.0.1:%d", ports[0])
	if loop {
		parent = fmt.Sprintf("127.0.0.1:%d", ports[2]) // middle -> bottom -> middle
	}
	r := strings.NewReplacer("{{admin}}", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "{{dir}}", dir,
		"{{top}}", fmt.Sprint(ports[0]), "{{middle}}", fmt.Sprint(ports[1]), "{{bottom}}", fmt.Sprint(ports[2]),
		"{{origin}}", o.addr(), "{{middle_parent}}", parent)
	startCaddyfile(t, r.Replace(chainConfig))
	url := func(p int) string { return fmt.Sprintf("http://127.0.0.1:%d", p) }
	return &chain{url(ports[0]), url(ports[1]), url(ports[2]), dir}
}

func chainGet(t *testing.T, base, path string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	return getURL(t, base+path+"?cacheHostOrigin=origin.test", hdr...)
}

// getURL sends GET url with the header pairs hdr on a connection of its
// own and returns the response and its whole body.
func getURL(t *testing.T, url string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	req.Close = true // the handler is done when the body ends
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp, b
}

func (ch *chain) stats(t *testing.T, level string) *cache {
	t.Helper()
	var found *cache
	caches.Range(func(k, v any) bool {
		if k == ch.dir+"/"+level {
			found = v.(*cache)
		}
		return true
	})
	if found == nil {
		t.Fatalf("no cache for level %s", level)
	}
	return found
}

func TestThreeLevelChainFetchesOriginOnceAndStoresEveryLevel(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/fw.swu", 1000*kib+17, 90)
	ch := startChain(t, o, false)

	resp, got := chainGet(t, ch.bottom, "/fw.swu")
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("cold download through three levels: status %d, equal %v", resp.StatusCode, sum(got) == sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != "top; fwd=miss, middle; fwd=miss, bottom; fwd=miss" {
		t.Errorf("Cache-Status %q: want each level's entry, top first", cs)
	}
	if sent := o.bytesSent(); sent != int64(len(want)) {
		t.Errorf("origin sent %d bytes for %d: origin bytes / object = %.3f, want 1.000", sent, len(want), float64(sent)/float64(len(want)))
	}
	for _, level := range []string{"top", "middle", "bottom"} {
		c := ch.stats(t, level)
		st := c.store.Stats()
		if st.BytesPresent != int64(len(want)) {
			t.Errorf("%s stores %d bytes, want the whole object (%d)", level, st.BytesPresent, len(want))
		}
	}

	// A second device at the bottom: a hit there, no traffic above.
	middleFills := ch.stats(t, "middle").stats.fillsStarted.Load()
	resp, got = chainGet(t, ch.bottom, "/fw.swu", "Range", "bytes=5000-")
	if resp.StatusCode != 206 || sum(got) != sum(want[5000:]) || resp.Header.Get("Cache-Status") != "bottom; hit" {
		t.Fatalf("second device: status %d, equal %v, Cache-Status %q", resp.StatusCode, sum(got) == sum(want[5000:]), resp.Header.Get("Cache-Status"))
	}
	if n := ch.stats(t, "middle").stats.fillsStarted.Load(); n != middleFills || o.bytesSent() != int64(len(want)) {
		t.Errorf("a hit at the bottom caused traffic above it (middle fills %d -> %d)", middleFills, n)
	}
	// A device at the middle level is served from the middle's disk.
	resp, got = chainGet(t, ch.middle, "/fw.swu")
	if sum(got) != sum(want) || resp.Header.Get("Cache-Status") != "middle; hit" {
		t.Fatalf("middle: equal %v, Cache-Status %q", sum(got) == sum(want), resp.Header.Get("Cache-Status"))
	}
}

func TestForwardingLoopIsRefusedWith508(t *testing.T) {
	o := newOrigin(t)
	o.add("/loop.bin", 100*kib, 91)
	ch := startChain(t, o, true) // middle's parent is bottom, bottom's is middle
	resp, body := chainGet(t, ch.bottom, "/loop.bin")
	if resp.StatusCode != http.StatusLoopDetected && resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d (%s), want 508 (or the 502 it becomes one level down)", resp.StatusCode, body)
	}
	if len(o.log()) != 0 {
		t.Error("a looping request reached the origin")
	}
	// The level that sees its own mark answers 508 itself.
	resp, body = chainGet(t, ch.middle, "/loop.bin", "Via", "1.1 "+ch.stats(t, "middle").node)
	if resp.StatusCode != http.StatusLoopDetected || !strings.Contains(string(body), "loop") {
		t.Fatalf("own node id in Via: status %d (%s), want 508", resp.StatusCode, body)
	}
	var via []string
	for i := 0; i < 16; i++ {
		via = append(via, fmt.Sprintf("1.1 mcc-%012x", i))
	}
	resp, body = chainGet(t, ch.top, "/loop.bin", "Via", strings.Join(via, ", "))
	if resp.StatusCode != http.StatusLoopDetected || !strings.Contains(string(body), "max_levels") {
		t.Fatalf("16 cache levels in Via: status %d (%s), want 508", resp.StatusCode, body)
	}
}

// failoverConfig is a child gateway with two parents, the first of which
// is down: reverse_proxy's own load balancing moves on to the second.
var failoverConfig = testGlobals +
	cacheSite("{{top}}", "top", "", toOrigin) +
	cacheSite("{{child}}", "child", "", "reverse_proxy {{parents}} {\n\t\tlb_policy first\n\t\tlb_try_duration 2s\n\t\tfail_duration 30s\n\t}")

func startFailover(t *testing.T, o *testOrigin, parents string) (top, child string) {
	t.Helper()
	dir := t.TempDir()
	tp, cp := freePort(t), freePort(t)
	r := strings.NewReplacer("{{admin}}", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "{{dir}}", dir,
		"{{top}}", fmt.Sprint(tp), "{{child}}", fmt.Sprint(cp), "{{origin}}", o.addr(),
		"{{parents}}", strings.ReplaceAll(parents, "TOP", fmt.Sprintf("127.0.0.1:%d", tp)))
	startCaddyfile(t, r.Replace(failoverConfig))
	return fmt.Sprintf("http://127.0.0.1:%d", tp), fmt.Sprintf("http://127.0.0.1:%d", cp)
}

func TestParentFailoverThroughReverseProxy(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/fo.swu", 300*kib, 92)
	dead := fmt.Sprintf("127.0.0.1:%d", freePort(t)) // nothing listens there
	_, child := startFailover(t, o, dead+" TOP")
	resp, got := chainGet(t, child, "/fo.swu")
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("with the first parent down: status %d, equal %v", resp.StatusCode, sum(got) == sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != "top; fwd=miss, child; fwd=miss" {
		t.Errorf("Cache-Status %q: the second parent did not serve it", cs)
	}
}

func TestNoParentAnsweringGives502(t *testing.T) {
	o := newOrigin(t)
	o.add("/down.swu", 100*kib, 93)
	dead1 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	dead2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	_, child := startFailover(t, o, dead1+" "+dead2)
	began := time.Now()
	resp, body := chainGet(t, child, "/down.swu")
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d (%s), want 502 so the DO agent falls back to the CDN", resp.StatusCode, body)
	}
	// Not an assertion (shared machines): lb_try_duration bounds it.
	t.Logf("502 after %s with lb_try_duration 2s", time.Since(began).Round(time.Millisecond))
}

// TestTopLevelThroughOutboundProxy runs the top gateway's fills through an
// unauthenticated HTTP forward proxy (MCC's UPSTREAM_PROXY), configured on
// reverse_proxy's transport.
func TestTopLevelThroughOutboundProxy(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/px.swu", 500*kib, 94)
	var mu sync.Mutex
	var proxied []string
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !r.URL.IsAbs() {
			http.Error(w, "not a proxy request", http.StatusBadRequest)
			return
		}
		mu.Lock()
		proxied = append(proxied, r.URL.String())
		mu.Unlock()
		out := r.Clone(r.Context())
		out.RequestURI = ""
		// The request line names the origin (origin.test), as a real
		// proxy would resolve; this one knows where it lives, without
		// DNS.
		out.URL.Host = o.addr()
		resp, err := http.DefaultTransport.RoundTrip(out)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
	}))
	t.Cleanup(proxy.Close)

	g := &gateway{t: t, dir: t.TempDir(), adminAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	port := freePort(t)
	g.url = fmt.Sprintf("http://127.0.0.1:%d", port)
	cfg := strings.Replace(gatewayConfig, "reverse_proxy {{origin}} {", "reverse_proxy {{origin}} {\n\t\ttransport http {\n\t\t\tnetwork_proxy url "+proxy.URL+"\n\t\t}", 1)
	r := strings.NewReplacer("{{admin}}", g.adminAddr, "{{dir}}", g.dir, "{{port}}", fmt.Sprint(port), "{{origin}}", o.addr(), "{{extra}}", "")
	startCaddyfile(t, r.Replace(cfg))

	resp := g.get("/px.swu", "origin.test")
	got := readAll(t, resp)
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("through the outbound proxy: status %d (%.200s), equal %v", resp.StatusCode, got, sum(got) == sum(want))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(proxied) == 0 || len(proxied) != len(o.log()) {
		t.Fatalf("proxy saw %d requests, origin %d: every fill must go through the proxy", len(proxied), len(o.log()))
	}
	if !strings.HasPrefix(proxied[0], "http://origin.test/px.swu") {
		t.Errorf("proxy request %q does not name the upstream", proxied[0])
	}
}

// scaleConfig is a front Caddy spreading clients over two cache nodes by a
// consistent hash of the URI (cacheHostOrigin included), with passive
// health checks, as README's scale-out section has it.
var scaleConfig = testGlobals + `http://:{{front}} {
	bind 127.0.0.1
	reverse_proxy 127.0.0.1:{{n1}} 127.0.0.1:{{n2}} {
		lb_policy uri_hash
		lb_try_duration 2s
		fail_duration 30s
	}
}
{{node1}}
` + cacheSite("{{n2}}", "n2", "", toOrigin)

var scaleNode1 = cacheSite("{{n1}}", "n1", "", toOrigin)

func TestScaleOutStoresEachObjectOnOneNode(t *testing.T) {
	o := newOrigin(t)
	dir := t.TempDir()
	ports := map[string]string{"{{admin}}": fmt.Sprintf("127.0.0.1:%d", freePort(t)), "{{front}}": fmt.Sprint(freePort(t)),
		"{{n1}}": fmt.Sprint(freePort(t)), "{{n2}}": fmt.Sprint(freePort(t)), "{{dir}}": dir, "{{origin}}": o.addr()}
	load := func(withNode1 bool) {
		t.Helper()
		cfg := scaleConfig
		node1 := ""
		if withNode1 {
			node1 = scaleNode1
		}
		cfg = strings.Replace(cfg, "{{node1}}", node1, 1)
		for k, v := range ports {
			cfg = strings.ReplaceAll(cfg, k, v)
		}
		loadCaddyfile(t, cfg)
	}
	load(true)
	t.Cleanup(func() { caddy.Stop() })
	front := "http://127.0.0.1:" + ports["{{front}}"]

	const n = 12
	objects := make([][]byte, n)
	for i := range objects {
		objects[i] = o.add(fmt.Sprintf("/s%d.swu", i), 100*kib+i, uint64(100+i))
	}
	node := func(cs string) string { return strings.SplitN(cs, ";", 2)[0] }
	where := make([]string, n)
	for pass := 0; pass < 2; pass++ {
		for i, want := range objects {
			resp, got := chainGet(t, front, fmt.Sprintf("/s%d.swu", i))
			if resp.StatusCode != 200 || sum(got) != sum(want) {
				t.Fatalf("object %d pass %d: status %d equal %v", i, pass, resp.StatusCode, sum(got) == sum(want))
			}
			cs := resp.Header.Get("Cache-Status")
			if pass == 0 {
				where[i] = node(cs)
			} else if node(cs) != where[i] || !strings.HasSuffix(cs, "; hit") {
				t.Errorf("object %d: first on %s, then answered %q: the hash must send it to one node", i, where[i], cs)
			}
		}
	}
	on := map[string]int{}
	for _, w := range where {
		on[w]++
	}
	if on["n1"] == 0 || on["n2"] == 0 {
		t.Fatalf("objects per node %v: uri_hash did not spread them", on)
	}
	if sent := o.bytesSent(); sent != int64(totalLen(objects)) {
		t.Errorf("origin sent %d bytes for %d: an object was stored on both nodes", sent, totalLen(objects))
	}

	// Node 1 goes away: only its objects move to node 2.
	load(false)
	before := o.bytesSent()
	var moved int
	for i, want := range objects {
		resp, got := chainGet(t, front, fmt.Sprintf("/s%d.swu", i))
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("object %d without node 1: status %d equal %v", i, resp.StatusCode, sum(got) == sum(want))
		}
		cs := resp.Header.Get("Cache-Status")
		switch {
		case where[i] == "n2" && cs != "n2; hit":
			t.Errorf("object %d lived on n2 and should still be a hit there, got %q", i, cs)
		case where[i] == "n1":
			moved += len(want)
		}
	}
	if d := o.bytesSent() - before; d != int64(moved) {
		t.Errorf("losing node 1 fetched %d bytes from the origin, want exactly its share %d", d, moved)
	}
}

func totalLen(bs [][]byte) (n int) {
	for _, b := range bs {
		n += len(b)
	}
	return n
}

// tlsConfig is a child gateway reaching its parent over HTTPS with a
// certificate from Caddy's internal CA (tls internal), trusting that CA's
// root. The parent also serves devices over HTTPS.
const tlsConfig = `{
	admin {{admin}}
	auto_https disable_redirects
	skip_install_trust
	persist_config off
	storage file_system {{dir}}/caddy
	log {
		level ERROR
	}
}
https://127.0.0.1:{{top}} {
	bind 127.0.0.1
	tls internal
	mcc {
		dir {{dir}}/top
		block_size 64KiB
		min_free 0
		origins origin.test
		name top
	}
	reverse_proxy {{origin}} {
		rewrite {http.mcc.origin_uri}
		header_up Host {http.mcc.origin_host}
	}
}
{{child}}
`

var tlsChild = cacheSite("{{bottom}}", "bottom", "",
	"reverse_proxy https://127.0.0.1:{{top}} {\n\t\ttransport http {\n\t\t\ttls_trust_pool file {{dir}}/caddy/pki/authorities/local/root.crt\n\t\t}\n\t}")

func TestChildReachesParentOverTLSInternal(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/tls.swu", 300*kib, 95)
	dir := t.TempDir()
	vals := map[string]string{"{{admin}}": fmt.Sprintf("127.0.0.1:%d", freePort(t)), "{{top}}": fmt.Sprint(freePort(t)),
		"{{bottom}}": fmt.Sprint(freePort(t)), "{{dir}}": dir, "{{origin}}": o.addr()}
	load := func(child string) {
		t.Helper()
		cfg := strings.Replace(tlsConfig, "{{child}}", child, 1)
		for k, v := range vals {
			cfg = strings.ReplaceAll(cfg, k, v)
		}
		loadCaddyfile(t, cfg)
	}
	// The parent first: starting it creates the internal CA whose root
	// the child is then configured to trust.
	load("")
	t.Cleanup(func() { caddy.Stop() })
	pem, err := os.ReadFile(dir + "/caddy/pki/authorities/local/root.crt")
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	// Caddy issues the parent's certificate in the background; there is
	// no event to wait on short of the events app, so try handshakes until
	// one verifies (bounded).
	tlsConf := &tls.Config{RootCAs: pool}
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		conn, err := tls.Dial("tcp", "127.0.0.1:"+vals["{{top}}"], tlsConf)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the parent never served its internal certificate: %v", err)
		}
	}
	load(tlsChild)

	resp, got := chainGet(t, "http://127.0.0.1:"+vals["{{bottom}}"], "/tls.swu")
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("through an HTTPS parent: status %d (%.200s), equal %v", resp.StatusCode, got, sum(got) == sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != "top; fwd=miss, bottom; fwd=miss" {
		t.Errorf("Cache-Status %q", cs)
	}

	// A device speaking HTTPS to the parent, trusting the same root.
	// Over HTTP/2, where responses cannot use sendfile: the bounded
	// read path must give the same bytes.
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf, ForceAttemptHTTP2: true}}
	resp2, err := client.Get("https://127.0.0.1:" + vals["{{top}}"] + "/tls.swu?cacheHostOrigin=origin.test")
	if err != nil {
		t.Fatal(err)
	}
	got2, err := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	if err != nil || resp2.StatusCode != 200 || sum(got2) != sum(want) || resp2.Header.Get("Cache-Status") != "top; hit" {
		t.Fatalf("device over HTTPS: status %d err %v equal %v Cache-Status %q", resp2.StatusCode, err, sum(got2) == sum(want), resp2.Header.Get("Cache-Status"))
	}
	if resp2.ProtoMajor != 2 {
		t.Errorf("device got HTTP/%d, want HTTP/2", resp2.ProtoMajor)
	}
	// A range over HTTP/2, partly in the last chunk of a block.
	req, _ := http.NewRequest(http.MethodGet, "https://127.0.0.1:"+vals["{{top}}"]+"/tls.swu?cacheHostOrigin=origin.test", nil)
	req.Header.Set("Range", "bytes=1000-200000")
	resp3, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got3, err := io.ReadAll(resp3.Body)
	resp3.Body.Close()
	if err != nil || resp3.StatusCode != 206 || sum(got3) != sum(want[1000:200001]) {
		t.Fatalf("range over HTTP/2: status %d err %v equal %v", resp3.StatusCode, err, sum(got3) == sum(want[1000:200001]))
	}

	// A device over HTTPS and HTTP/1.1 on a new object: the read-ahead
	// sees through TLS to the client's acknowledgements and fetches the
	// rest in one window once it has read 512KiB.
	big := o.add("/tls-big.swu", 10<<20, 96)
	h1Conf := tlsConf.Clone()
	h1Conf.NextProtos = []string{"http/1.1"}
	h1 := &http.Client{Transport: &http.Transport{TLSClientConfig: h1Conf, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}}
	resp4, err := h1.Get("https://127.0.0.1:" + vals["{{top}}"] + "/tls-big.swu?cacheHostOrigin=origin.test")
	if err != nil {
		t.Fatal(err)
	}
	got4, err := io.ReadAll(resp4.Body)
	resp4.Body.Close()
	if err != nil || resp4.ProtoMajor != 1 || sum(got4) != sum(big) {
		t.Fatalf("cold over HTTPS/1.1: %s, err %v, equal %v", resp4.Proto, err, sum(got4) == sum(big))
	}
	waitAllFills()
	var fills []string
	for _, r := range o.log() {
		if r.path == "/tls-big.swu" {
			fills = append(fills, r.rangeHeader)
		}
	}
	if strings.Join(fills, " ") != "bytes=0-2097151 bytes=2097152-10485759" {
		t.Errorf("fills over HTTPS/1.1: %q, want the first 2MiB, then the rest at once", fills)
	}
}
