package caddymcc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// A download whose blocks the store cannot take (the disk budget is full
// of objects in use, the object was purged while it was read, or its drive
// fails) goes on uncached: the rest of its range comes from one upstream request of its
// own, relayed to the client as it arrives, checked to be the same version.

// storeRefused reports whether a fill failed because the store would not
// take its bytes (its budget, a purge, or its drive failing), not because
// of the upstream.
func storeRefused(err error) bool {
	return errors.Is(err, rangestore.ErrNoSpace) || errors.Is(err, rangestore.ErrGone) || storeIOError(err)
}

// streamUncached sends bytes [pos, end) of obj from upstream straight to
// the client, whose status line is out; why is the store's refusal.
func (rq *request) streamUncached(obj *rangestore.Object, pos, end int64, why error) error {
	rq.c.stats.uncachedStreams.Add(1)
	rq.h.logger.Warn("store refused a download's blocks; streaming the rest uncached",
		zap.String("key", rq.key), zap.Int64("from", pos), zap.Int64("to", end), zap.NamedError("why", why))
	fr, cancel := rq.subrequest(obj, pos, end-1)
	defer cancel()
	// Unlike a fill, this request serves one client: it ends with it.
	stop := context.AfterFunc(rq.r.Context(), cancel)
	defer stop()
	dw := &uncachedWriter{rq: rq, meta: obj.Meta(), start: pos, end: end, header: make(http.Header)}
	dw.idle = time.AfterFunc(rq.h.fillTimeout, cancel)
	err := serveNext(rq.h.logger, rq.next, dw, fr)
	dw.idle.Stop()
	switch {
	case dw.failed != nil:
		return dw.failed
	case dw.pos == end:
		return nil
	case err != nil:
		return err
	}
	return fmt.Errorf("%w: got %d of %d bytes", errShortBody, dw.pos-pos, end-pos)
}

// uncachedWriter is the response writer of streamUncached: it accepts only
// bytes [start, end) of the version meta describes and writes them to the
// client.
type uncachedWriter struct {
	rq         *request
	meta       rangestore.Meta
	start, end int64
	header     http.Header
	status     int
	pos        int64
	failed     error
	idle       *time.Timer
}

func (w *uncachedWriter) Header() http.Header { return w.header }

// Flush lets reverse_proxy flush; the client's writer is flushed by Write.
func (w *uncachedWriter) Flush() {}

func (w *uncachedWriter) WriteHeader(code int) {
	if w.status != 0 || code < 200 {
		return
	}
	w.status = code
	w.pos = w.start
	var length int64
	switch code {
	case http.StatusPartialContent:
		start, end, total, ok := parseContentRange(w.header.Get("Content-Range"))
		if !ok || start != w.start || end != w.end-1 {
			w.failed = fmt.Errorf("%w: asked bytes %d-%d, got Content-Range %q", errWrongRange, w.start, w.end-1, w.header.Get("Content-Range"))
			return
		}
		length = total
	case http.StatusOK:
		// The upstream ignored Range: skip to start.
		n, err := strconv.ParseInt(w.header.Get("Content-Length"), 10, 64)
		if err != nil {
			w.failed = errNoLength
			return
		}
		length, w.pos = n, 0
	default:
		w.failed = fmt.Errorf("upstream answered %d to the rest of a download", code)
		return
	}
	if m := metaFrom(w.header, length); !w.meta.SameIdentity(m) || !strongValidator(m) {
		w.failed = fmt.Errorf("%w: upstream etag %q length %d", errIdentityChanged, m.ETag, m.Length)
	}
}

func (w *uncachedWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.failed != nil {
		return 0, w.failed
	}
	w.idle.Reset(w.rq.h.fillTimeout)
	n := len(p)
	if skip := w.start - w.pos; skip > 0 {
		k := int(min(skip, int64(len(p))))
		p, w.pos = p[k:], w.pos+int64(k)
	}
	if int64(len(p)) > w.end-w.pos {
		if w.status == http.StatusPartialContent {
			w.failed = errLongBody
			return 0, w.failed
		}
		p = p[:w.end-w.pos]
	}
	if len(p) > 0 {
		if _, err := w.rq.w.Write(p); err != nil {
			w.failed = err
			return 0, err
		}
		http.NewResponseController(w.rq.w).Flush()
		w.pos += int64(len(p))
		w.rq.t.sentMiss(int64(len(p)))
	}
	if w.pos == w.end && w.status == http.StatusOK {
		// The rest of a whole-object answer is not wanted.
		return n, io.EOF
	}
	return n, nil
}

// Interface guards
var (
	_ http.ResponseWriter = (*uncachedWriter)(nil)
	_ http.Flusher        = (*uncachedWriter)(nil)
)
