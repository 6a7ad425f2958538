package main

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// link is a network link between two hosts, simulated on loopback: a TCP
// proxy that delivers every chunk it reads a fixed one-way delay later, in
// each direction, and with a rate, no faster than the link serialises bytes.
// The rate is shared by every connection over the link (one pacer per
// direction), as a WAN uplink is, not granted to each connection.
//
// Chunks are pipelined: the delay is added once to each byte's journey, not
// once per chunk, so a busy link carries rate×delay bytes in flight. It
// models propagation and serialisation only, not TCP's congestion control:
// a connection can use the whole link from its first round trip on.
type link struct {
	addr   string // 127.0.0.1:port to dial instead of target
	target string
	delay  time.Duration // one way
	up     *pacer        // toward target; nil for no cap
	down   *pacer        // from target; nil for no cap
	l      net.Listener

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// chunkSize is the most a link reads at once; at 100 Mbit/s one chunk takes
// 5 ms to serialise.
const chunkSize = 64 << 10

// linkQueue bounds the chunks in flight per direction (16 MiB), more than
// rate×delay for every link the benchmark builds, so it never limits them.
const linkQueue = 256

var chunkPool = sync.Pool{New: func() any { return make([]byte, chunkSize) }}

// startLink listens on loopback and forwards every connection to target,
// delay later in each direction; rate is bytes per second each way for all
// connections together, 0 for no cap.
func startLink(target string, delay time.Duration, rate int64) (*link, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	k := &link{addr: l.Addr().String(), target: target, delay: delay, l: l, conns: map[net.Conn]struct{}{}}
	if rate > 0 {
		k.up, k.down = &pacer{rate: float64(rate)}, &pacer{rate: float64(rate)}
	}
	go k.serve()
	return k, nil
}

func (k *link) serve() {
	for {
		c, err := k.l.Accept()
		if err != nil {
			return
		}
		go k.carry(c)
	}
}

// carry connects c to the target and copies both ways until both ends
// are done.
func (k *link) carry(c net.Conn) {
	t, err := net.DialTimeout("tcp", k.target, 5*time.Second)
	if err != nil {
		c.Close()
		return
	}
	if !k.track(c, t) {
		return
	}
	defer k.untrack(c, t)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); k.pipe(t, c, k.up) }()
	go func() { defer wg.Done(); k.pipe(c, t, k.down) }()
	wg.Wait()
}

// pipe delivers src's bytes to dst delay after they were sent. An end of
// stream is passed on as a half close, after the bytes before it; an error
// on either side closes both, as a reset does.
func (k *link) pipe(dst, src net.Conn, p *pacer) {
	type chunk struct {
		b   []byte
		due time.Time
	}
	q := make(chan chunk, linkQueue)
	go func() {
		defer close(q)
		for {
			buf := chunkPool.Get().([]byte)
			n, err := src.Read(buf)
			if n > 0 {
				sent := time.Now()
				if p != nil {
					sent = p.send(n)
				}
				q <- chunk{buf[:n], sent.Add(k.delay)}
			} else {
				chunkPool.Put(buf)
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					dst.Close()
				}
				return
			}
		}
	}()
	failed := false
	for c := range q {
		if !failed {
			time.Sleep(time.Until(c.due))
			if _, err := dst.Write(c.b); err != nil {
				failed = true
				src.Close() // unblocks the reader, which then drains
			}
		}
		chunkPool.Put(c.b[:chunkSize])
	}
	if tc, ok := dst.(*net.TCPConn); ok && !failed {
		tc.CloseWrite()
	}
}

func (k *link) track(c ...net.Conn) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.conns == nil {
		for _, x := range c {
			x.Close()
		}
		return false
	}
	for _, x := range c {
		k.conns[x] = struct{}{}
	}
	return true
}

func (k *link) untrack(c ...net.Conn) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, x := range c {
		x.Close()
		delete(k.conns, x)
	}
}

// close stops the link and cuts every connection over it.
func (k *link) close() {
	k.l.Close()
	k.mu.Lock()
	defer k.mu.Unlock()
	for c := range k.conns {
		c.Close()
	}
	k.conns = nil
}

// pacer is one direction of a rate-capped link: bytes leave one after
// another at rate, whichever connection they belong to.
type pacer struct {
	mu   sync.Mutex
	rate float64   // bytes per second
	free time.Time // when the link has sent everything reserved so far
}

// send waits until n more bytes have left the link and returns that time.
// The link is a token bucket one chunk deep: a reader woken a little late
// by the scheduler loses no rate, but an idle link earns no more credit
// than one chunk, so a burst after a pause still goes at rate.
func (p *pacer) send(n int) time.Time {
	p.mu.Lock()
	depth := time.Duration(float64(chunkSize) / p.rate * float64(time.Second))
	if earliest := time.Now().Add(-depth); p.free.Before(earliest) {
		p.free = earliest
	}
	p.free = p.free.Add(time.Duration(float64(n) / p.rate * float64(time.Second)))
	done := p.free
	p.mu.Unlock()
	time.Sleep(time.Until(done))
	return done
}
