package caddymcc

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// fillWriter is the http.ResponseWriter the next handler answers a fill
// into. It checks the response against the request and the stored
// identity, then writes the body into the blocks the fill owns.
type fillWriter struct {
	f      *fill
	h      *Handler
	obj    *rangestore.Object
	header http.Header

	status   int
	failed   error // set once the response is refused; the rest is drained
	pass     *upstreamResponse
	start    int64 // offset of the first body byte
	end      int64 // offset after the last body byte
	pos      int64
	received int64
	bw       *rangestore.BlockWriter

	idle     *time.Timer
	timedOut atomic.Bool
}

func (w *fillWriter) Header() http.Header { return w.header }

// Flush lets reverse_proxy flush; there is nothing to flush.
func (w *fillWriter) Flush() {}

func (w *fillWriter) WriteHeader(code int) {
	if w.status != 0 || code < 200 {
		return // informational answers, or a second call
	}
	w.status = code
	f := w.f
	c := f.c
	if cs := w.header.Values("Cache-Status"); len(cs) > 0 {
		f.mu.Lock()
		f.upstreamStatus = strings.Join(cs, ", ")
		f.mu.Unlock()
	}
	reqStart := int64(f.first) * c.blockSize
	reqEnd := int64(f.last+1)*c.blockSize - 1
	var meta rangestore.Meta
	switch code {
	case http.StatusPartialContent:
		start, end, total, ok := parseContentRange(w.header.Get("Content-Range"))
		switch {
		case !ok || total < 0:
			w.failed = fmt.Errorf("%w: Content-Range %q", errWrongRange, w.header.Get("Content-Range"))
			return
		case start != reqStart || end != min(reqEnd, total-1):
			w.failed = fmt.Errorf("%w: asked bytes %d-%d, got %d-%d/%d", errWrongRange, reqStart, reqEnd, start, end, total)
			return
		}
		if cl := w.header.Get("Content-Length"); cl != "" && cl != strconv.FormatInt(end-start+1, 10) {
			w.failed = fmt.Errorf("%w: Content-Length %s for bytes %d-%d", errWrongRange, cl, start, end)
			return
		}
		meta = metaFrom(w.header, total)
		w.start, w.end = start, end+1
	case http.StatusOK:
		// The upstream ignored Range: it sends the whole object, which is
		// stored block by block in order.
		n, err := strconv.ParseInt(w.header.Get("Content-Length"), 10, 64)
		if err != nil || n < 0 || w.header.Get("Content-Encoding") != "" && w.header.Get("Content-Encoding") != "identity" {
			w.failed = errNoLength
			return
		}
		meta = metaFrom(w.header, n)
		w.start, w.end = 0, n
	case http.StatusNotModified:
		f.mu.Lock()
		f.notModified = true
		f.mu.Unlock()
		return
	case http.StatusRequestedRangeNotSatisfiable:
		_, _, total, ok := parseContentRange(w.header.Get("Content-Range"))
		switch {
		case w.obj != nil:
			// The stored version reaches bytes the upstream's does not
			// have: it shrank, and the stored version goes.
			w.obj.Invalidate()
			w.failed = fmt.Errorf("%w: upstream answered 416 for bytes %d-%d of %d", errIdentityChanged, reqStart, reqEnd, w.obj.Size())
			return
		case ok && total == 0 && reqStart == 0:
			// An empty object has no byte to ask for.
			meta = metaFrom(w.header, 0)
			w.start, w.end = 0, 0
		case ok && total >= 0:
			// Past the end of the object: its length is learned, and each
			// waiting client gets its own answer.
			w.failed = &errUnsatisfiable{length: total}
			return
		default:
			w.keepAnswer(code)
			return
		}
	default:
		w.keepAnswer(code)
		return
	}
	if meta.Length > w.h.MaxObjectSize {
		w.failed = fmt.Errorf("%w: %d bytes, max_object_size is %d", errTooLarge, meta.Length, w.h.MaxObjectSize)
		return
	}
	stampMeta(&meta, w.header, c.now())
	meta.Internal[metaOrigin] = f.origin
	if err := w.pin(meta); err != nil {
		w.failed = err
		return
	}
	w.pos = w.start
	f.mu.Lock()
	f.obj = w.obj
	f.pos = w.pos
	f.notifyLocked()
	f.mu.Unlock()
}

// pin checks the response's identity against the object the fill is for,
// or creates the object for a learning fill, and claims the blocks the
// response carries that nobody else is fetching.
func (w *fillWriter) pin(meta rangestore.Meta) error {
	f, c := w.f, w.f.c
	if w.obj != nil {
		switch {
		case !w.obj.Meta().SameIdentity(meta):
			w.obj.Invalidate()
			return fmt.Errorf("%w: stored etag %q length %d, upstream etag %q length %d",
				errIdentityChanged, w.obj.Meta().ETag, w.obj.Size(), meta.ETag, meta.Length)
		case !strongValidator(meta):
			// Only a single response may make up a version without a
			// strong validator: drop what is stored, the next request
			// fetches it whole or passes it through.
			w.obj.Invalidate()
			return fmt.Errorf("%w: etag %q is not strong; ranges of it cannot be combined", errIdentityChanged, meta.ETag)
		}
		c.claims.own(w.obj, w.start, w.end, f)
		return nil
	}
	switch {
	case varies(w.header):
		return errVaries
	case !strongValidator(meta) && (w.start != 0 || w.end != meta.Length):
		return errWeak
	case uncacheable(meta):
		// no-store or private: stream it to this fill's client from an
		// object under no key, gone when it is done (RFC 9111 section 3);
		// a version stored before goes too.
		c.store.Invalidate(f.key)
		obj, err := c.store.CreateTransient(meta)
		if err != nil {
			return err
		}
		// Nobody arriving from now on can take this answer: they start
		// fills of their own rather than join this one to be turned away.
		c.learning.land(f.key, f)
		c.revalidating.land(f.key, f)
		w.obj = obj
		c.claims.own(w.obj, w.start, w.end, f)
		return nil
	}
	obj, err := c.claims.create(func() (*rangestore.Object, error) {
		obj, err := c.store.Create(f.key, meta)
		if errors.Is(err, rangestore.ErrIdentityMismatch) {
			// A new version: the old one goes, holders keep reading it.
			c.store.Invalidate(f.key)
			obj, err = c.store.Create(f.key, meta)
		}
		return obj, err
	}, w.start, w.end, f)
	if err != nil {
		return err
	}
	w.obj = obj
	return nil
}

// keepAnswer keeps a non-success answer to pass on to the fill's waiters.
func (w *fillWriter) keepAnswer(code int) {
	h := w.header.Clone()
	h.Del("Content-Length")
	w.pass = &upstreamResponse{status: code, header: h}
}

func (w *fillWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	n := len(p)
	w.received += int64(n)
	w.f.c.stats.upstreamBytes.Add(int64(n))
	w.idle.Reset(w.h.fillTimeout)
	switch {
	case w.pass != nil:
		if room := maxPassBody - len(w.pass.body); room > 0 {
			w.pass.body = append(w.pass.body, p[:min(room, len(p))]...)
		}
		return n, nil
	case w.failed != nil:
		return 0, w.failed
	}
	if err := w.store(p); err != nil {
		w.failed = err
		return 0, err
	}
	w.f.mu.Lock()
	w.f.pos = w.pos
	w.f.notifyLocked()
	w.f.mu.Unlock()
	return n, nil
}

// store writes p at w.pos into the blocks the fill owns, committing each
// block as it completes; bytes of blocks owned by others are skipped.
func (w *fillWriter) store(p []byte) error {
	if int64(len(p)) > w.end-w.pos {
		return errLongBody
	}
	for len(p) > 0 {
		b := w.obj.BlockOf(w.pos)
		blk := w.obj.Block(b)
		n := min(int64(len(p)), blk.Off+blk.Len-w.pos)
		if w.bw == nil && w.pos == blk.Off && w.f.c.claims.owns(w.obj, b, w.f) {
			bw, err := w.obj.WriteBlock(b)
			if err != nil {
				// The bytes cannot be stored: waiters on this block
				// cannot be served from disk.
				w.release(b)
				return err
			}
			// Waiters send these bytes from the data file as they land;
			// a failed fill must not punch them out under them.
			bw.KeepBytes()
			w.bw = bw
		}
		if w.bw != nil {
			if _, err := w.bw.Write(p[:n]); err != nil {
				w.bw.Abort()
				w.bw = nil
				w.release(b)
				return err
			}
		}
		w.pos += n
		p = p[n:]
		if w.bw != nil && w.pos == blk.Off+blk.Len {
			err := w.bw.Commit()
			w.bw = nil
			w.release(b)
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// release gives up the claim on block b: it is present now, or the fill
// could not write it.
func (w *fillWriter) release(b int) { w.f.c.claims.release(w.obj, b, w.f) }

// finish checks the response was complete and returns the fill's outcome.
func (w *fillWriter) finish(err error) error {
	if w.bw != nil {
		w.bw.Abort()
		w.bw = nil
	}
	switch {
	case w.pass != nil:
		return w.pass
	case w.failed != nil:
		return w.failed
	case err != nil:
		return err
	case w.status == http.StatusNotModified:
		return nil
	case w.status == 0:
		return errNoLength
	case w.pos != w.end:
		return fmt.Errorf("%w: got %d of %d bytes", errShortBody, w.pos-w.start, w.end-w.start)
	}
	return nil
}

// metaFrom takes the identity and the headers to replay from an upstream
// response.
func metaFrom(h http.Header, length int64) rangestore.Meta {
	m := rangestore.Meta{
		Length:       length,
		ETag:         h.Get("Etag"),
		LastModified: h.Get("Last-Modified"),
		ContentType:  h.Get("Content-Type"),
	}
	for _, k := range replayHeaders {
		if v := h.Values(k); len(v) > 0 {
			if m.Header == nil {
				m.Header = make(map[string][]string)
			}
			m.Header[k] = append([]string(nil), v...)
		}
	}
	return m
}

// replayHeaders are the upstream response headers stored with an object
// and sent with every answer from the cache, besides ETag, Last-Modified
// and Content-Type.
var replayHeaders = []string{"Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language", "Expires"}

// Interface guards
var (
	_ http.ResponseWriter = (*fillWriter)(nil)
	_ http.Flusher        = (*fillWriter)(nil)
	_ io.Writer           = (*fillWriter)(nil)
)
