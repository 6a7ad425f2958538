package caddymcc

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Standing adversarial tests: a hostile upstream under a pool of clients,
// and a thousand abusive clients. Both check what must hold whatever the
// peers do: the process stays up, every complete 2xx body is byte-exact for
// one version of the object, and nothing leaks (goroutines, fills,
// descriptors, memory). By default they are short; -mcc.soak=5m runs the
// hostile upstream for that long.

var (
	soakFor  = flag.Duration("mcc.soak", 0, "run TestHostileUpstream for this long instead of a short run")
	soakSeed = flag.Uint64("mcc.seed", 10, "seed of TestHostileUpstream's origin and clients")
)

// childEnv names the test a child process runs: a crash of the gateway (a
// panic in a fill goroutine, an allocation the runtime cannot make) kills
// the process, which the parent then reports as the test's failure instead
// of losing the whole test binary.
const childEnv = "MCC_TEST_CHILD"

// inChild runs the calling test in a child process and reports its
// outcome; it returns false in the child, which then runs the test's body.
func inChild(t *testing.T) bool {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		return false
	}
	args := []string{"-test.run=^" + t.Name() + "$", "-test.v", "-test.count=1",
		"-mcc.seed=" + strconv.FormatUint(*soakSeed, 10),
		"-test.timeout=" + (*soakFor + 3*time.Minute).String()}
	if *soakFor > 0 {
		args = append(args, "-mcc.soak="+soakFor.String())
	}
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the gateway's process did not come through (seed %d): %v\n%s", *soakSeed, err, excerpt(out))
	}
	t.Logf("child process:\n%s", excerpt(out))
	return true
}

// TestHostileUpstream runs hostileUpstream in a child process.
func TestHostileUpstream(t *testing.T) {
	if inChild(t) {
		return
	}
	hostileUpstream(t)
}

// TestHugeContentRangeTotalIsRefused: an upstream that answers the first
// block of an object with the right bytes but a total of 2^63-1, 2^50 or
// 2^40 bytes must neither crash the gateway nor make it hold memory in
// proportion to that claim.
func TestHugeContentRangeTotalIsRefused(t *testing.T) {
	if inChild(t) {
		return
	}
	for _, total := range []int64{1<<63 - 1, 1 << 50, 1 << 40} {
		t.Run(strconv.FormatInt(total, 10), func(t *testing.T) {
			data := bytes.Repeat([]byte("0123456789abcdef"), 8<<10) // 128 KiB
			origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				var a, b int64
				fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &a, &b)
				b = min(b, int64(len(data))-1)
				w.Header().Set("Etag", `"huge"`)
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, total))
				w.Header().Set("Content-Length", strconv.FormatInt(b-a+1, 10))
				w.WriteHeader(http.StatusPartialContent)
				w.Write(data[a : b+1])
			}))
			defer origin.Close()
			base := takeBaseline()
			g, _ := hostileGateway(t, strings.TrimPrefix(origin.URL, "http://"))
			resp := g.get("/huge.bin", "origin.test", "Range", "bytes=0-99")
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			t.Logf("status %d, Content-Range %q, %d bytes, %v", resp.StatusCode, resp.Header.Get("Content-Range"), len(body), err)
			if resp.StatusCode/100 == 2 && (err != nil || !bytes.Equal(body, data[:100])) {
				t.Errorf("a 2xx with the wrong bytes")
			}
			g.waitFills()
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > base.heap+32<<20 {
				t.Errorf("heap in use went from %d MiB to %d MiB for a 100-byte answer", base.heap>>20, ms.HeapInuse>>20)
			}
		})
	}
}

// excerpt keeps the start of a crash (the panic and its goroutine) and the
// test's own lines, cut to a readable length.
func excerpt(out []byte) string {
	s := string(out)
	if i := strings.Index(s, "panic: "); i >= 0 {
		s = s[i:]
	} else if i := strings.Index(s, "fatal error: "); i >= 0 {
		s = s[i:]
	}
	if len(s) > 12000 {
		s = s[:12000] + "\n..."
	}
	return s
}

// hostileVersion is one version of an object of the hostile origin.
type hostileVersion struct {
	data []byte
	etag string
}

// hostileOrigin serves a few objects, each in a few versions, and answers
// each request with a behaviour drawn from a PCG seeded with the test's
// seed and the request's sequence number.
type hostileOrigin struct {
	seed    uint64
	n       atomic.Uint64
	objects map[string][]hostileVersion
	mu      sync.Mutex
	current map[string]int
	kinds   [numHostile]atomic.Int64
	srv     *httptest.Server
}

const (
	hostileGood        = iota
	hostileFlip        // switch to the next version, then answer well
	hostileStatus      // a wrong status (5xx, 4xx, 3xx, 204, 304)
	hostileBadRange    // a garbage or huge Content-Range
	hostileShort       // a body shorter than its Content-Length
	hostileLong        // more bytes than the Content-Range
	hostileDrip        // a slow drip of small writes
	hostileReset       // the connection reset, after some bytes or none
	hostileStall       // some bytes, then nothing until the fill gives up
	hostileFlood       // a flood of headers
	hostileIgnoreRange // 200 with the whole object
	hostileOtherRange  // 206 for another range than asked
	numHostile
)

var hostileNames = [numHostile]string{"good", "flip", "status", "bad-range", "short", "long", "drip", "reset", "stall", "flood", "ignore-range", "other-range"}

var hostileWeights = [numHostile]int{40, 5, 6, 6, 6, 5, 5, 6, 2, 4, 5, 5}

func newHostileOrigin(t *testing.T, seed uint64, objects, versions int) *hostileOrigin {
	h := &hostileOrigin{seed: seed, objects: make(map[string][]hostileVersion), current: make(map[string]int)}
	for i := range objects {
		p := fmt.Sprintf("/h/%d.bin", i)
		for v := range versions {
			n := 200<<10 + v*3<<10 + i*1000 + 7
			data := make([]byte, n)
			r := rand.New(rand.NewPCG(seed, uint64(i*100+v)))
			for k := range data {
				data[k] = byte(r.Uint32())
			}
			h.objects[p] = append(h.objects[p], hostileVersion{data: data, etag: fmt.Sprintf(`"h%d-v%d"`, i, v)})
		}
	}
	h.srv = httptest.NewServer(http.HandlerFunc(h.serve))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *hostileOrigin) pick(r *rand.Rand) int {
	total := 0
	for _, w := range hostileWeights {
		total += w
	}
	x := r.IntN(total)
	for k, w := range hostileWeights {
		if x < w {
			return k
		}
		x -= w
	}
	return hostileGood
}

func (h *hostileOrigin) serve(w http.ResponseWriter, r *http.Request) {
	rng := rand.New(rand.NewPCG(h.seed, h.n.Add(1)))
	versions := h.objects[r.URL.Path]
	if versions == nil {
		http.Error(w, "no such object", http.StatusNotFound)
		return
	}
	kind := h.pick(rng)
	h.kinds[kind].Add(1)
	h.mu.Lock()
	if kind == hostileFlip {
		h.current[r.URL.Path] = (h.current[r.URL.Path] + 1) % len(versions)
	}
	v := versions[h.current[r.URL.Path]]
	h.mu.Unlock()
	size := int64(len(v.data))
	start, end := int64(0), size-1
	ranged := false
	if rg := r.Header.Get("Range"); rg != "" {
		var a, b int64
		if n, _ := fmt.Sscanf(rg, "bytes=%d-%d", &a, &b); n == 2 && a >= 0 && b >= a {
			if a >= size {
				w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
				w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
				return
			}
			start, end, ranged = a, min(b, size-1), true
		}
	}
	hdr := w.Header()
	hdr.Set("Etag", v.etag)
	hdr.Set("Last-Modified", "Fri, 02 Jan 2026 03:04:05 GMT")
	hdr.Set("Content-Type", "application/octet-stream")
	status := http.StatusOK
	if ranged {
		status = http.StatusPartialContent
		hdr.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end, size))
	}
	body := v.data[start : end+1]
	switch kind {
	case hostileStatus:
		codes := []int{500, 502, 503, 504, 404, 403, 400, 410, 301, 204, 304}
		code := codes[rng.IntN(len(codes))]
		hdr.Del("Content-Range")
		if code == 301 {
			hdr.Set("Location", "http://127.0.0.1:1/elsewhere")
		}
		w.WriteHeader(code)
		io.WriteString(w, "hostile status\n")
		return
	case hostileBadRange:
		bad := []string{
			"bytes 0-10/9223372036854775807",
			fmt.Sprintf("bytes %d-%d/9223372036854775807", start, end),
			fmt.Sprintf("bytes %d-%d/1099511627776", start, end),
			"bytes garbage",
			"bytes */*",
			fmt.Sprintf("bytes %d-%d/*", start, end),
			"bytes -5-3/100",
			fmt.Sprintf("bytes %d-%d/%d", start, end+1<<20, size),
			"bytes 9223372036854775806-9223372036854775807/9223372036854775807",
		}
		hdr.Set("Content-Range", bad[rng.IntN(len(bad))])
		hdr.Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(body)
		return
	case hostileShort:
		hdr.Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(status)
		w.Write(body[:rng.IntN(len(body))])
		return
	case hostileLong:
		if rng.IntN(2) == 0 {
			// Chunked, so nothing but the Content-Range gives the length.
			w.WriteHeader(status)
			w.Write(body)
			w.Write(bytes.Repeat([]byte{0xAA}, 1+rng.IntN(100<<10)))
			return
		}
		hdr.Set("Content-Length", strconv.Itoa(len(body)+1000))
		w.WriteHeader(status)
		w.Write(body)
		w.Write(make([]byte, 1000))
		return
	case hostileDrip:
		hdr.Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(status)
		for off, k := 0, 0; off < len(body); k++ {
			n := 1 + rng.IntN(2048)
			if k > 50 {
				n = len(body)
			}
			n = min(n, len(body)-off)
			if _, err := w.Write(body[off : off+n]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			off += n
			time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond) // the drip itself
		}
		return
	case hostileReset:
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		switch rng.IntN(3) {
		case 1:
			buf.WriteString("HTTP/1.1 206 Partial Content\r\nContent-Len")
		case 2:
			fmt.Fprintf(buf, "HTTP/1.1 %d X\r\nEtag: %s\r\nContent-Length: %d\r\n", status, v.etag, len(body))
			if ranged {
				fmt.Fprintf(buf, "Content-Range: bytes %d-%d/%d\r\n", start, end, size)
			}
			buf.WriteString("\r\n")
			buf.Write(body[:rng.IntN(len(body))])
		}
		buf.Flush()
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetLinger(0) // a reset, not an orderly close
		}
		conn.Close()
		return
	case hostileStall:
		hdr.Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(status)
		w.Write(body[:rng.IntN(len(body))])
		w.(http.Flusher).Flush()
		<-r.Context().Done() // until the fill gives up (fill_timeout)
		return
	case hostileFlood:
		if rng.IntN(2) == 0 {
			for k := range 3000 {
				hdr.Set(fmt.Sprintf("X-Flood-%d", k), strings.Repeat("f", 100))
			}
		} else {
			hdr.Set("X-Flood", strings.Repeat("F", 2<<20))
		}
	case hostileIgnoreRange:
		hdr.Del("Content-Range")
		status, body = http.StatusOK, v.data
	case hostileOtherRange:
		if ranged && size > 1 {
			s := (start + 1 + rng.Int64N(size-1)) % size
			e := min(s+end-start, size-1)
			hdr.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", s, e, size))
			body = v.data[s : e+1]
		}
	}
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

// verify checks a complete 2xx body against the versions of its object:
// it must be the bytes of one version, the one its ETag names when it names
// one. It returns what is wrong, or "".
func verifyVersions(versions []hostileVersion, resp *http.Response, body []byte) string {
	var start, end, total int64
	switch resp.StatusCode {
	case http.StatusOK:
		start, end, total = 0, int64(len(body))-1, int64(len(body))
	case http.StatusPartialContent:
		cr := resp.Header.Get("Content-Range")
		if n, _ := fmt.Sscanf(cr, "bytes %d-%d/%d", &start, &end, &total); n != 3 || start < 0 || end < start || end >= total {
			return fmt.Sprintf("206 with Content-Range %q", cr)
		}
		if int64(len(body)) != end-start+1 {
			return fmt.Sprintf("206 for %q with %d bytes", cr, len(body))
		}
	default:
		return ""
	}
	// The bytes must be one version's at their offsets; the total is what
	// the upstream claimed, which a lying upstream sets (that is
	// TestHugeContentRangeTotalIsRefused's concern).
	etag := resp.Header.Get("Etag")
	matched := ""
	for _, v := range versions {
		if int64(len(v.data)) > end && bytes.Equal(v.data[start:end+1], body) {
			if v.etag == etag {
				return ""
			}
			matched = v.etag
		}
	}
	if matched != "" {
		return fmt.Sprintf("%d bytes %d-%d/%d are version %s's, under ETag %s", resp.StatusCode, start, end, total, matched, etag)
	}
	return fmt.Sprintf("%d bytes %d-%d/%d (ETag %s) are no version's", resp.StatusCode, start, end, total, etag)
}

// leakBaseline is what the process holds before a run.
type leakBaseline struct {
	goroutines, fds int
	heap            uint64
}

func takeBaseline() leakBaseline {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return leakBaseline{goroutines: runtime.NumGoroutine(), fds: openFDs(), heap: ms.HeapInuse}
}

func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// peakHeap samples HeapInuse until stop is called, which returns the peak.
func peakHeap() (stop func() uint64) {
	var peak atomic.Uint64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	return func() uint64 {
		close(done)
		<-finished
		return peak.Load()
	}
}

// checkSettles waits for goroutines and descriptors to come back to the
// baseline (within slack for Caddy's own background work) and checks the
// heap; closing connections is asynchronous and has no signal, so it
// polls, within a bound that only a leak exceeds.
func checkSettles(t *testing.T, base leakBaseline, heapSlack uint64) (goroutines, fds int, heap uint64) {
	t.Helper()
	const slack = 12
	deadline := time.Now().Add(20 * time.Second)
	for {
		goroutines, fds = runtime.NumGoroutine(), openFDs()
		if goroutines <= base.goroutines+slack && fds <= base.fds+slack || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if goroutines > base.goroutines+slack {
		var b bytes.Buffer
		pprof.Lookup("goroutine").WriteTo(&b, 1)
		s := b.String()
		if len(s) > 8000 {
			s = s[:8000] + "\n..."
		}
		t.Errorf("goroutine leak: %d before, %d after settling\n%s", base.goroutines, goroutines, s)
	}
	if fds > base.fds+slack {
		t.Errorf("descriptor leak: %d open before, %d after settling", base.fds, fds)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if ms.HeapInuse > base.heap+heapSlack {
		t.Errorf("heap in use %d MiB after the run, %d MiB before: not flat", ms.HeapInuse>>20, base.heap>>20)
	}
	return goroutines, fds, ms.HeapInuse
}

// hostileGateway is the harness's gateway with a short fill timeout, a
// store too small for the hostile objects (so evictions keep sending
// clients upstream) and Caddy's log in a file, where recovered handler
// panics are looked for.
func hostileGateway(t *testing.T, originAddr string) (*gateway, string) {
	t.Helper()
	g := &gateway{t: t, dir: t.TempDir(), adminAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	port := freePort(t)
	g.url = fmt.Sprintf("http://127.0.0.1:%d", port)
	logFile := g.dir + "/caddy.log"
	globals := strings.Replace(testGlobals, "level ERROR", "output file "+logFile+"\n\t\tlevel ERROR", 1)
	text := globals + cacheSite("{{port}}", "store", "read_ahead 256KiB\n\t\tfill_timeout 2s\n\t\tmax_size 640KiB\n\t\tname caddy-mcc",
		"reverse_proxy {{origin}} {\n\t\trewrite {http.mcc.origin_uri}\n\t\theader_up Host {http.mcc.origin_host}\n\t}")
	r := strings.NewReplacer("{{admin}}", g.adminAddr, "{{dir}}", g.dir, "{{port}}", strconv.Itoa(port), "{{origin}}", originAddr)
	g.load(adapt(t, r.Replace(text)))
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return g, logFile
}

// hostileRange is a client's Range header for an object of about size
// bytes: none, closed, open, suffix, past the end, or absurd.
func hostileRange(r *rand.Rand, size int) string {
	a := r.IntN(size + size/8)
	switch r.IntN(10) {
	case 0, 1:
		return ""
	case 2, 3, 4:
		return fmt.Sprintf("bytes=%d-%d", a, a+r.IntN(200<<10))
	case 5, 6:
		return fmt.Sprintf("bytes=%d-", a)
	case 7:
		return fmt.Sprintf("bytes=-%d", r.IntN(size))
	case 8:
		return "bytes=9223372036854775807-"
	}
	return fmt.Sprintf("bytes=%d-%d,%d-%d", a, a+10, a/2, a/2+10)
}

// hostileUpstream is the body of TestHostileUpstream, run in the child.
func hostileUpstream(t *testing.T) {
	seed := *soakSeed
	o := newHostileOrigin(t, seed, 8, 3)
	g, logFile := hostileGateway(t, strings.TrimPrefix(o.srv.URL, "http://"))
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 64}
	client := &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	// Warm up Caddy's own background goroutines before the baseline.
	for i := range 3 {
		if resp, err := client.Get(g.url + "/warm?cacheHostOrigin=origin.test&i=" + strconv.Itoa(i)); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	tr.CloseIdleConnections()
	g.waitFills()
	c := cacheOf(t, g)
	base := takeBaseline()
	stopPeak := peakHeap()

	duration, budget := 3*time.Second, 400
	if *soakFor > 0 {
		duration, budget = *soakFor, math.MaxInt
	}
	var (
		mu       sync.Mutex
		outcomes = make(map[string]int)
		failures []string
		requests atomic.Int64
	)
	note := func(kind string) {
		mu.Lock()
		outcomes[kind]++
		mu.Unlock()
	}
	began := time.Now()
	end := began.Add(duration)
	var wg sync.WaitGroup
	for ci := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 1<<32+uint64(ci)))
			for time.Now().Before(end) && requests.Add(1) <= int64(budget) {
				p := fmt.Sprintf("/h/%d.bin", r.IntN(len(o.objects)))
				rg := hostileRange(r, 200<<10)
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, g.url+p+"?cacheHostOrigin=origin.test", nil)
				if rg != "" {
					req.Header.Set("Range", rg)
				}
				// Where a request hangs, for whoever investigates: every
				// stack while it still hangs, before the client gives up.
				dump := time.AfterFunc(stackDelay(), func() {
					if file := os.Getenv("MCC_STACKS"); file != "" {
						if err := os.WriteFile(file, allStacks(), 0o644); err != nil {
							t.Logf("writing the stacks: %v", err)
						}
						t.Logf("%s GET %s Range %q: no answer yet; every stack in %s", time.Now().Format(time.TimeOnly), p, rg, file)
					}
				})
				resp, err := client.Do(req)
				if err != nil {
					dump.Stop()
					cancel()
					// (A cut before the status line is a failed transfer,
					// as a cut body is; only the deadline is a hang.)
					if errors.Is(err, context.DeadlineExceeded) {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("GET %s Range %q: no answer in 60 s", p, rg))
						mu.Unlock()
					}
					note("transport-error")
					continue
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				dump.Stop()
				cancel()
				switch {
				case errors.Is(err, context.DeadlineExceeded):
					mu.Lock()
					failures = append(failures, fmt.Sprintf("GET %s Range %q: %d, body still open after 60 s", p, rg, resp.StatusCode))
					mu.Unlock()
					continue
				case err != nil:
					note(fmt.Sprintf("%d-cut", resp.StatusCode))
					continue
				}
				note(strconv.Itoa(resp.StatusCode))
				if resp.StatusCode/100 == 2 && !strings.HasPrefix(resp.Header.Get("Content-Type"), "multipart/") {
					if bad := verifyVersions(o.objects[p], resp, body); bad != "" {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("GET %s Range %q: %s (Cache-Status %q)", p, rg, bad, resp.Header.Get("Cache-Status")))
						mu.Unlock()
					}
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(began)
	peak := stopPeak()

	tr.CloseIdleConnections()
	o.srv.CloseClientConnections()
	settled := make(chan struct{})
	go func() { g.waitFills(); close(settled) }()
	select {
	case <-settled:
	case <-time.After(60 * time.Second):
		t.Errorf("fills still running 60 s after the last client: %d in flight", c.stats.fillsInFlight.Load())
	}
	if n := c.stats.fillsInFlight.Load(); n != 0 {
		t.Errorf("fillsInFlight = %d after every fill ended", n)
	}
	goroutines, fds, heap := checkSettles(t, base, 64<<20)

	for i, f := range failures {
		if i == 20 {
			t.Errorf("... and %d more", len(failures)-20)
			break
		}
		t.Errorf("seed %d: %s", seed, f)
	}
	if log, err := os.ReadFile(logFile); err == nil {
		if i := bytes.Index(log, []byte("panic serving")); i >= 0 {
			t.Errorf("a handler panicked (recovered by net/http):\n%s", log[max(0, i-200):min(len(log), i+3000)])
		}
	}
	var kinds, outs []string
	for k := range numHostile {
		kinds = append(kinds, fmt.Sprintf("%s=%d", hostileNames[k], o.kinds[k].Load()))
	}
	for k, n := range outcomes {
		outs = append(outs, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(outs)
	t.Logf("seed %d: %s, %d requests (%d failures); client outcomes %s; origin behaviours %s; fills started %d, upstream errors %d",
		seed, elapsed.Round(time.Millisecond), min(requests.Load(), int64(budget)), len(failures), strings.Join(outs, " "), strings.Join(kinds, " "),
		c.stats.fillsStarted.Load(), c.stats.upstreamErrors.Load())
	t.Logf("heap in use: %d MiB before, peak %d MiB, %d MiB after; goroutines %d -> %d; descriptors %d -> %d",
		base.heap>>20, peak>>20, heap>>20, base.goroutines, goroutines, base.fds, fds)
}

// stackDelay is how long a soak request hangs before every stack is
// written to $MCC_STACKS.
func stackDelay() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("MCC_STACKS_AFTER")); err == nil {
		return d
	}
	return 45 * time.Second
}

// allStacks returns every goroutine's stack, to see where a request hung.
func allStacks() []byte {
	buf := make([]byte, 1<<22)
	return buf[:runtime.Stack(buf, true)]
}
