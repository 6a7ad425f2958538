package caddymcc

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// What a shared cache may keep and share, and what it passes through
// instead (RFC 9111 sections 3, 3.5 and 4.1; RFC 9110 section 14.3).
//
//   - A request carrying credentials (Authorization or Cookie) is served
//     from the cache only when the stored response allows it (public,
//     s-maxage or must-revalidate, RFC 9111 section 3.5); otherwise it goes
//     upstream as sent, on its own: nothing of it is stored, no other
//     client waits on it and it waits on no other client's fill. Fills
//     never carry a client's credentials.
//   - A private or no-store response reaches only the client whose request
//     fetched it; clients collapsed onto that fill send their own requests.
//   - A response that varies on request headers other than Accept-Encoding
//     (the cache asks for identity) is passed through: every client sends
//     its own request.
//   - Ranges of one object are combined only under a strong validator (a
//     strong ETag): without one an object is stored only from a single
//     response that carried all of it, and is otherwise passed through.

// errPassThrough is an answer the cache may not share or combine: every
// client waiting on it sends its own request upstream instead.
type errPassThrough struct{ detail string }

func (e errPassThrough) Error() string { return "passed through uncached: " + e.detail }

var (
	errVaries  = errPassThrough{"vary"}
	errWeak    = errPassThrough{"no-strong-validator"}
	errPrivate = errPassThrough{"private"}
)

// passThrough sends the client's own request upstream and relays the
// answer as it comes, uncached. An upstream that sends nothing for
// fill_timeout is given up, as a fill's is: 504 before the status line,
// a cut connection after it.
func (rq *request) passThrough(detail string) error {
	rq.t.answer(statusBypass)
	hdr := rq.w.Header()
	for k := range hdr {
		// Entity headers of a stored version set before the store failed
		// under it are not this answer's.
		delete(hdr, k)
	}
	hdr.Set("Cache-Status", rq.h.Name+"; fwd=bypass; detail="+detail)
	// Our mark for loop detection upstream (see Handler.checkLoop).
	rq.r.Header.Add("Via", "1.1 "+rq.c.node)
	ctx, cancel := context.WithCancel(rq.r.Context())
	defer cancel()
	iw := &idleWriter{ResponseWriter: rq.w, timeout: rq.h.fillTimeout}
	iw.timer = time.AfterFunc(iw.timeout, func() {
		iw.timedOut.Store(true)
		cancel()
	})
	err := rq.next.ServeHTTP(iw, rq.r.WithContext(ctx))
	iw.timer.Stop()
	switch {
	case !iw.timedOut.Load():
		return err
	case iw.wrote.Load():
		panic(http.ErrAbortHandler)
	}
	return caddyhttp.Error(http.StatusGatewayTimeout, errFillIdle)
}

// idleWriter passes an answer through, resetting its idle timer on every
// write.
type idleWriter struct {
	http.ResponseWriter
	timeout  time.Duration
	timer    *time.Timer
	timedOut atomic.Bool
	wrote    atomic.Bool
}

func (w *idleWriter) WriteHeader(code int) {
	if w.timedOut.Load() {
		return // reverse_proxy's own status for the cancelled request
	}
	w.wrote.Store(true)
	w.timer.Reset(w.timeout)
	w.ResponseWriter.WriteHeader(code)
}

func (w *idleWriter) Write(p []byte) (int, error) {
	if w.timedOut.Load() {
		return 0, errFillIdle
	}
	w.wrote.Store(true)
	w.timer.Reset(w.timeout)
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the client's writer (Flush).
func (w *idleWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// hasCredentials reports whether r carries credentials a shared cache must
// not answer for others with.
func hasCredentials(r *http.Request) bool {
	return r.Header.Get("Authorization") != "" || r.Header.Get("Cookie") != ""
}

// sharedWithCredentials reports whether a stored response may answer a
// request that carries credentials (RFC 9111 section 3.5).
func sharedWithCredentials(m rangestore.Meta) bool {
	return hasDirective(m, "public", "s-maxage", "must-revalidate")
}

// varies reports whether a response depends on request headers the cache
// does not send the same for every client: any Vary other than
// Accept-Encoding (fills always ask for identity).
func varies(h http.Header) bool {
	for _, v := range h.Values("Vary") {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" && !strings.EqualFold(f, "Accept-Encoding") {
				return true
			}
		}
	}
	return false
}

// strongValidator reports whether m's version is identified by a strong
// ETag, under which ranges of several responses may be combined (RFC 9110
// section 14.3; RFC 9111 section 3.4).
func strongValidator(m rangestore.Meta) bool {
	return m.ETag != "" && !strings.HasPrefix(m.ETag, "W/")
}

// isPassThrough reports whether err means the answer must be passed
// through, and with which detail.
func isPassThrough(err error) (string, bool) {
	var p errPassThrough
	if errors.As(err, &p) {
		return p.detail, true
	}
	return "", false
}
