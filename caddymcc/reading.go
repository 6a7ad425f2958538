package caddymcc

import (
	"context"
	"net"
	"net/http"
	"syscall"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// A client that asks for an object and hangs up after the status line
// must cost the origin little, and one that reads must be fetched for at
// link speed. What the gateway has written tells them apart badly: the
// kernel takes megabytes into the connection's send buffer whether the
// client reads or not. What the client's TCP stack acknowledged tells
// them apart well: a client that reads nothing acknowledges at most its
// receive buffer (about 128KiB on Linux until it reads: the kernel grows
// the buffer only as the application takes bytes), so one that
// acknowledged readProof bytes of the answer reads. Until then the
// connection holds at most readLowat bytes not yet sent
// (TCP_NOTSENT_LOWAT), so that what the gateway managed to write is
// close to what the client took.
const (
	readProof = 512 << 10
	readLowat = 128 << 10
)

// connKey is the request context's key for the client's connection.
type connKey struct{}

// registerConn makes the server put each connection in its requests'
// context (Caddy passes the server in the provisioning context).
func registerConn(ctx context.Context) {
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || srv == nil {
		return
	}
	srv.RegisterConnContext(func(ctx context.Context, c net.Conn) context.Context {
		if ctx.Value(connKey{}) != nil {
			return ctx // another mcc handler of this server put it there
		}
		return context.WithValue(ctx, connKey{}, c)
	})
}

// reading tells how much of an answer the client's TCP stack acknowledged.
type reading struct {
	rc      syscall.RawConn
	start   uint64 // acknowledged before the answer
	limited bool   // readLowat is in force
}

// readingOf returns the acknowledgement counter of r's connection, with
// the connection's unsent bytes limited to readLowat, or nil where there
// is none: HTTP/2 and HTTP/3 share a connection between requests, and only
// Linux TCP tells. The caller calls unlimit when the answer ends.
func readingOf(r *http.Request) *reading {
	if r.ProtoMajor != 1 {
		return nil
	}
	c, _ := r.Context().Value(connKey{}).(net.Conn)
	for {
		nc, ok := c.(interface{ NetConn() net.Conn }) // TLS
		if !ok {
			break
		}
		c = nc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	n, ok := acked(rc)
	if !ok {
		return nil
	}
	return &reading{rc: rc, start: n, limited: setNotsentLowat(rc, readLowat)}
}

// took reports whether the client acknowledged at least n bytes since the
// answer began.
func (rd *reading) took(n uint64) bool {
	a, ok := acked(rd.rc)
	return ok && a-rd.start >= n
}

// unlimit gives the connection its default unsent bytes back: the client
// reads, or the answer is over (the next answer on the connection may be
// a hit to send at full speed).
func (rd *reading) unlimit() {
	if rd != nil && rd.limited {
		rd.limited = false
		setNotsentLowat(rd.rc, 0)
	}
}
