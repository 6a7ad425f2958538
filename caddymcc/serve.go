package caddymcc

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// serve answers an allowed request from the store, filling what is missing.
func (h *Handler) serve(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, req request, c *cache, store *rangestore.Store, t *tally) error {
	for attempt := 0; ; attempt++ {
		obj, err := store.Get(req.key)
		var learned *fill
		note := ""
		if errors.Is(err, rangestore.ErrNotFound) {
			obj, learned, err = h.learn(r, next, req, c, store)
		} else if err == nil {
			if expires, ok := h.expiry(c, obj, req.uri); ok && !freshnessNow().Before(expires) {
				obj, learned, note, err = h.revalidate(r, next, req, c, store, obj, expires)
			}
		}
		if err != nil {
			return h.upstreamError(w, r, t, err)
		}
		sent, err := h.respond(w, r, next, req, c, obj, learned, note, t)
		obj.Close()
		switch {
		case err == nil:
			return nil
		case !sent && attempt == 0 && errors.Is(err, errIdentityChanged):
			// The object changed upstream before anything was sent:
			// start over on the new version.
			continue
		case !sent:
			return h.upstreamError(w, r, t, err)
		}
		// Headers and perhaps bytes are out: the only honest end is to cut
		// the connection, so the client sees a failed transfer rather than
		// a short or mixed body. (The error may also be the client's own
		// connection failing.)
		if r.Context().Err() == nil {
			t.answer(statusError)
			h.logger.Warn("cutting the response short", zap.String("key", req.key), zap.Error(err))
		}
		panic(http.ErrAbortHandler)
	}
}

// learn fetches the first wanted block of an object that is not stored
// yet, to learn its length and validators, and returns the stored object.
// Clients arriving meanwhile join the same fetch.
func (h *Handler) learn(r *http.Request, next caddyhttp.Handler, req request, c *cache, store *rangestore.Store) (*rangestore.Object, *fill, error) {
	start, end := wantedSpan(r.Header.Get("Range"))
	first := int(start / c.blockSize)
	last := first + h.raBlocks - 1
	if end >= 0 {
		last = min(last, int(end/c.blockSize))
	}
	if r.Method == http.MethodHead {
		last = first
	}
	c.mu.Lock()
	f := c.learning[req.key]
	if f == nil {
		f = c.startFill(h, r, next, req, nil, first, last, nil)
		c.learning[req.key] = f
	}
	f.join()
	c.mu.Unlock()
	obj, err := f.headers(r.Context())
	if err == nil && obj == nil {
		// The fill is over and stored the object: read the stored version.
		obj, err = store.Get(req.key)
	}
	return obj, f, err
}

// revalidate checks a stale obj upstream with a conditional request,
// collapsed across clients, before it is served. It returns the object to
// serve: obj when the upstream says 304 (note then says so for
// Cache-Status), a new version with the fill that fetched it, or obj as a
// stale hit when the upstream fails within StaleIfError of expiry. It
// closes obj when it returns another object or an error.
func (h *Handler) revalidate(r *http.Request, next caddyhttp.Handler, req request, c *cache, store *rangestore.Store, obj *rangestore.Object, expired time.Time) (*rangestore.Object, *fill, string, error) {
	cond := make(http.Header)
	m := obj.Meta()
	if m.ETag != "" {
		cond.Set("If-None-Match", m.ETag)
	}
	if m.LastModified != "" {
		cond.Set("If-Modified-Since", m.LastModified)
	}
	c.mu.Lock()
	f := c.revalidating[req.key]
	if f == nil {
		f = c.startFill(h, r, next, req, nil, 0, 0, cond)
		c.revalidating[req.key] = f
	} else {
		c.stats.collapsed.Add(1)
	}
	f.join()
	c.mu.Unlock()
	fresh, err := f.headers(r.Context())
	if err == nil && fresh == nil && !f.wasNotModified() {
		// The fill stored a version and ended: read it.
		fresh, err = store.Get(req.key)
	}
	switch {
	case err == nil && fresh != nil:
		c.markValidated(fresh)
		obj.Close()
		return fresh, f, "", nil
	case err == nil:
		c.markValidated(obj)
		return obj, nil, "fwd=stale; fwd-status=304", nil
	}
	var pass *upstreamResponse
	if errors.As(err, &pass) && (pass.status == http.StatusNotFound || pass.status == http.StatusGone) {
		// Gone upstream: so is our copy.
		c.invalidate(req.key, obj)
		obj.Close()
		return nil, nil, "", err
	}
	if r.Context().Err() == nil && freshnessNow().Sub(expired) <= h.staleOK {
		// RFC 9111 section 4.2.4 and RFC 5861 stale-if-error; a negative
		// ttl in Cache-Status marks a stale answer (RFC 9211 section 2.5).
		ttl := int64(expired.Sub(freshnessNow()).Seconds()) - 1
		return obj, nil, "hit; ttl=" + strconv.FormatInt(ttl, 10) + "; detail=stale-upstream-error", nil
	}
	obj.Close()
	return nil, nil, "", err
}

// wantedSpan returns the first and last byte of a Range header's first
// range as far as they are known without the object's length: start 0 for
// a suffix range or none, end -1 when open.
func wantedSpan(s string) (start, end int64) {
	spec, ok := strings.CutPrefix(s, "bytes=")
	if !ok {
		return 0, -1
	}
	first, _, _ := strings.Cut(spec, ",")
	a, b, ok := strings.Cut(strings.TrimSpace(first), "-")
	start, err := strconv.ParseInt(strings.TrimSpace(a), 10, 64)
	if !ok || err != nil || start < 0 {
		return 0, -1
	}
	end, err = strconv.ParseInt(strings.TrimSpace(b), 10, 64)
	if err != nil || end < start {
		return start, -1
	}
	return start, end
}

// respond answers r from obj, fetching missing blocks. sent reports whether
// the status line went out, after which an error can only abort. learned is
// the fill that fetched obj's metadata when it was not stored when the
// request came, else nil. note replaces "hit" in Cache-Status (a
// revalidated or stale answer).
func (h *Handler) respond(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, req request, c *cache, obj *rangestore.Object, learned *fill, note string, t *tally) (sent bool, err error) {
	meta := obj.Meta()
	size := meta.Length
	hdr := w.Header()
	setEntityHeaders(hdr, meta)
	modtime := parseHTTPDate(meta.LastModified)

	// Answers decided by the metadata alone are hits, unless the metadata
	// itself was just fetched.
	hit := h.Name + "; hit"
	if note != "" {
		hit = h.Name + "; " + note
	}
	metaStatus, metaKind := hit, statusHit
	if learned != nil {
		metaStatus, metaKind = learned.cacheStatus(h.Name+"; fwd=miss"), statusMiss
	}
	if code := checkPreconditions(r, meta.ETag, modtime); code != 0 {
		t.answer(metaKind)
		hdr.Set("Cache-Status", metaStatus)
		writeConditional(w, code)
		return true, nil
	}
	rangeHeader := r.Header.Get("Range")
	if rangeHeader != "" && !ifRangeMatches(r, meta.ETag, modtime) {
		rangeHeader = ""
	}
	ranges, err := parseRange(rangeHeader, size)
	if err != nil {
		t.answer(metaKind)
		hdr.Set("Cache-Status", metaStatus)
		if err == errNoOverlap {
			hdr.Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
		}
		hdr.Del("Content-Type")
		hdr.Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
		io.WriteString(w, err.Error()+"\n")
		return true, nil
	}
	if sumRangesSize(ranges) > size {
		// As net/http: a request for more bytes than the object is
		// answered with the whole object.
		ranges = nil
	}
	whole := ranges == nil
	if whole {
		ranges = []httpRange{{0, size}}
	}

	// Which blocks were on disk when the request came (none for a
	// just-learned object) decides hit and miss bytes.
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
		status, kind = h.Name+"; fwd=partial", statusPartial
	default:
		status, kind = h.Name+"; fwd=miss", statusMiss
	}
	if learned != nil {
		status = learned.cacheStatus(status)
	}
	hdr.Set("Cache-Status", status)
	t.answer(kind)

	if len(ranges) > 1 {
		// Multipart answers are rare (no update client sends them): fetch
		// every missing block, then let net/http compose the parts (not
		// through sendfile).
		for _, rg := range ranges {
			if err := h.fetch(r, next, req, c, obj, rg); err != nil {
				return false, err
			}
		}
		if present {
			t.sentHit(sumRangesSize(ranges))
		} else {
			t.sentMiss(sumRangesSize(ranges))
		}
		return true, serveFile(w, r, obj, modtime)
	}

	rg := ranges[0]
	// Wait for the first wanted byte before the status line, so an
	// upstream that is down or refuses still gets an honest status.
	if !present && rg.length > 0 && r.Method != http.MethodHead {
		if f := c.claim(h, r, next, req, obj, obj.BlockOf(rg.start), obj.BlockOf(rg.start+rg.length-1)); f != nil {
			if _, err := f.await(r.Context(), rg.start, nil); err != nil {
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
		hdr.Set("Content-Range", rg.contentRange(size))
	}
	w.WriteHeader(code)
	if r.Method == http.MethodHead || rg.length == 0 {
		return true, nil
	}
	if present && rg.length <= smallSpan {
		// Small hits read through the object's shared descriptor.
		err := newSender(w, r).sendSmall(obj, rg.start, rg.length)
		if err == nil {
			t.sentHit(rg.length)
		}
		return true, err
	}
	file, err := obj.Open()
	if err != nil {
		return true, err
	}
	defer file.Close()
	if present {
		err := newSender(w, r).send(file, rg.start, rg.length)
		if err == nil {
			t.sentHit(rg.length)
		}
		return true, err
	}
	return true, h.stream(w, r, next, req, c, obj, file, rg, disk, t)
}

// stream sends the bytes of rg, from present blocks and from fills as they
// land on disk, fetching ahead of the client.
func (h *Handler) stream(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, req request, c *cache, obj *rangestore.Object, file *os.File, rg httpRange, disk onDisk, t *tally) error {
	out := newSender(w, r)
	// Bytes already sent must reach the client before waiting for more.
	flush := func() { http.NewResponseController(w).Flush() }
	pos, end := rg.start, rg.start+rg.length
	last := obj.BlockOf(end - 1)
	for pos < end {
		b := obj.BlockOf(pos)
		f := c.claim(h, r, next, req, obj, b, last)
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
			t.sent(obj, pos, n, disk)
			pos += n
			continue
		}
		blk := obj.Block(b)
		segEnd := min(end, blk.Off+blk.Len)
		for pos < segEnd {
			avail, err := f.await(r.Context(), pos, flush)
			if err != nil {
				return err
			}
			// Keeping pace with a fill would mean one small send per
			// upstream read (32 KiB in reverse_proxy): give the fill a
			// few chances to run first. This never waits for the
			// upstream, so a paused upstream cannot hold bytes back.
			for i := 0; i < coalesceYields && avail-pos < coalesceBytes && avail < segEnd; i++ {
				runtime.Gosched()
				avail = f.progress()
			}
			n := min(avail, segEnd) - pos
			if err := out.send(file, pos, n); err != nil {
				return err
			}
			t.sentMiss(n)
			pos += n
		}
	}
	return nil
}

// A client right behind a fill yields up to coalesceYields times while less
// than coalesceBytes are new.
const (
	coalesceBytes  = 256 << 10
	coalesceYields = 4
)

// fetch makes every block of rg present, waiting for the fills.
func (h *Handler) fetch(r *http.Request, next caddyhttp.Handler, req request, c *cache, obj *rangestore.Object, rg httpRange) error {
	if rg.length == 0 {
		return nil
	}
	last := obj.BlockOf(rg.start + rg.length - 1)
	for b := obj.BlockOf(rg.start); b <= last; {
		f := c.claim(h, r, next, req, obj, b, last)
		if f == nil {
			b++
			continue
		}
		blk := obj.Block(b)
		if _, err := f.await(r.Context(), blk.Off+blk.Len-1, nil); err != nil {
			return err
		}
	}
	return nil
}

// claim returns the fill that owns block b of obj, or nil when b is
// present. It first makes sure the blocks from b on, up to ReadAhead and
// not past block last, are present or being fetched, starting one fill for
// the first run of missing, unclaimed blocks.
func (c *cache) claim(h *Handler, r *http.Request, next caddyhttp.Handler, req request, obj *rangestore.Object, b, last int) *fill {
	id := obj.ID()
	free := func(k int) bool { return c.fills[blockKey{id, k}] == nil && !obj.HasBlock(k) }
	c.mu.Lock()
	defer c.mu.Unlock()
	windowEnd := min(b+h.raBlocks-1, last)
	for s := b; s <= windowEnd; s++ {
		if !free(s) {
			continue
		}
		e := s
		for e < min(s+h.raBlocks-1, last) && free(e+1) {
			e++
		}
		f := c.startFill(h, r, next, req, obj, s, e, nil)
		for k := s; k <= e; k++ {
			c.fills[blockKey{id, k}] = f
		}
		break
	}
	f := c.fills[blockKey{id, b}]
	if f != nil && f.by != r {
		c.stats.collapsed.Add(1)
	}
	return f
}

// serveFile answers a multipart range request whose ranges are all present,
// with net/http's ServeContent over the data file.
func serveFile(w http.ResponseWriter, r *http.Request, obj *rangestore.Object, modtime time.Time) error {
	file, err := obj.Open()
	if err != nil {
		return err
	}
	defer file.Close()
	http.ServeContent(w, r, "", modtime, file)
	return nil
}

// setEntityHeaders sets the stored object's validators and replayed headers.
func setEntityHeaders(hdr http.Header, m rangestore.Meta) {
	for k, v := range m.Header {
		if !strings.HasPrefix(k, "Mcc-") {
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
func (h *Handler) upstreamError(w http.ResponseWriter, r *http.Request, t *tally, err error) error {
	if r.Context().Err() != nil {
		return err // the client left; nobody reads the answer
	}
	var pass *upstreamResponse
	if errors.As(err, &pass) {
		t.answer(statusMiss)
		hdr := w.Header()
		for k := range hdr {
			delete(hdr, k)
		}
		for k, v := range pass.header {
			hdr[k] = v
		}
		ours := h.Name + "; fwd=miss; fwd-status=" + strconv.Itoa(pass.status)
		if up := pass.header.Values("Cache-Status"); len(up) > 0 {
			ours = strings.Join(up, ", ") + ", " + ours
		}
		hdr.Set("Cache-Status", ours)
		hdr.Set("Content-Length", strconv.Itoa(len(pass.body)))
		w.WriteHeader(pass.status)
		if r.Method != http.MethodHead {
			w.Write(pass.body)
		}
		return nil
	}
	t.answer(statusError)
	w.Header().Set("Cache-Status", h.Name+"; fwd=miss; detail=upstream-error")
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode >= 500 {
		return err
	}
	if errors.Is(err, errFillIdle) || errors.Is(err, context.DeadlineExceeded) {
		return caddyhttp.Error(http.StatusGatewayTimeout, err)
	}
	return caddyhttp.Error(http.StatusBadGateway, err)
}
