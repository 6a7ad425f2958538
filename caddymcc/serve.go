package caddymcc

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// request is one client request the cache answers: the handler and the
// cache serving it, the client's request and response writer, the next
// handler that fills misses, what the request is for, and its tally.
type request struct {
	h     *Handler
	c     *cache
	store *rangestore.Store
	w     http.ResponseWriter
	r     *http.Request
	next  caddyhttp.Handler
	target
	t tally
	// The request's read-ahead: fills it starts stay within blocks up to
	// frontier. Until the client shows that it reads what it is sent,
	// each window (ahead blocks, from startReadAhead) is asked for only
	// when the client passes the one before, so a request abandoned after
	// its status line costs one window. A client shows it reads by the
	// acknowledgements of its TCP stack (reading, readProof); where the
	// connection cannot tell, by reading its first windows, which then
	// double. Then, eager, each next window of ReadAhead is asked for as
	// soon as the client reaches block trigger, in the window before, so
	// the next upstream request is under way while the current one is
	// read.
	ahead, frontier, trigger int
	// eager: the client reads what it is sent (proven, or a child
	// gateway's fill).
	eager bool
	// reading: what the client's TCP stack acknowledged, when it tells
	// (probed: looked for).
	reading *reading
	probed  bool
}

// reached records that the client reached block b and moves the
// read-ahead frontier on. It is first called before any byte of the
// answer is written.
func (rq *request) reached(b int) {
	if !rq.probed {
		rq.probed = true
		if !rq.eager {
			rq.reading = readingOf(rq.r)
		}
	}
	if !rq.eager && rq.reading != nil && rq.reading.took(readProof) {
		// The client reads: the full read-ahead from here on.
		rq.eager, rq.ahead = true, rq.h.raBlocks
		rq.trigger = min(rq.trigger, b)
		rq.reading.unlimit()
	}
	if rq.frontier >= 0 && b >= rq.trigger && (rq.eager || rq.reading == nil) {
		careful := rq.ahead < 2*rq.h.startAhead && rq.ahead < rq.h.raBlocks && !rq.eager
		rq.ahead = min(2*rq.ahead, rq.h.raBlocks)
		rq.trigger = rq.frontier + 1
		rq.frontier += rq.ahead
		if careful {
			// Until the client has read its first two windows, the
			// next one waits for the last block of the one before.
			rq.trigger = rq.frontier
		}
	}
	if rq.frontier < b {
		// The first block this request fetches, or past all it fetched
		// so far: a window from here.
		rq.frontier = b + rq.ahead - 1
		rq.trigger = rq.frontier
		if rq.eager {
			rq.trigger = b
		}
	}
}

// serve answers an allowed request from the store, filling what is missing.
func (rq *request) serve() error {
	for attempt := 0; ; attempt++ {
		obj, err := rq.store.Get(rq.key)
		if hasCredentials(rq.r) && (err != nil || !sharedWithCredentials(obj.Meta())) {
			if err == nil {
				obj.Close()
			}
			return rq.passThrough("credentials")
		}
		var learned *fill
		note := ""
		if errors.Is(err, rangestore.ErrNotFound) {
			if hook := rq.c.beforeLearn; hook != nil {
				hook(rq.key)
			}
			obj, learned, err = rq.learn()
		} else if err == nil {
			if expires, ok := rq.expiry(obj); ok && !rq.c.now().Before(expires) {
				obj, learned, note, err = rq.revalidate(obj, expires)
			}
		}
		var un *errUnsatisfiable
		switch {
		case err == nil:
		case errors.As(err, &un):
			// The object is shorter than the range the fill asked for:
			// answer this client's own range against its length.
			// (Its own Range, If-Range aside: no validator is known yet.)
			if _, rerr := parseRange(rq.r.Header.Get("Range"), un.length); rerr == nil && attempt < 2 {
				continue
			}
			return rq.unsatisfiable(un.length)
		default:
			if detail, ok := isPassThrough(err); ok {
				return rq.passThrough(detail)
			}
			if storeIOError(err) {
				// The drive fails under the object: serve it uncached.
				return rq.passThrough("store-error")
			}
			return rq.upstreamError(err)
		}
		sent, err := rq.respond(obj, learned, note)
		obj.Close()
		switch {
		case err == nil:
			return nil
		case !sent && attempt == 0 && errors.Is(err, errIdentityChanged):
			// The object changed upstream before anything was sent:
			// start over on the new version.
			continue
		case !sent && storeIOError(err) && attempt < 2:
			// Its data file went away (evicted or invalidated since the
			// lookup): look it up again.
			continue
		case !sent && storeIOError(err):
			// The drive fails under the object: serve it uncached.
			return rq.passThrough("store-error")
		case !sent:
			return rq.upstreamError(err)
		}
		// Headers and perhaps bytes are out: the only honest end is to cut
		// the connection, so the client sees a failed transfer rather than
		// a short or mixed body. (The error may also be the client's own
		// connection failing.)
		if rq.r.Context().Err() == nil {
			rq.t.answer(statusError)
			rq.h.logger.Warn("cutting the response short", zap.String("key", rq.key), zap.Error(err))
		}
		panic(http.ErrAbortHandler)
	}
}

// unsatisfiable answers 416 for a range past the end of an object of
// length bytes that is not stored (RFC 9110 section 15.5.17).
func (rq *request) unsatisfiable(length int64) error {
	rq.t.answer(statusMiss)
	rq.w.Header().Set("Cache-Status", rq.h.Name+"; fwd=miss")
	writeUnsatisfiable(rq.w, errNoOverlap, length)
	return nil
}

// join collapses the request onto the fill in flight for its key in fl,
// starting one with start when there is none. Joining another request's
// fill counts as a collapsed wait.
func (rq *request) join(fl *flights, start func() *fill) *fill {
	f, joined := fl.join(rq.key, start)
	if joined {
		rq.c.stats.collapsed.Add(1)
	}
	return f
}

// learn fetches the first wanted block of an object that is not stored
// yet, to learn its length and validators, and returns the stored object.
// Clients arriving meanwhile join the same fetch.
func (rq *request) learn() (*rangestore.Object, *fill, error) {
	bs := rq.c.blockSize
	start, end := wantedSpan(rq.r.Header.Get("Range"))
	if start >= rq.h.MaxObjectSize {
		// No stored object reaches there: learn the length from the
		// start, and the client gets its 416 from that.
		start, end = 0, -1
	}
	first := int(start / bs)
	rq.reached(first)
	last := rq.frontier
	if end >= 0 {
		last = min(last, int(end/bs))
	}
	if rq.r.Method == http.MethodHead {
		last = first
	}
	var found *rangestore.Object
	f := rq.join(rq.c.learning, func() *fill {
		// A learning fill may have stored the object and ended since the
		// lookup: then there is nothing to learn.
		if obj, err := rq.store.Get(rq.key); err == nil {
			found = obj
			return nil
		}
		return rq.startFill(nil, first, last, nil)
	})
	if f == nil {
		return found, nil, nil
	}
	obj, err := f.headers(rq.r.Context())
	if err == nil && obj == nil {
		// The fill is over and stored the object: read the stored version.
		obj, err = rq.store.Get(rq.key)
	}
	if err == nil && rq.notForMe(obj, f) {
		obj.Close()
		return nil, nil, errPrivate
	}
	return obj, f, err
}

// notForMe reports whether obj, fetched by fill f, is a private or
// no-store answer (an object under no key) for another client's request.
func (rq *request) notForMe(obj *rangestore.Object, f *fill) bool {
	return obj.Key() == "" && f.by != rq.r
}

// revalidate checks a stale obj upstream with a conditional request,
// collapsed across clients, before it is served. It returns the object to
// serve: obj when the upstream says 304 (note then says so for
// Cache-Status), a new version with the fill that fetched it, or obj as a
// stale hit when the upstream fails within StaleIfError of expiry. It
// closes obj when it returns another object or an error.
func (rq *request) revalidate(obj *rangestore.Object, expired time.Time) (*rangestore.Object, *fill, string, error) {
	cond := make(http.Header)
	m := obj.Meta()
	if m.ETag != "" {
		cond.Set("If-None-Match", m.ETag)
	}
	if m.LastModified != "" {
		cond.Set("If-Modified-Since", m.LastModified)
	}
	f := rq.join(rq.c.revalidating, func() *fill { return rq.startFill(nil, 0, 0, cond) })
	fresh, err := f.headers(rq.r.Context())
	if err == nil && fresh == nil && !f.wasNotModified() {
		// The fill stored a version and ended: read it.
		fresh, err = rq.store.Get(rq.key)
	}
	if err == nil && fresh != nil && rq.notForMe(fresh, f) {
		fresh.Close()
		obj.Close()
		return nil, nil, "", errPrivate
	}
	switch {
	case err == nil && fresh != nil:
		rq.c.markValidated(fresh)
		obj.Close()
		return fresh, f, "", nil
	case err == nil:
		rq.c.markValidated(obj)
		return obj, nil, "fwd=stale; fwd-status=304", nil
	}
	var pass *upstreamResponse
	if errors.As(err, &pass) && (pass.status == http.StatusNotFound || pass.status == http.StatusGone) {
		// Gone upstream: so is our copy.
		obj.Invalidate()
		obj.Close()
		return nil, nil, "", err
	}
	if now := rq.c.now(); rq.r.Context().Err() == nil && now.Sub(expired) <= rq.h.staleOK {
		// RFC 9111 section 4.2.4 and RFC 5861 stale-if-error; a negative
		// ttl in Cache-Status marks a stale answer (RFC 9211 section 2.5).
		ttl := int64(expired.Sub(now).Seconds()) - 1
		return obj, nil, "hit; ttl=" + strconv.FormatInt(ttl, 10) + "; detail=stale-upstream-error", nil
	}
	obj.Close()
	return nil, nil, "", err
}

// respond answers the request from obj, fetching missing blocks. sent
// reports whether the status line went out, after which an error can only
// abort. learned is the fill that fetched obj's metadata when it was not
// stored when the request came, else nil. note replaces "hit" in
// Cache-Status (a revalidated or stale answer).
func (rq *request) respond(obj *rangestore.Object, learned *fill, note string) (sent bool, err error) {
	meta := obj.Meta()
	hdr := rq.w.Header()
	setEntityHeaders(hdr, meta)
	modtime := parseHTTPDate(meta.LastModified)

	// Answers decided by the metadata alone are hits, unless the metadata
	// itself was just fetched.
	hit := rq.h.Name + "; hit"
	if note != "" {
		hit = rq.h.Name + "; " + note
	}
	metaStatus, metaKind := hit, statusHit
	if learned != nil {
		metaStatus, metaKind = learned.cacheStatus(rq.h.Name+"; fwd=miss"), statusMiss
	}
	if code := checkPreconditions(rq.r, meta.ETag, modtime); code != 0 {
		rq.t.answer(metaKind)
		hdr.Set("Cache-Status", metaStatus)
		writeConditional(rq.w, code)
		return true, nil
	}
	ranges, whole, err := requestedRanges(rq.r, meta.ETag, modtime, meta.Length)
	if err != nil {
		rq.t.answer(metaKind)
		hdr.Set("Cache-Status", metaStatus)
		writeUnsatisfiable(rq.w, err, meta.Length)
		return true, nil
	}
	status, kind, disk, present := rq.bytesOnDisk(obj, ranges, learned, hit)
	hdr.Set("Cache-Status", status)
	rq.t.answer(kind)
	if len(ranges) > 1 {
		return rq.respondMultipart(obj, ranges, present, modtime)
	}

	rg := ranges[0]
	// Wait for the first wanted byte before the status line, so an
	// upstream that is down or refuses still gets an honest status.
	if !present && rg.length > 0 && rq.r.Method != http.MethodHead {
		if f := rq.claim(obj, obj.BlockOf(rg.start), obj.BlockOf(rg.start+rg.length-1)); f != nil {
			// A store that will not take the blocks is no reason to fail:
			// stream then goes on uncached.
			if _, err := f.await(rq.r.Context(), rg.start, nil); err != nil && !storeRefused(err) {
				return false, err
			}
			if learned == nil {
				hdr.Set("Cache-Status", f.cacheStatus(status))
			}
		}
	}
	hdr.Set("Accept-Ranges", "bytes")
	hdr.Set("Content-Length", strconv.FormatInt(rg.length, 10))
	code := http.StatusOK
	if !whole {
		code = http.StatusPartialContent
		hdr.Set("Content-Range", rg.contentRange(meta.Length))
	}
	// The bytes' source is taken before the status line, so that a drive
	// failing under the object still gets a clean pass-through.
	body := rq.r.Method != http.MethodHead && rg.length > 0
	var small *[smallSpan]byte
	var file *os.File
	switch {
	case body && present && rg.length <= smallSpan:
		// Small hits read through the object's shared descriptor.
		if small, err = readSmall(obj, rg.start, rg.length); err != nil {
			return false, err
		}
		defer spanBuffers.Put(small)
	case body:
		if file, err = obj.Open(); err != nil {
			return false, err
		}
		defer file.Close()
	}
	rq.w.WriteHeader(code)
	switch {
	case !body:
		return true, nil
	case small != nil:
		_, err := rq.w.Write(small[:rg.length])
		if err == nil {
			rq.t.sentHit(rg.length)
		}
		return true, err
	case present:
		err := newSender(rq.w, rq.r).send(file, rg.start, rg.length)
		if err == nil {
			rq.t.sentHit(rg.length)
		}
		return true, err
	}
	return true, rq.stream(obj, file, rg, disk)
}

// requestedRanges returns the ranges of an object of size bytes that r
// asks for, the whole object (whole set) when it asks for none or for more
// bytes than there are, or the Range header's error.
func requestedRanges(r *http.Request, etag string, modtime time.Time, size int64) (ranges []httpRange, whole bool, err error) {
	rangeHeader := r.Header.Get("Range")
	if rangeHeader != "" && !ifRangeMatches(r, etag, modtime) {
		rangeHeader = ""
	}
	ranges, err = parseRange(rangeHeader, size)
	if err != nil {
		return nil, false, err
	}
	if ranges == nil || sumRangesSize(ranges) > size {
		// As net/http: a request for more bytes than the object is
		// answered with the whole object.
		return []httpRange{{0, size}}, true, nil
	}
	return ranges, false, nil
}

// writeUnsatisfiable answers 416 for a Range header that parseRange
// refused.
func writeUnsatisfiable(w http.ResponseWriter, err error, size int64) {
	hdr := w.Header()
	if err == errNoOverlap {
		hdr.Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
	}
	hdr.Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
	io.WriteString(w, err.Error()+"\n")
}

// bytesOnDisk classifies an answer by which blocks of ranges were on disk
// when the request came (none for a just-learned object): its Cache-Status
// and status kind, the blocks it had (for one range), and whether every
// block was present.
func (rq *request) bytesOnDisk(obj *rangestore.Object, ranges []httpRange, learned *fill, hit string) (string, cacheStatus, onDisk, bool) {
	var disk onDisk
	present, some := true, false
	for _, rg := range ranges {
		if rg.length == 0 {
			continue
		}
		for b := obj.BlockOf(rg.start); b <= obj.BlockOf(rg.start+rg.length-1); b++ {
			has := learned == nil && obj.HasBlock(b)
			present = present && has
			some = some || has
			if len(ranges) == 1 {
				if disk.had == nil {
					disk.first = b
				}
				disk.had = append(disk.had, has)
			}
		}
	}
	status, kind := hit, statusHit
	switch {
	case present:
	case some:
		status, kind = rq.h.Name+"; fwd=partial", statusPartial
	default:
		status, kind = rq.h.Name+"; fwd=miss", statusMiss
	}
	if learned != nil {
		status = learned.cacheStatus(status)
	}
	return status, kind, disk, present
}

// respondMultipart answers a request for several ranges. Multipart answers
// are rare (no update client sends them): fetch every missing block, then
// let net/http compose the parts (not through sendfile).
func (rq *request) respondMultipart(obj *rangestore.Object, ranges []httpRange, present bool, modtime time.Time) (sent bool, err error) {
	for _, rg := range ranges {
		if err := rq.fetch(obj, rg); err != nil {
			return false, err
		}
	}
	if present {
		rq.t.sentHit(sumRangesSize(ranges))
	} else {
		rq.t.sentMiss(sumRangesSize(ranges))
	}
	file, err := obj.Open()
	if err != nil {
		return true, err
	}
	defer file.Close()
	// ServeContent parses Range again: give it the ranges as parsed here,
	// so what it answers is what was counted and fetched.
	spec := make([]string, len(ranges))
	for i, rg := range ranges {
		spec[i] = strconv.FormatInt(rg.start, 10) + "-" + strconv.FormatInt(rg.start+rg.length-1, 10)
	}
	rq.r.Header.Set("Range", "bytes="+strings.Join(spec, ","))
	http.ServeContent(rq.w, rq.r, "", modtime, file)
	return true, nil
}

// stream sends the bytes of rg, from present blocks and from fills as they
// land on disk, fetching ahead of the client.
func (rq *request) stream(obj *rangestore.Object, file *os.File, rg httpRange, disk onDisk) error {
	out := newSender(rq.w, rq.r)
	// Bytes already sent must reach the client before waiting for more.
	flush := func() { http.NewResponseController(rq.w).Flush() }
	pos, end := rg.start, rg.start+rg.length
	last := obj.BlockOf(end - 1)
	for pos < end {
		if err := rq.r.Context().Err(); err != nil {
			// The client is gone (the server saw its connection close):
			// no further fill starts for it.
			return err
		}
		b := obj.BlockOf(pos)
		f := rq.claim(obj, b, last)
		if f == nil {
			// Present: send the run of present blocks in one go.
			e := b
			for e < last && obj.HasBlock(e+1) {
				e++
			}
			blk := obj.Block(e)
			n := min(end, blk.Off+blk.Len) - pos
			if err := out.send(file, pos, n); err != nil {
				return err
			}
			rq.t.sent(obj, pos, n, disk)
			pos += n
			continue
		}
		blk := obj.Block(b)
		segEnd := min(end, blk.Off+blk.Len)
		for pos < segEnd {
			avail, err := f.await(rq.r.Context(), pos, flush)
			if storeRefused(err) {
				return rq.streamUncached(obj, pos, end, err)
			}
			if err != nil {
				return err
			}
			// Keeping pace with a fill would mean one small send per
			// upstream read (32 KiB in reverse_proxy), copied through
			// user space: let up to coalesceBytes gather first, for at
			// most coalesceWait, so that a paused upstream holds bytes
			// back no longer than that.
			if avail-pos < coalesceBytes && avail < segEnd {
				avail = f.gather(min(pos+coalesceBytes, segEnd), coalesceWait)
			}
			n := min(avail, segEnd) - pos
			if err := out.send(file, pos, n); err != nil {
				return err
			}
			rq.t.sentMiss(n)
			pos += n
		}
	}
	return nil
}

// A client right behind a fill waits up to coalesceWait for coalesceBytes
// to send at once.
const (
	coalesceBytes = 256 << 10
	coalesceWait  = time.Millisecond
)

// fetch makes every block of rg present, waiting for the fills.
func (rq *request) fetch(obj *rangestore.Object, rg httpRange) error {
	if rg.length == 0 {
		return nil
	}
	last := obj.BlockOf(rg.start + rg.length - 1)
	for b := obj.BlockOf(rg.start); b <= last; {
		f := rq.claim(obj, b, last)
		if f == nil {
			b++
			continue
		}
		blk := obj.Block(b)
		if _, err := f.await(rq.r.Context(), blk.Off+blk.Len-1, nil); err != nil {
			return err
		}
	}
	return nil
}

// claim returns the fill that owns block b of obj, or nil when b is
// present, first starting a fill for the missing blocks from b on, up to
// the request's read-ahead and not past block last, that no fill owns yet.
// Called as the client reaches each block, it keeps the next fill under
// way while the client still reads the current one.
func (rq *request) claim(obj *rangestore.Object, b, last int) *fill {
	rq.reached(b)
	f := rq.c.claims.claim(obj, b, min(last, rq.frontier), rq.ahead, func(first, last int) *fill {
		return rq.startFill(obj, first, last, nil)
	})
	if f != nil && f.by != rq.r {
		rq.c.stats.collapsed.Add(1)
	}
	return f
}

// setEntityHeaders sets the stored object's validators and replayed headers.
func setEntityHeaders(hdr http.Header, m rangestore.Meta) {
	for _, k := range replayHeaders {
		if v, ok := m.Header[k]; ok {
			hdr[k] = v
		}
	}
	if m.ETag != "" {
		hdr.Set("Etag", m.ETag)
	}
	if m.LastModified != "" {
		hdr.Set("Last-Modified", m.LastModified)
	}
	if m.ContentType != "" {
		hdr.Set("Content-Type", m.ContentType)
	} else {
		// Present but empty: no sniffed type, neither from ServeContent
		// nor from net/http, where the origin gave none.
		hdr["Content-Type"] = nil
	}
}

// upstreamError answers a request that failed before anything was sent.
// Upstream failures are 502 or 504, never 4xx: Delivery Optimization agents
// take a 4xx as "origin not served here" and stop asking for 15 minutes.
func (rq *request) upstreamError(err error) error {
	if rq.r.Context().Err() != nil {
		return err // the client left; nobody reads the answer
	}
	var pass *upstreamResponse
	if errors.As(err, &pass) {
		rq.t.answer(statusMiss)
		hdr := rq.w.Header()
		for k := range hdr {
			delete(hdr, k)
		}
		for k, v := range pass.header {
			hdr[k] = v
		}
		ours := rq.h.Name + "; fwd=miss; fwd-status=" + strconv.Itoa(pass.status)
		if up := pass.header.Values("Cache-Status"); len(up) > 0 {
			ours = strings.Join(up, ", ") + ", " + ours
		}
		hdr.Set("Cache-Status", ours)
		hdr.Set("Content-Length", strconv.Itoa(len(pass.body)))
		rq.w.WriteHeader(pass.status)
		if rq.r.Method != http.MethodHead {
			rq.w.Write(pass.body)
		}
		return nil
	}
	rq.t.answer(statusError)
	rq.w.Header().Set("Cache-Status", rq.h.Name+"; fwd=miss; detail=upstream-error")
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode >= 500 {
		return err
	}
	if errors.Is(err, errFillIdle) || errors.Is(err, context.DeadlineExceeded) {
		return caddyhttp.Error(http.StatusGatewayTimeout, err)
	}
	return caddyhttp.Error(http.StatusBadGateway, err)
}
