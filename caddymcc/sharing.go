package caddymcc

import (
	"errors"
	"net/http"
	"strings"

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
// answer as it comes, uncached.
func (rq *request) passThrough(detail string) error {
	rq.t.answer(statusBypass)
	rq.w.Header().Set("Cache-Status", rq.h.Name+"; fwd=bypass; detail="+detail)
	// Our mark for loop detection upstream (see Handler.checkLoop).
	rq.r.Header.Add("Via", "1.1 "+rq.c.node)
	return rq.next.ServeHTTP(rq.w, rq.r)
}

// hasCredentials reports whether r carries credentials a shared cache must
// not answer for others with.
func hasCredentials(r *http.Request) bool {
	return r.Header.Get("Authorization") != "" || r.Header.Get("Cookie") != ""
}

// sharedWithCredentials reports whether a stored response may answer a
// request that carries credentials (RFC 9111 section 3.5).
func sharedWithCredentials(m rangestore.Meta) bool {
	for _, v := range m.Header["Cache-Control"] {
		for _, d := range strings.Split(strings.ToLower(v), ",") {
			name, _, _ := strings.Cut(strings.TrimSpace(d), "=")
			if name == "public" || name == "s-maxage" || name == "must-revalidate" {
				return true
			}
		}
	}
	return false
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
