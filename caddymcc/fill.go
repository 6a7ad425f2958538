package caddymcc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// A fill is one upstream request, through the next handler (reverse_proxy),
// for a run of blocks of one object. It writes the blocks it owns to the
// store as bytes arrive and wakes every client waiting on them, so N
// clients of a missing block cause one upstream fetch and all of them
// stream it as it lands. A fill runs on its own context: the client that
// started it may leave without cutting off the others.
type fill struct {
	c      *cache
	key    string
	origin string
	learn  bool          // started for an object not yet in the store
	by     *http.Request // the client request that started it

	// first and last are the planned blocks; the Range sent upstream.
	first, last int

	mu   sync.Mutex
	wake chan struct{} // closed and replaced whenever the state below changes
	obj  *rangestore.Object
	pos  int64 // bytes before pos, in blocks this fill owns, are in the data file
	done bool
	err  error
	// upstreamStatus is the upstream's Cache-Status (a parent cache's
	// entries), to which a client answered from this fill adds its own.
	upstreamStatus string
	// notModified: a conditional fill got 304, the stored version is current.
	notModified bool
	// learners counts clients still to take their handle on the object
	// through headers; a transient object (no-store), which no later
	// lookup finds, stays open for them after the fill ends (kept).
	learners int
	kept     *rangestore.Object
}

// upstreamResponse is a non-success answer from upstream (an origin's 404,
// say), passed through to every waiting client and not cached.
type upstreamResponse struct {
	status int
	header http.Header
	body   []byte
}

func (u *upstreamResponse) Error() string {
	return fmt.Sprintf("upstream answered %d", u.status)
}

// maxPassBody bounds the body kept of a passed-through error response.
const maxPassBody = 64 << 10

var (
	errShortBody       = errors.New("upstream body ended before its Content-Range")
	errLongBody        = errors.New("upstream sent more bytes than its Content-Range")
	errWrongRange      = errors.New("upstream answered another range than requested")
	errNoLength        = errors.New("upstream answered without a length")
	errIdentityChanged = errors.New("upstream object changed (length, ETag or Last-Modified) during the download")
	errUpstreamAborted = errors.New("upstream connection aborted mid-body")
	errFillIdle        = errors.New("upstream sent nothing for the fill timeout")
)

func (f *fill) notifyLocked() {
	close(f.wake)
	f.wake = make(chan struct{})
}

// headers waits until the fill knows its object, and returns a handle on
// it for the caller to close; nil and the fill's error when it failed
// before; nil, nil when it ended and the object is to be looked up.
func (f *fill) headers(ctx context.Context) (*rangestore.Object, error) {
	defer f.learned()
	for {
		f.mu.Lock()
		obj, done, err, wake := f.obj, f.done, f.err, f.wake
		switch {
		case obj != nil && !done:
			// The fill closes its handle only after marking itself done,
			// under f.mu: obj is still open here.
			obj = obj.Dup()
		case done && f.kept != nil:
			obj, done = f.kept.Dup(), false
		}
		f.mu.Unlock()
		switch {
		case done && obj != nil:
			return nil, nil
		case done:
			return nil, err
		case obj != nil:
			return obj, nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// join records a client that will take its handle through headers. c.mu
// must be held, so the fill cannot have left the learning maps.
func (f *fill) join() {
	f.mu.Lock()
	f.learners++
	f.mu.Unlock()
}

// learned records that one learner took its handle (or gave up); the last
// one releases a kept transient object.
func (f *fill) learned() {
	f.mu.Lock()
	f.learners--
	var release *rangestore.Object
	if f.learners == 0 && f.done {
		release, f.kept = f.kept, nil
	}
	f.mu.Unlock()
	if release != nil {
		release.Close()
	}
}

// await waits until bytes at cur have arrived and returns the offset up to
// which bytes are on disk, or the fill's error when it ended before cur.
// Before it blocks it calls idle, which flushes what the client was sent.
func (f *fill) await(ctx context.Context, cur int64, idle func()) (int64, error) {
	for {
		f.mu.Lock()
		pos, started, done, err, wake := f.pos, f.obj != nil, f.done, f.err, f.wake
		f.mu.Unlock()
		if pos > cur && started {
			return pos, nil
		}
		if done {
			if err == nil {
				err = errShortBody
			}
			return 0, err
		}
		if idle != nil {
			idle()
			idle = nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// cacheStatus returns the Cache-Status of an answer from this fill: the
// upstream's entries (RFC 9211 lists caches from the origin's side), then
// ours.
func (f *fill) cacheStatus(ours string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.upstreamStatus == "" {
		return ours
	}
	return f.upstreamStatus + ", " + ours
}

// wasNotModified reports whether a conditional fill got 304.
func (f *fill) wasNotModified() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.notModified
}

// progress returns the offset up to which bytes are on disk now.
func (f *fill) progress() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pos
}

// startFill builds the subrequest for blocks [first, last] from the client
// request r and runs it in the background. c.mu must be held; the caller
// registers the fill's claims.
func (c *cache) startFill(h *Handler, r *http.Request, next caddyhttp.Handler, req request, obj *rangestore.Object, first, last int, cond http.Header) *fill {
	f := &fill{
		c:      c,
		key:    req.key,
		origin: req.origin,
		learn:  obj == nil,
		by:     r,
		first:  first,
		last:   last,
		wake:   make(chan struct{}),
		pos:    int64(first) * c.blockSize,
	}
	fr, cancel := h.subrequest(c.ctx, r, req, int64(first)*c.blockSize, int64(last+1)*c.blockSize-1)
	for k, v := range cond {
		fr.Header[k] = v
	}
	var held *rangestore.Object
	if obj != nil {
		// The fill needs its own handle: the client may close its own first.
		held = obj.Dup()
	}
	c.running.Add(1)
	c.stats.fillsStarted.Add(1)
	c.stats.fillsInFlight.Add(1)
	go f.run(h, fr, cancel, next, held)
	return f
}

// subrequest derives the upstream request for bytes [start, end] from the
// client's: same URL and headers (so a parent cache sees the same
// cacheHostOrigin), minus validators and encodings, with a context that
// outlives the client, fresh vars and a fresh replacer (reverse_proxy writes
// to both, and fills run concurrently).
func (h *Handler) subrequest(base context.Context, r *http.Request, req request, start, end int64) (*http.Request, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	stop := context.AfterFunc(base, cancel)
	fr := r.Clone(ctx)
	fr.Method = http.MethodGet
	fr.Body = http.NoBody
	fr.ContentLength = 0
	for _, k := range []string{"Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "Accept-Encoding", "Te", "Cache-Control", "Pragma"} {
		fr.Header.Del(k)
	}
	// Ask for the bytes as stored: a compressed answer could not be cut
	// into byte ranges of the object.
	fr.Header.Set("Accept-Encoding", "identity")
	fr.Header.Set("Range", "bytes="+strconv.FormatInt(start, 10)+"-"+strconv.FormatInt(end, 10))
	// Our mark for loop detection upstream (see Handler.checkLoop).
	fr.Header.Add("Via", "1.1 "+h.cache.node)
	srv, _ := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	repl := caddy.NewReplacer()
	fr = caddyhttp.PrepareRequest(fr, repl, nil, srv)
	setPlaceholders(repl, req)
	return fr, func() { stop(); cancel() }
}

// run performs the fill and settles it.
func (f *fill) run(h *Handler, fr *http.Request, cancel context.CancelFunc, next caddyhttp.Handler, obj *rangestore.Object) {
	defer f.c.running.Done()
	defer f.c.stats.fillsInFlight.Add(-1)
	defer cancel()
	began := time.Now()
	fw := &fillWriter{f: f, h: h, obj: obj, header: make(http.Header)}
	fw.idle = time.AfterFunc(h.fillTimeout, func() {
		fw.timedOut.Store(true)
		cancel()
	})
	err := serveNext(next, fw, fr)
	fw.idle.Stop()
	err = fw.finish(err)
	if err != nil && fw.timedOut.Load() {
		err = fmt.Errorf("%w: %v", errFillIdle, err)
	}
	if c := h.logger.Check(zapcore.DebugLevel, "fill done"); c != nil {
		c.Write(zap.String("key", f.key), zap.Int("first", f.first), zap.Int("last", f.last),
			zap.Int64("bytes", fw.received), zap.Duration("took", time.Since(began)), zap.Error(err))
	}
	f.c.stats.fillSeconds.observe(time.Since(began))
	var pass *upstreamResponse
	if err != nil && !errors.As(err, &pass) {
		f.c.stats.upstreamErrors.Add(1)
		f.c.stats.fillErrors[classifyFillError(err)].Add(1)
	}
	f.settle(fw.obj, err, fw.start, fw.end)
}

// serveNext calls the next handler, turning reverse_proxy's
// http.ErrAbortHandler panic (upstream body cut off) into an error.
func serveNext(next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error) {
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler {
				panic(v)
			}
			err = errUpstreamAborted
		}
	}()
	return next.ServeHTTP(w, r)
}

// settle ends the fill: wakes the waiters with its outcome, drops the claims
// it still holds on the blocks of [start, end) and on its planned blocks, and
// releases its object.
func (f *fill) settle(obj *rangestore.Object, err error, start, end int64) {
	// Drop the claims first, so a request arriving from now on starts a
	// fill of its own rather than taking this one's outcome (an origin's
	// 404 is not to be reused).
	c := f.c
	c.mu.Lock()
	if f.learn && c.learning[f.key] == f {
		delete(c.learning, f.key)
	}
	if c.revalidating[f.key] == f {
		delete(c.revalidating, f.key)
	}
	if obj != nil {
		drop := func(first, last int) {
			for b := first; b <= last; b++ {
				if k := (blockKey{obj.ID(), b}); c.fills[k] == f {
					delete(c.fills, k)
				}
			}
		}
		drop(f.first, f.last)
		if end > start {
			drop(obj.BlockOf(start), obj.BlockOf(end-1))
		}
	}
	c.mu.Unlock()

	f.mu.Lock()
	f.done = true
	f.err = err
	if f.obj == nil {
		f.obj = obj
	}
	if obj != nil && f.learners > 0 && obj.Key() == "" {
		// A transient object: learners yet to come could not find it.
		f.kept, obj = obj, nil
	}
	f.notifyLocked()
	f.mu.Unlock()
	if obj != nil {
		obj.Close()
	}
}

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
		// An empty object has no byte to ask for.
		if _, _, total, ok := parseContentRange(w.header.Get("Content-Range")); ok && total == 0 && reqStart == 0 {
			meta = metaFrom(w.header, 0)
			w.start, w.end = 0, 0
			break
		}
		fallthrough
	default:
		h := w.header.Clone()
		h.Del("Content-Length")
		w.pass = &upstreamResponse{status: code, header: h}
		return
	}
	stampMeta(&meta, w.header, freshnessNow())
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
		if !w.obj.Meta().SameIdentity(meta) {
			c.invalidate(f.key, w.obj)
			return fmt.Errorf("%w: stored etag %q length %d, upstream etag %q length %d",
				errIdentityChanged, w.obj.Meta().ETag, w.obj.Size(), meta.ETag, meta.Length)
		}
	} else if uncacheable(meta) {
		// no-store or private: stream it to this fill's clients from an
		// object under no key, gone when they are done (RFC 9111 section
		// 3); a version stored before goes too.
		c.store.Invalidate(f.key)
		obj, err := c.store.CreateTransient(meta)
		if err != nil {
			return err
		}
		w.obj = obj
	} else {
		obj, err := c.store.Create(f.key, meta)
		if errors.Is(err, rangestore.ErrIdentityMismatch) {
			// A new version: the old one goes, holders keep reading it.
			c.store.Invalidate(f.key)
			obj, err = c.store.Create(f.key, meta)
		}
		if err != nil {
			return err
		}
		w.obj = obj
	}
	first, last := w.obj.BlockOf(w.start), w.obj.BlockOf(w.end-1)
	if w.end == w.start {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for b := first; b <= last; b++ {
		k := blockKey{w.obj.ID(), b}
		if g := c.fills[k]; g == nil && !w.obj.HasBlock(b) {
			c.fills[k] = f
		}
	}
	return nil
}

// owns reports whether the fill holds the claim on block b.
func (w *fillWriter) owns(b int) bool {
	c := w.f.c
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fills[blockKey{w.obj.ID(), b}] == w.f
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
		if w.bw == nil && w.pos == blk.Off && w.owns(b) {
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
func (w *fillWriter) release(b int) {
	c := w.f.c
	c.mu.Lock()
	if k := (blockKey{w.obj.ID(), b}); c.fills[k] == w.f {
		delete(c.fills, k)
	}
	c.mu.Unlock()
}

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

// invalidate drops key from the store if obj is still its stored version.
func (c *cache) invalidate(key string, obj *rangestore.Object) {
	cur, err := c.store.Get(key)
	if err != nil {
		return
	}
	if cur.ID() == obj.ID() {
		c.store.Invalidate(key)
	}
	cur.Close()
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

// parseContentRange parses "bytes S-E/TOTAL" or "bytes */TOTAL" (start and
// end are -1 then); total is -1 for "/*".
func parseContentRange(s string) (start, end, total int64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, 0, false
	}
	total = -1
	if tot != "*" {
		t, err := strconv.ParseInt(tot, 10, 64)
		if err != nil || t < 0 {
			return 0, 0, 0, false
		}
		total = t
	}
	if rng == "*" {
		return -1, -1, total, true
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, 0, false
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start || total >= 0 && end >= total {
		return 0, 0, 0, false
	}
	return start, end, total, true
}

// Interface guards
var (
	_ http.ResponseWriter = (*fillWriter)(nil)
	_ http.Flusher        = (*fillWriter)(nil)
	_ io.Writer           = (*fillWriter)(nil)
)
