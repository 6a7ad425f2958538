package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"
)

// abandonClients is how many clients each ask a new object and leave.
const abandonClients = 100

// settleQuiet is how long the origin must send nothing for the fills to
// count as settled; settleLimit bounds the wait. A fill that holds its
// request open without reading costs no bytes, so open requests do not
// count against settling (the report notes them).
const (
	settleQuiet = time.Second
	settleLimit = 60 * time.Second
)

// scenarioAbandon: abandonClients clients each ask a new object through the
// cache and close the connection as soon as the response headers arrive,
// as a device that gives up does. Once the origin is idle again, the bytes
// it sent per request are what an abandoned request costs upstream.
func (b *bench) scenarioAbandon() {
	for r := 0; r < b.sz.rounds; r++ {
		for _, s := range alternate([]*server{b.mcc, b.slice}, r) {
			b.settle() // the previous server's fills are not this one's
			sent0 := b.origin.sent.Load()
			names := make([]string, abandonClients)
			var wg sync.WaitGroup
			var mu sync.Mutex
			errs := 0
			for i := range names {
				names[i] = fmt.Sprintf("abandon-%s-%d-%d-%d", s.name, r, i, b.sz.abandon)
				wg.Add(1)
				go func(u string) {
					defer wg.Done()
					if code, err := askAndLeave(u); err != nil || code != http.StatusOK {
						mu.Lock()
						errs++
						mu.Unlock()
					}
				}(s.url + "/obj/" + names[i] + s.query)
			}
			wg.Wait()
			if !b.settle() {
				b.notes = append(b.notes, fmt.Sprintf("abandon: the origin was still sending %s after %s's clients left; counted what it had sent.", settleLimit, s.name))
			}
			perReq := float64(b.origin.sent.Load()-sent0) / abandonClients / (1 << 20)
			if open := b.origin.active.Load(); open > 0 {
				b.notes = append(b.notes, fmt.Sprintf("abandon: %d origin requests still open, sending nothing, after %s's clients left.", open, s.name))
			}
			b.record("abandon origin MiB / request", s.name, perReq)
			// What was left behind must still be served whole and right.
			if _, err := coldDownload(s, names[0]); err != nil {
				errs++
				b.notes = append(b.notes, "abandon: "+err.Error())
			}
			b.record("abandon errors", s.name, float64(errs))
		}
	}
}

// askAndLeave sends one GET for u on a new connection and closes it as
// soon as the status line and headers have arrived, leaving the body
// unread. It returns the status code.
func askAndLeave(u string) (int, error) {
	pu, err := url.Parse(u)
	if err != nil {
		return 0, err
	}
	c, err := net.DialTimeout("tcp", pu.Host, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: mccbench\r\n\r\n", pu.RequestURI(), pu.Host); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil) // headers only
	if err != nil {
		return 0, err
	}
	return resp.StatusCode, nil
}

// settle waits until the origin has sent no byte for settleQuiet, and
// reports whether that happened within settleLimit.
func (b *bench) settle() bool {
	last, quietSince := b.origin.sent.Load(), time.Now()
	for deadline := time.Now().Add(settleLimit); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if n := b.origin.sent.Load(); n != last {
			last, quietSince = n, time.Now()
			continue
		}
		if time.Since(quietSince) >= settleQuiet {
			return true
		}
	}
	return false
}
