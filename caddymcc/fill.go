package caddymcc

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
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
	by     *http.Request // the client request that started it
	// tracked: counted in the cache's running fills (not when it started
	// while the cache was being destructed).
	tracked bool

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

// errUnsatisfiable is an upstream 416 to a learning fill, with the length
// it gave: each waiting client answers its own range against it.
type errUnsatisfiable struct{ length int64 }

func (e *errUnsatisfiable) Error() string {
	return fmt.Sprintf("range not satisfiable: the object has %d bytes", e.length)
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
	errTooLarge        = errors.New("upstream object is larger than max_object_size")
	errPanic           = errors.New("panic while filling")
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

// join records a client that will take its handle through headers. The
// flight's lock must be held, so the fill cannot have landed.
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

// gather waits, up to d, until bytes up to want are on disk or the fill
// ended, and returns the offset up to which bytes are on disk then.
func (f *fill) gather(want int64, d time.Duration) int64 {
	var timeout <-chan time.Time
	for {
		f.mu.Lock()
		pos, done, wake := f.pos, f.done, f.wake
		f.mu.Unlock()
		if pos >= want || done {
			return pos
		}
		if timeout == nil {
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-wake:
		case <-timeout:
			return f.progress()
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

// startFill builds the subrequest for blocks [first, last] of obj (nil
// when the object is not stored yet) from the client's request and runs it
// in the background, with the conditional headers cond for a
// revalidation. The caller registers the fill's claims or flight.
func (rq *request) startFill(obj *rangestore.Object, first, last int, cond http.Header) *fill {
	c := rq.c
	f := &fill{
		c:      c,
		key:    rq.key,
		origin: rq.origin,
		by:     rq.r,
		first:  first,
		last:   last,
		wake:   make(chan struct{}),
		pos:    int64(first) * c.blockSize,
	}
	fr, cancel := rq.subrequest(obj, int64(first)*c.blockSize, int64(last+1)*c.blockSize-1)
	for k, v := range cond {
		fr.Header[k] = v
	}
	var held *rangestore.Object
	if obj != nil {
		// The fill needs its own handle: the client may close its own first.
		held = obj.Dup()
	}
	f.tracked = c.track()
	c.stats.fillsStarted.Add(1)
	c.stats.fillsInFlight.Add(1)
	go f.run(rq.h, fr, cancel, rq.next, held)
	return f
}

// subrequest derives the upstream request for bytes [start, end] of obj
// (nil when it is not stored yet) from the client's: the same URL (so a
// parent cache sees the same cacheHostOrigin) and none of its headers, with
// a context that outlives the client and ends with the cache, fresh vars
// and a fresh replacer (reverse_proxy writes to both, and fills run
// concurrently).
func (rq *request) subrequest(obj *rangestore.Object, start, end int64) (*http.Request, context.CancelFunc) {
	r := rq.r
	tg := rq.target
	if obj != nil {
		if host, ok := metaValue(obj.Meta(), metaOrigin); ok && host != tg.origin {
			// Mirrors sharing a canonical key often have ETags of their
			// own: a stored version is completed from the host that
			// created it, never combined with another mirror's bytes.
			tg.origin = host
		}
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	stop := context.AfterFunc(rq.c.ctx, cancel)
	fr := r.Clone(ctx)
	// The path as the cache key has it (normalised), so that a parent
	// reached without a rewrite keys it the same.
	p, _, _ := strings.Cut(rq.uri, "?")
	if unescaped, err := url.PathUnescape(p); err == nil {
		fr.URL.Path, fr.URL.RawPath = unescaped, p
	}
	if tg.origin != rq.origin {
		if q, ok := replaceOriginParam(fr.URL.RawQuery, tg.origin); ok {
			fr.URL.RawQuery = q
		} else {
			fr.Host = tg.origin
		}
	}
	fr.Method = http.MethodGet
	fr.Body = http.NoBody
	fr.ContentLength = 0
	// The answer serves every client, so the request carries nothing of
	// this client's (credentials, cookies, conditionals, negotiation)
	// beyond the Via entries that detect forwarding loops, and asks for
	// the bytes as stored: a compressed answer could not be cut into byte
	// ranges of the object.
	fr.Header = http.Header{
		"Accept-Encoding": {"identity"},
		"Range":           {"bytes=" + strconv.FormatInt(start, 10) + "-" + strconv.FormatInt(end, 10)},
		"User-Agent":      {"caddy-mcc"},
	}
	for _, v := range r.Header.Values("Via") {
		fr.Header.Add("Via", v)
	}
	// Our mark for loop detection upstream (see Handler.checkLoop).
	fr.Header.Add("Via", "1.1 "+rq.c.node)
	srv, _ := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	repl := caddy.NewReplacer()
	fr = caddyhttp.PrepareRequest(fr, repl, nil, srv)
	setPlaceholders(repl, tg)
	return fr, func() { stop(); cancel() }
}

// run performs the fill and settles it.
func (f *fill) run(h *Handler, fr *http.Request, cancel context.CancelFunc, next caddyhttp.Handler, obj *rangestore.Object) {
	if f.tracked {
		defer f.c.running.Done()
	}
	defer f.c.stats.fillsInFlight.Add(-1)
	defer cancel()
	began := time.Now()
	fw := &fillWriter{f: f, h: h, obj: obj, header: make(http.Header)}
	err := f.c.queue.acquire(fr.Context())
	if err == nil {
		fw.idle = time.AfterFunc(h.fillTimeout, func() {
			fw.timedOut.Store(true)
			cancel()
		})
		err = serveNext(h.logger, next, fw, fr)
		fw.idle.Stop()
		f.c.queue.release()
	}
	err = fw.finish(err)
	if err != nil && fw.timedOut.Load() {
		err = fmt.Errorf("%w: %v", errFillIdle, err)
	}
	if c := h.logger.Check(zapcore.DebugLevel, "fill done"); c != nil {
		c.Write(zap.String("key", f.key), zap.Int("first", f.first), zap.Int("last", f.last),
			zap.Int64("bytes", fw.received), zap.Duration("took", time.Since(began)), zap.Error(err))
	}
	f.c.stats.fillSeconds.observe(time.Since(began))
	if err != nil && !answered(err) {
		kind := classifyFillError(err)
		f.c.stats.upstreamErrors.Add(1)
		f.c.stats.fillErrors[kind].Add(1)
		if kind == fillInvalid {
			h.logger.Warn("refused an upstream answer", zap.String("key", f.key), zap.Error(err))
		}
	}
	f.settle(fw.obj, err, fw.start, fw.end)
}

// answered reports whether a fill's error is an answer of the upstream's
// that the waiting clients act on, not a failure: an origin's 4xx, a 416
// that tells the length, or an answer to pass through.
func answered(err error) bool {
	var pass *upstreamResponse
	var un *errUnsatisfiable
	_, through := isPassThrough(err)
	return errors.As(err, &pass) || errors.As(err, &un) || through
}

// serveNext calls the next handler for a fill, turning a panic into the
// fill's error: reverse_proxy's http.ErrAbortHandler (upstream body cut
// off) is expected; any other panic, in the handlers or in the fill's own
// writer, fails this fill with its stack logged rather than taking the
// process (every download on the gateway) down.
func serveNext(logger *zap.Logger, next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error) {
	defer func() {
		switch v := recover(); {
		case v == nil:
		case v == http.ErrAbortHandler:
			err = errUpstreamAborted
		default:
			logger.Error("panic in a fill", zap.String("uri", r.RequestURI), zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
			err = fmt.Errorf("%w: %v", errPanic, v)
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
	c.learning.land(f.key, f)
	c.revalidating.land(f.key, f)
	if obj != nil {
		c.claims.drop(obj, f.first, f.last, f)
		if end > start {
			c.claims.drop(obj, obj.BlockOf(start), obj.BlockOf(end-1), f)
		}
		if err != nil && !strongValidator(obj.Meta()) {
			// It had to come whole from this one response.
			obj.Invalidate()
		}
	}

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

// Interface guards
var _ error = (*upstreamResponse)(nil)
