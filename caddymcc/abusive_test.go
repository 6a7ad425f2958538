package caddymcc

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// raiseFileLimit lifts the soft limit on open descriptors towards want, for
// tests that hold a thousand connections open at both ends.
func raiseFileLimit(t *testing.T, want uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= want {
		return
	}
	old := lim
	lim.Cur = min(want, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < want {
		t.Skipf("descriptor limit %d is below the %d this test needs", lim.Cur, want)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// TestThousandAbusiveClients puts 1,000 concurrent clients on one gateway:
// well-behaved ones asking hits, misses (collapsed onto shared fills) and
// ranges, next to slow readers that stall mid-body, clients that drop the
// connection mid-body, and clients with oversized headers. Every
// well-behaved client gets a byte-exact body; afterwards no fill is in
// flight and goroutines, descriptors and heap are back where they were.
func TestThousandAbusiveClients(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000 connections")
	}
	const clients = 1000
	raiseFileLimit(t, 8192)
	o := newOrigin(t)
	var objs [][]byte
	for i := range 20 {
		objs = append(objs, o.add(fmt.Sprintf("/a/%d.bin", i), 256<<10+i*1111, uint64(400+i)))
	}
	bigWarm := o.add("/big/warm.bin", 8<<20, 430)
	bigCold := o.add("/big/cold.bin", 8<<20, 431)
	g := startGateway(t, o, "")
	for i := range 10 {
		download(t, g, fmt.Sprintf("/a/%d.bin", i), "origin.test", objs[i], csMiss)
	}
	download(t, g, "/big/warm.bin", "origin.test", bigWarm, csMiss)
	tr := &http.Transport{DisableCompression: true, DisableKeepAlives: true}
	client := &http.Client{Transport: tr}
	c := cacheOf(t, g)
	// The proxy's idle connections to the origin are not the clients'
	// doing: close them before each measurement.
	g.waitFills()
	o.srv.CloseClientConnections()
	base := takeBaseline()
	stopPeak := peakHeap()

	addr := strings.TrimPrefix(g.url, "http://")
	huge := "X-Huge: " + strings.Repeat("h", 2<<20) + "\r\n" // one copy for every client that sends it
	start := make(chan struct{})
	release := make(chan struct{}) // slow readers stall until it closes
	var (
		wg       sync.WaitGroup // every client
		others   sync.WaitGroup // every client but the slow readers
		mu       sync.Mutex
		failures []string
		abusive  [4]atomic.Int64 // slow, dropped, oversized (answered), oversized (cut)
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	// get is a well-behaved client: the body must be exactly want.
	get := func(path string, want []byte, rng string) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, g.url+path+"?cacheHostOrigin=origin.test", nil)
		wantStatus := http.StatusOK
		if rng != "" {
			req.Header.Set("Range", rng)
			wantStatus = http.StatusPartialContent
		}
		resp, err := client.Do(req)
		if err != nil {
			fail("GET %s %s: %v", path, rng, err)
			return
		}
		defer resp.Body.Close()
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil || resp.StatusCode != wantStatus || n != int64(len(want)) || [32]byte(h.Sum(nil)) != sha256.Sum256(want) {
			fail("GET %s %s: status %d, %d of %d bytes, equal %v, %v", path, rng, resp.StatusCode, n, len(want), [32]byte(h.Sum(nil)) == sha256.Sum256(want), err)
		}
	}
	// raw sends a request on a connection of its own, with a small
	// receive buffer so a client that stops reading stalls the server.
	raw := func(path, extra string) (net.Conn, *bufio.Reader, error) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, nil, err
		}
		conn.(*net.TCPConn).SetReadBuffer(4096)
		if _, err = fmt.Fprintf(conn, "GET %s?cacheHostOrigin=origin.test HTTP/1.1\r\nHost: gw\r\n", path); err == nil {
			if _, err = io.WriteString(conn, extra); err == nil {
				_, err = io.WriteString(conn, "\r\n")
			}
		}
		return conn, bufio.NewReaderSize(conn, 1024), err
	}
	for i := range clients {
		r := rand.New(rand.NewPCG(10, uint64(i)))
		kind := i % 10
		wg.Add(1)
		if kind != 6 {
			others.Add(1)
		}
		go func() {
			defer wg.Done()
			if kind != 6 {
				defer others.Done()
			}
			<-start
			k := r.IntN(10)
			switch kind {
			case 0, 1, 2: // hits
				get(fmt.Sprintf("/a/%d.bin", k), objs[k], "")
			case 3, 4: // misses, many clients per cold object
				get(fmt.Sprintf("/a/%d.bin", 10+k), objs[10+k], "")
			case 5: // ranges of hits and misses
				obj := objs[10*(i%2)+k]
				a := r.IntN(len(obj))
				b := min(len(obj)-1, a+r.IntN(200<<10))
				get(fmt.Sprintf("/a/%d.bin", 10*(i%2)+k), obj[a:b+1], fmt.Sprintf("bytes=%d-%d", a, b))
			case 6: // slow reader: a few bytes, then it stalls
				path := "/big/warm.bin"
				if i%20 == 6 {
					path = "/big/cold.bin"
				}
				conn, br, err := raw(path, "")
				if err != nil {
					fail("slow reader: %v", err)
					return
				}
				defer conn.Close()
				if _, err := http.ReadResponse(br, nil); err != nil {
					fail("slow reader %s: %v", path, err)
					return
				}
				abusive[0].Add(1)
				<-release
			case 7: // drops the connection mid-body
				path := fmt.Sprintf("/a/%d.bin", 10*(i%2)+k)
				if i%3 == 0 {
					path = "/big/cold.bin"
				}
				conn, br, err := raw(path, "")
				if err != nil {
					fail("dropping client: %v", err)
					return
				}
				if resp, err := http.ReadResponse(br, nil); err == nil {
					io.CopyN(io.Discard, resp.Body, int64(r.IntN(64<<10)))
				}
				if i%2 == 0 {
					conn.(*net.TCPConn).SetLinger(0)
				}
				conn.Close()
				abusive[1].Add(1)
			case 8: // oversized headers
				conn, br, err := raw("/a/0.bin", huge)
				if err == nil {
					if resp, err := http.ReadResponse(br, nil); err == nil && resp.StatusCode != http.StatusOK {
						abusive[2].Add(1)
					} else if err == nil {
						fail("a request with a 2 MiB header was answered %d", resp.StatusCode)
					}
				} else {
					abusive[3].Add(1)
				}
				if conn != nil {
					conn.Close()
				}
			case 9: // whole big objects, next to the slow readers
				if i%20 == 9 {
					get("/big/cold.bin", bigCold, "")
				} else {
					get("/big/warm.bin", bigWarm, "")
				}
			}
		}()
	}
	began := time.Now()
	close(start)
	// The well-behaved and other abusive clients finish while the slow
	// readers still hold their connections; then the slow readers go.
	if !waitGroupWithin(&others, 3*time.Minute) {
		t.Fatalf("clients still running after 3 minutes (%d slow readers stalled)", abusive[0].Load())
	}
	elapsed := time.Since(began)
	close(release)
	wg.Wait()
	peak := stopPeak()
	g.waitFills()
	o.srv.CloseClientConnections()
	if n := c.stats.fillsInFlight.Load(); n != 0 {
		t.Errorf("fillsInFlight = %d after every fill ended", n)
	}
	goroutines, fds, heap := checkSettles(t, base, 64<<20)
	if peak > base.heap+512<<20 {
		t.Errorf("heap in use peaked at %d MiB (%d MiB before)", peak>>20, base.heap>>20)
	}
	for i, f := range failures {
		if i == 20 {
			t.Errorf("... and %d more", len(failures)-20)
			break
		}
		t.Error(f)
	}
	t.Logf("%d clients in %s: %d slow readers stalled, %d dropped mid-body, %d oversized headers refused (%d cut); %d failures",
		clients, elapsed.Round(time.Millisecond), abusive[0].Load(), abusive[1].Load(), abusive[2].Load(), abusive[3].Load(), len(failures))
	t.Logf("heap in use: %d MiB before, peak %d MiB, %d MiB after; goroutines %d -> %d; descriptors %d -> %d; origin sent %d MiB",
		base.heap>>20, peak>>20, heap>>20, base.goroutines, goroutines, base.fds, fds, o.bytesSent()>>20)
}

// waitGroupWithin waits for wg, or reports false after d: a bound that
// only a hang exceeds.
func waitGroupWithin(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}
