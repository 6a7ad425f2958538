package caddymcc

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests in this file pin the cold path (issue 11): read-ahead that starts
// small and grows once the client reads, the next fill under way before
// the current one ends, a bounded cost for abandoned requests, and the cap
// on concurrent fills.

const growConfig = "read_ahead 8MiB"

// TestReadAheadGrowsOnceTheClientReads: a linear download's first fill is
// 2MiB; once the client's TCP stack has acknowledged readProof bytes, the
// next fills are read_ahead long.
func TestReadAheadGrowsOnceTheClientReads(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/lin.swu", 14<<20, 150)
	g := startGateway(t, o, growConfig)
	download(t, g, "/lin.swu", "origin.test", want, csMiss)
	g.waitFills()
	o.expectRanges("bytes=0-2097151", "bytes=2097152-10485759", "bytes=10485760-14680063")
}

// TestReadAheadDoublesWhereTheConnectionCannotTell: over HTTP/2 (one
// connection, many requests: its acknowledgements are no one request's)
// the read-ahead starts at 2MiB and doubles as the client reads its first
// windows.
func TestReadAheadDoublesWhereTheConnectionCannotTell(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/lin2.swu", 14<<20, 152)
	text := strings.Replace(gatewayConfig, "{{extra}}", "\n\t\t"+growConfig, 1)
	text = strings.Replace(text, "\tpersist_config off\n", "\tpersist_config off\n\tservers {\n\t\tprotocols h1 h2c\n\t}\n", 1)
	g := startGatewayFrom(t, o, text)
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(g.url + "/lin2.swu?cacheHostOrigin=origin.test")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.ProtoMajor != 2 || !bytes.Equal(body, want) {
		t.Fatalf("download over %s: %v, equal %v", resp.Proto, err, bytes.Equal(body, want))
	}
	g.waitFills()
	o.expectRanges("bytes=0-2097151", "bytes=2097152-6291455", "bytes=6291456-14680063")
}

// TestNextFillStartsBeforeTheCurrentOneEnds: while the client reads the
// second fill, the third is already asked for.
func TestNextFillStartsBeforeTheCurrentOneEnds(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/pipe.swu", 22<<20, 151)
	g := startGateway(t, o, growConfig)
	release := newGate(t)
	third := make(chan string, 1)
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		if !strings.HasPrefix(r.Header.Get("Range"), "bytes=2097152-") {
			if strings.HasPrefix(r.Header.Get("Range"), "bytes=10485760-") {
				select {
				case third <- r.Header.Get("Range"):
				default:
				}
			}
			return false
		}
		serveRange(w, r, obj, func(w http.ResponseWriter, body []byte) {
			w.Write(body[:3*harnessBlockSize])
			w.(http.Flusher).Flush()
			<-release.ch
			w.Write(body[3*harnessBlockSize:])
		})
		return true
	})
	resp, done := getOwnConn(t, g, "/pipe.swu", "origin.test")
	defer done()
	defer resp.Body.Close()
	head := make([]byte, 2<<20+2*harnessBlockSize)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatal(err)
	}
	select {
	case rg := <-third:
		if rg != "bytes=10485760-18874367" {
			t.Errorf("the third fill asked for %s", rg)
		}
	case <-waitCtx(t).Done():
		t.Fatal("no third fill while the second one was still under way")
	}
	release.open()
	rest, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(append(head, rest...), want) {
		t.Fatalf("download: %v, equal %v", err, bytes.Equal(append(head, rest...), want))
	}
}

// TestAbandonedRequestsCostAtMostTwoMiB: clients that ask for new objects
// and hang up after the status line cost the origin at most the first
// read-ahead each (fills under way complete, so a resume finds them), on
// loopback, where kernel buffers take megabytes from the gateway before a
// client's close reaches it.
func TestAbandonedRequestsCostAtMostTwoMiB(t *testing.T) {
	o := newOrigin(t)
	const n = 20
	for i := range n {
		o.add(fmt.Sprintf("/ab-%d.swu", i), 24<<20, uint64(160+i))
	}
	g := startGateway(t, o, growConfig)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			fmt.Fprintf(conn, "GET /ab-%d.swu?cacheHostOrigin=origin.test HTTP/1.1\r\nHost: gw\r\n\r\n", i)
			if status, err := bufio.NewReader(conn).ReadString('\n'); err != nil || !strings.Contains(status, " 200 ") {
				t.Errorf("status line %q: %v", status, err)
			}
		}()
	}
	wg.Wait()
	g.waitFills()
	if sent, per := o.bytesSent(), int64(2<<20); sent > n*per {
		t.Errorf("the origin sent %d bytes for %d abandoned requests: %.2f MiB each, want at most 2", sent, n, float64(sent)/n/(1<<20))
	}
}

// TestMaxFillsQueuesFillsInOrder: with max_fills 1 a second and a third
// miss wait for the first fill, and go upstream in the order they came.
func TestMaxFillsQueuesFillsInOrder(t *testing.T) {
	o := newOrigin(t)
	paths := []string{"/q0.swu", "/q1.swu", "/q2.swu"}
	wants := make([][]byte, len(paths))
	for i, p := range paths {
		wants[i] = o.add(p, 100*kib, uint64(170+i))
	}
	g := startGateway(t, o, "max_fills 1")
	c := cacheOf(t, g)
	release := newGate(t)
	arrived := make(chan string, len(paths))
	o.setHook(func(w http.ResponseWriter, r *http.Request, obj *originObject) bool {
		arrived <- r.URL.Path
		if r.URL.Path == paths[0] {
			<-release.ch
		}
		return false
	})
	var wg sync.WaitGroup
	for i, p := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if code, body, _ := getWith(t, g, p); code != 200 || !bytes.Equal(body, wants[i]) {
				t.Errorf("%s: %d, equal %v", p, code, bytes.Equal(body, wants[i]))
			}
		}()
		if i == 0 {
			if got := <-arrived; got != paths[0] {
				t.Fatalf("first upstream request for %s", got)
			}
			continue
		}
		waitFor(t, func() bool { return c.queue.queued() == i }, "fill %d to queue", i)
	}
	if v := metricValue(t, g, scrape(t, g), "caddy_mcc_fills_queued"); v != 2 {
		t.Errorf("caddy_mcc_fills_queued = %v, want 2", v)
	}
	select {
	case p := <-arrived:
		t.Fatalf("%s went upstream while max_fills was taken", p)
	default:
	}
	release.open()
	wg.Wait()
	for _, want := range paths[1:] {
		if got := <-arrived; got != want {
			t.Errorf("queued fill for %s went upstream before %s", got, want)
		}
	}
}

// waitFor waits until cond holds: for states that have no signal of their
// own; waitCtx bounds it.
func waitFor(t *testing.T, cond func() bool, what string, args ...any) {
	t.Helper()
	ctx := waitCtx(t)
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for "+what, args...)
		case <-time.After(time.Millisecond):
		}
	}
}

var pipelineChainConfig = testGlobals +
	cacheSite("{{top}}", "top", "read_ahead 8MiB", toOrigin) +
	cacheSite("{{middle}}", "middle", "read_ahead 8MiB", "reverse_proxy {{middle_parent}}") +
	cacheSite("{{bottom}}", "bottom", "read_ahead 8MiB", "reverse_proxy 127.0.0.1:{{middle}}")

// TestChainPassesTheBottomsFillsThroughUnsplit: the levels above the
// bottom serve its fills (which name them in Via) each with one upstream
// request of the same range, so a cold download through three levels makes
// as many round trips to the origin as through one, and is stored at each.
func TestChainPassesTheBottomsFillsThroughUnsplit(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/deep.swu", 14<<20, 180)
	dir := t.TempDir()
	ports := [3]int{freePort(t), freePort(t), freePort(t)}
	r := strings.NewReplacer("{{admin}}", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "{{dir}}", dir,
		"{{top}}", fmt.Sprint(ports[0]), "{{middle}}", fmt.Sprint(ports[1]), "{{bottom}}", fmt.Sprint(ports[2]),
		"{{origin}}", o.addr(), "{{middle_parent}}", fmt.Sprintf("127.0.0.1:%d", ports[0]))
	startCaddyfile(t, r.Replace(pipelineChainConfig))
	ch := &chain{dir: dir}
	resp, got := chainGet(t, fmt.Sprintf("http://127.0.0.1:%d", ports[2]), "/deep.swu")
	if resp.StatusCode != 200 || !bytes.Equal(got, want) {
		t.Fatalf("cold download through three levels: %d, equal %v", resp.StatusCode, bytes.Equal(got, want))
	}
	waitAllFills()
	// The bottom's fills, unsplit.
	o.expectRanges("bytes=0-2097151", "bytes=2097152-10485759", "bytes=10485760-14680063")
	for _, level := range []string{"top", "middle", "bottom"} {
		if st := ch.stats(t, level).store.Stats(); st.BytesPresent != int64(len(want)) {
			t.Errorf("%s stores %d bytes, want the whole object", level, st.BytesPresent)
		}
	}
}
