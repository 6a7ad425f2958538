package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// content is a deterministic object: the bytes at any offset can be made
// without storing the object, so the origin can serve gigabytes.
type content struct {
	seed uint64
	size int64
}

// objectFor parses "/obj/<name>-<size>" into its content.
func objectFor(path string) (content, bool) {
	name, ok := strings.CutPrefix(path, "/obj/")
	if !ok {
		return content{}, false
	}
	i := strings.LastIndexByte(name, '-')
	if i < 0 {
		return content{}, false
	}
	size, err := strconv.ParseInt(name[i+1:], 10, 64)
	if err != nil || size < 0 {
		return content{}, false
	}
	var seed uint64 = 14695981039346656037
	for _, c := range []byte(name) {
		seed = (seed ^ uint64(c)) * 1099511628211
	}
	return content{seed, size}, true
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// ReadAt fills p with the bytes at off.
func (c content) ReadAt(p []byte, off int64) (int, error) {
	if off >= c.size {
		return 0, io.EOF
	}
	n := len(p)
	if rem := c.size - off; int64(n) > rem {
		n = int(rem)
	}
	for i := 0; i < n; {
		word := (off + int64(i)) / 8
		v := splitmix(c.seed ^ uint64(word))
		for k := (off + int64(i)) % 8; k < 8 && i < n; k++ {
			p[i] = byte(v >> (8 * k))
			i++
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// origin serves deterministic objects with ETag and Range support, with an
// optional latency per request and bandwidth cap, and counts body bytes.
// The bandwidth cap paces each response on its own; a cap shared by many
// connections, as a WAN link's is, is a link's (see link.go).
type origin struct {
	addr      string
	latency   atomic.Int64 // nanoseconds added before each answer
	bandwidth int64        // bytes per second per response; 0 for none
	sent      atomic.Int64
	requests  atomic.Int64
	active    atomic.Int64 // requests being answered now
	srv       *http.Server
}

func startOrigin(bandwidth int64) (*origin, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	o := &origin{addr: l.Addr().String(), bandwidth: bandwidth}
	o.srv = &http.Server{Handler: o}
	go o.srv.Serve(l)
	return o, nil
}

func (o *origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.requests.Add(1)
	o.active.Add(1)
	defer o.active.Add(-1)
	c, ok := objectFor(r.URL.Path)
	if !ok {
		http.NotFound(w, r)
		return
	}
	if d := o.latency.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	w.Header().Set("Etag", fmt.Sprintf(`"%x"`, c.seed))
	w.Header().Set("Content-Type", "application/octet-stream")
	var body io.ReadSeeker = io.NewSectionReader(c, 0, c.size)
	cw := &countWriter{ResponseWriter: w, o: o}
	if o.bandwidth > 0 {
		cw.limit = o.bandwidth
		cw.start = time.Now()
	}
	http.ServeContent(cw, r, "", time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), body)
}

type countWriter struct {
	http.ResponseWriter
	o       *origin
	limit   int64
	start   time.Time
	written int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.o.sent.Add(int64(n))
	c.written += int64(n)
	if c.limit > 0 {
		// Pace to the cap: sleep until the bytes sent are due.
		due := c.start.Add(time.Duration(float64(c.written) / float64(c.limit) * float64(time.Second)))
		time.Sleep(time.Until(due))
	}
	return n, err
}
