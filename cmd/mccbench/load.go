package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sort"
	"sync"
	"time"
)

// newClient returns an HTTP client for n concurrent keep-alive connections
// that never asks for compression.
func newClient(n int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DisableCompression:  true,
		MaxIdleConns:        n * 2,
		MaxIdleConnsPerHost: n * 2,
		MaxConnsPerHost:     0,
		Proxy:               nil,
	}}
}

// loadResult is what one load run measured.
type loadResult struct {
	requests int
	bytes    int64
	errors   int
	elapsed  time.Duration
	latency  []time.Duration
	cpu      float64 // server CPU seconds during the run
}

func (r loadResult) rps() float64 { return float64(r.requests) / r.elapsed.Seconds() }
func (r loadResult) mbps() float64 {
	return float64(r.bytes) / r.elapsed.Seconds() / 1e6
}
func (r loadResult) cpuPerGB() float64 {
	if r.bytes == 0 {
		return 0
	}
	return r.cpu / (float64(r.bytes) / 1e9)
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p * float64(len(s)-1))
	return s[i]
}

// request is one request of a load: a URL, a Range header value (or "")
// and the body length expected.
type request struct {
	url     string
	rng     string
	wantLen int64
}

// runLoad runs clients workers for d, each issuing requests from next.
func runLoad(s *server, clients int, d time.Duration, next func(r *rand.Rand) request) loadResult {
	client := newClient(clients)
	defer client.CloseIdleConnections()
	var mu sync.Mutex
	var res loadResult
	cpu0 := s.cpuSeconds()
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(seed, 7))
			var lat []time.Duration
			var n, errs int
			var bytes int64
			for time.Now().Before(deadline) {
				rq := next(rnd)
				t0 := time.Now()
				got, err := fetch(client, rq)
				if err != nil || got != rq.wantLen {
					errs++
					continue
				}
				lat = append(lat, time.Since(t0))
				n++
				bytes += got
			}
			mu.Lock()
			res.requests += n
			res.bytes += bytes
			res.errors += errs
			res.latency = append(res.latency, lat...)
			mu.Unlock()
		}(uint64(i))
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.cpu = s.cpuSeconds() - cpu0
	return res
}

// fetch does one request and discards the body, returning its length.
func fetch(client *http.Client, rq request) (int64, error) {
	req, err := http.NewRequest(http.MethodGet, rq.url, nil)
	if err != nil {
		return 0, err
	}
	if rq.rng != "" {
		req.Header.Set("Range", rq.rng)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 && resp.StatusCode != 206 {
		io.Copy(io.Discard, resp.Body)
		return 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	return io.Copy(io.Discard, resp.Body)
}

// download fetches url whole and returns the SHA-256 of the body.
func download(client *http.Client, url string) (string, int64, error) {
	resp, err := client.Get(url)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return "", 0, fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

// contentSum is the SHA-256 of a deterministic object.
func contentSum(c content) string {
	h := sha256.New()
	io.Copy(h, io.NewSectionReader(c, 0, c.size))
	return hex.EncodeToString(h.Sum(nil))
}

// herdResult is a cold herd's outcome.
type herdResult struct {
	ttfb   []time.Duration // sorted, the first is the leader's
	total  time.Duration
	errors int
}

// runHerd starts n clients together on url and records when each gets its
// first body byte and when the last finishes.
func runHerd(url string, n int, size int64) herdResult {
	client := newClient(n)
	defer client.CloseIdleConnections()
	start := make(chan struct{})
	var mu sync.Mutex
	var res herdResult
	var wg sync.WaitGroup
	var t0 time.Time
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			resp, err := client.Get(url)
			if err != nil {
				mu.Lock()
				res.errors++
				mu.Unlock()
				return
			}
			defer resp.Body.Close()
			one := make([]byte, 1)
			_, err = io.ReadFull(resp.Body, one)
			ttfb := time.Since(t0)
			m, err2 := io.Copy(io.Discard, resp.Body)
			mu.Lock()
			if err != nil || err2 != nil || m+1 != size {
				res.errors++
			} else {
				res.ttfb = append(res.ttfb, ttfb)
			}
			mu.Unlock()
		}()
	}
	t0 = time.Now()
	close(start)
	wg.Wait()
	res.total = time.Since(t0)
	sort.Slice(res.ttfb, func(i, j int) bool { return res.ttfb[i] < res.ttfb[j] })
	return res
}

// runMemory has n clients download url concurrently for d (or until done),
// reading slowly enough that all are in flight together, and returns the
// server's peak RSS meanwhile.
func runMemory(s *server, url string, n int, d time.Duration) (int64, int) {
	s.resetPeakRSS()
	client := newClient(n)
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	errs := 0
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			resp, err := client.Do(req)
			if err != nil {
				if ctx.Err() == nil {
					mu.Lock()
					errs++
					mu.Unlock()
				}
				return
			}
			defer resp.Body.Close()
			buf := make([]byte, 64<<10)
			for {
				if _, err := resp.Body.Read(buf); err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	return s.peakRSS(), errs
}
