// Package caddymcc is a Caddy HTTP handler that caches Device Update content
// for devices behind a gateway, the way Microsoft Connected Cache does, on
// an on-disk block store (package rangestore).
package caddymcc

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler serves cached byte ranges of Device Update content (and other
// allowed origins) from disk, and fills what is missing through the next
// handler, which is meant to be `reverse_proxy` to the origin or to a parent
// gateway.
//
// Requests name their origin in the `cacheHostOrigin` query parameter
// (`GET /path?cacheHostOrigin=host`), or, without it, in the Host header
// when that host is an allowed origin. Other origins are refused with 403,
// methods other than GET and HEAD with 405; neither reaches the next
// handler.
//
// Misses are fetched as block-aligned ranges, collapsed across clients,
// streamed to every waiting client as bytes arrive, and checked against the
// object's pinned length, ETag and Last-Modified before they are stored.
// Upstream failures answer 502 or 504, never a 4xx.
//
// Before calling the next handler, the handler sets these placeholders:
//
// Placeholder | Description
// ------------|-------------
// `{http.mcc.origin_host}` | the origin host, lower case
// `{http.mcc.origin_uri}` | path (normalised: dot segments resolved) and query of the request without `cacheHostOrigin`
//
// Every response carries an RFC 9211 `Cache-Status` header.
type Handler struct {
	// Dir is the store directory. Default: the `mcc` folder in Caddy's
	// data directory.
	Dir string `json:"dir,omitempty"`

	// Drives are several cache drives, each with a size cap of its own,
	// instead of Dir and MaxSize. Objects are placed on them by a stable
	// hash of their key weighted by the drives' sizes, so adding a drive
	// moves as little as possible; a drive that fails its health check
	// (gone, unwritable) is out of service and its objects become misses
	// on the others until it passes again.
	Drives []Drive `json:"drives,omitempty"`

	// MaxSize is the most bytes of cached blocks to keep; the least
	// recently used objects are evicted beyond it. Default: 0, no cap
	// other than MinFree.
	MaxSize int64 `json:"max_size,omitempty"`

	// MinFree is the free space to leave on the store's file system.
	// Default: 1GiB.
	MinFree *int64 `json:"min_free,omitempty"`

	// BlockSize is the unit of storage and of upstream range requests: a
	// power of two from 64KiB to 64MiB. It is fixed for a directory once
	// used. Default: 1MiB.
	BlockSize int64 `json:"block_size,omitempty"`

	// Origins are the origin hosts served: exact host names, or
	// `*.suffix` for any host under suffix. A configured list replaces
	// the default, which is the Device Update content hosts
	// (`*.tlu.dl.adu.microsoft.com`, `*.nlu.dl.adu.microsoft.com`,
	// `*.dcsfe.prod.adu.microsoft.com`) and
	// `au.download.windowsupdate.com` (Microsoft's cache smoke test).
	Origins []string `json:"origins,omitempty"`

	// Canonical maps a canonical host to alias hosts (regional mirrors of
	// a package repository) whose objects share the canonical host's cache
	// key, as MCC's CACHEABLE_CUSTOM_<N>_CANONICAL does. Misses are still
	// fetched from the host the request named. The hosts named here are
	// allowed origins in addition to Origins.
	Canonical map[string][]string `json:"canonical,omitempty"`

	// ReadAhead is how far beyond the block a client is reading the cache
	// keeps fetching at most, within the range the client asked for. A
	// client's read-ahead starts at 2MiB (or one block, if larger) and
	// doubles with each upstream request it makes, up to ReadAhead, and
	// the next request starts while the client still reads the current
	// one: a linear download reaches the link's speed in a few round
	// trips, and a client that reads a little and leaves costs the origin
	// little. Requests from another caddy-mcc (a child gateway's fills)
	// get the whole ReadAhead at once. Default: 16MiB.
	ReadAhead int64 `json:"read_ahead,omitempty"`

	// MaxFills is the most fills of this store that talk to upstream at
	// once; further fills wait their turn, first come first served. It
	// is per store directory (the last config loaded sets it). Default: 64.
	MaxFills int `json:"max_fills,omitempty"`

	// MaxObjectSize is the largest object the cache stores. An upstream
	// answer that gives a larger (or malformed) length is refused with 502
	// and a log line, and nothing of it is stored. Default: 64GiB.
	MaxObjectSize int64 `json:"max_object_size,omitempty"`

	// IndexTTL is how long a package repository's index file (InRelease,
	// Release, Packages*, Sources*, Contents*, Translation*, *.diff/Index)
	// is served before it is revalidated, when its origin gives no
	// freshness of its own. Default: 30s.
	IndexTTL caddy.Duration `json:"index_ttl,omitempty"`

	// StaleIfError is how long past its expiry a stale object is still
	// served when revalidating it fails (upstream down): its Cache-Status
	// then says so. Default: 24h.
	StaleIfError caddy.Duration `json:"stale_if_error,omitempty"`

	// FillTimeout abandons a fill whose upstream sends nothing for this
	// long. Default: 30s.
	FillTimeout caddy.Duration `json:"fill_timeout,omitempty"`

	// Name identifies this cache in Cache-Status headers. Default:
	// `caddy-mcc`.
	Name string `json:"name,omitempty"`

	// MaxLevels is the most caches a request may already have passed
	// through (counted in its Via header, where every caddy-mcc adds a
	// node id of its own); beyond it, or when it already passed through
	// this node, it is refused with 508 Loop Detected. Default: 16.
	MaxLevels int `json:"max_levels,omitempty"`

	caches      []*cache  // one per drive; cache is the first
	weights     []float64 // the drives' placement weights
	origins     []originPattern
	aliases     map[string]string // alias host -> canonical host
	raBlocks    int               // ReadAhead in blocks
	startAhead  int               // a client's first read-ahead, in blocks
	fillTimeout time.Duration
	indexTTL    time.Duration
	staleOK     time.Duration
	cache       *cache
	logger      *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mcc",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Default sizes.
const (
	defaultMinFree       = 1 << 30
	defaultReadAhead     = 16 << 20
	defaultMaxObjectSize = 64 << 30
	defaultMaxFills      = 64
	// A client's first read-ahead: what a request that is abandoned right
	// after its status line costs the origin at most.
	startReadAhead = 2 << 20
	// Byte offsets within any object then stay far from overflowing.
	maxObjectSizeLimit = 1 << 50
	defaultFillIdle    = 30 * time.Second
	defaultMaxLevels   = 16
	defaultIndexTTL    = 30 * time.Second
	// Disconnected sites keep serving what they have through a day of
	// upstream outage.
	defaultStaleIfError = 24 * time.Hour
)

// Provision sets defaults and opens (or shares) the store.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := h.checkNegative(); err != nil {
		return err
	}
	// The read-ahead watches each client's acknowledgements.
	registerConn(ctx)
	if h.BlockSize == 0 {
		h.BlockSize = rangestore.DefaultBlockSize
	}
	if h.ReadAhead == 0 {
		h.ReadAhead = defaultReadAhead
	}
	if h.MaxObjectSize == 0 {
		h.MaxObjectSize = defaultMaxObjectSize
	}
	h.raBlocks = int(max(1, h.ReadAhead/h.BlockSize))
	h.startAhead = int(min(int64(h.raBlocks), max(1, startReadAhead/h.BlockSize)))
	if h.MaxFills == 0 {
		h.MaxFills = defaultMaxFills
	}
	h.fillTimeout = time.Duration(h.FillTimeout)
	if h.fillTimeout == 0 {
		h.fillTimeout = defaultFillIdle
	}
	if h.Name == "" {
		h.Name = "caddy-mcc"
	}
	h.indexTTL = time.Duration(h.IndexTTL)
	if h.indexTTL == 0 {
		h.indexTTL = defaultIndexTTL
	}
	h.staleOK = time.Duration(h.StaleIfError)
	if h.staleOK == 0 {
		h.staleOK = defaultStaleIfError
	}
	if h.MaxLevels == 0 {
		h.MaxLevels = defaultMaxLevels
	}
	origins := h.Origins
	if len(origins) == 0 {
		origins = DefaultOrigins
	}
	h.origins = h.origins[:0]
	for _, o := range origins {
		p, err := parseOriginPattern(o)
		if err != nil {
			return err
		}
		h.origins = append(h.origins, p)
	}
	h.aliases = make(map[string]string)
	for canon, aliases := range h.Canonical {
		for _, host := range append([]string{canon}, aliases...) {
			host = strings.ToLower(host)
			if err := checkHostName(host); err != nil {
				return fmt.Errorf("mcc: canonical %q: %v", host, err)
			}
			h.origins = append(h.origins, originPattern{host: host})
			if other, dup := h.aliases[host]; dup && other != strings.ToLower(canon) {
				return fmt.Errorf("mcc: %s is an alias of both %s and %s", host, other, canon)
			}
			h.aliases[host] = strings.ToLower(canon)
		}
	}
	minFree := int64(defaultMinFree)
	if h.MinFree != nil {
		minFree = *h.MinFree
	}
	if err := h.provisionDrives(minFree); err != nil {
		return err
	}
	if err := h.provisionMetrics(ctx); err != nil {
		return err
	}
	return nil
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if err := h.checkNegative(); err != nil {
		return err
	}
	if h.MaxObjectSize > maxObjectSizeLimit {
		return fmt.Errorf("mcc: max_object_size must be at most %d (1PiB)", int64(maxObjectSizeLimit))
	}
	if !validToken(h.Name) {
		return fmt.Errorf("mcc: name %q is not an HTTP token", h.Name)
	}
	return nil
}

// checkNegative refuses negative sizes, counts and durations. Provision
// calls it before it touches a store, which a running config may share:
// Caddy validates only after provisioning, when a refused max_fills would
// already have reached the running store's fill queue.
func (h *Handler) checkNegative() error {
	for _, f := range []struct {
		name     string
		negative bool
	}{
		{"max_size", h.MaxSize < 0},
		{"min_free", h.MinFree != nil && *h.MinFree < 0},
		{"read_ahead", h.ReadAhead < 0},
		{"max_object_size", h.MaxObjectSize < 0},
		{"fill_timeout", h.FillTimeout < 0},
		{"max_levels", h.MaxLevels < 0},
		{"max_fills", h.MaxFills < 0},
		{"index_ttl", h.IndexTTL < 0},
		{"stale_if_error", h.StaleIfError < 0},
	} {
		if f.negative {
			return fmt.Errorf("mcc: %s must not be negative", f.name)
		}
	}
	for _, d := range h.Drives {
		if d.MaxSize < 0 {
			return fmt.Errorf("mcc: drive %s: max_size must not be negative", d.Dir)
		}
	}
	return nil
}

// Cleanup releases this config's use of the store; the store closes when no
// config uses it any more.
func (h *Handler) Cleanup() error {
	var errs []error
	for _, c := range h.caches {
		if _, err := caches.Delete(c.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	rq := &request{h: h, c: h.cache, w: w, r: r, next: next, t: tally{c: h.cache}}
	defer logTally(r, &rq.t)
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return rq.refuse(http.StatusMethodNotAllowed, "method "+r.Method+" is not served by the cache")
	}
	tg, err := classify(r, h.origins)
	if err != nil {
		return rq.refuse(http.StatusForbidden, err.Error())
	}
	if canon, ok := h.aliases[tg.origin]; ok {
		tg.key = canon + tg.uri
	}
	rq.target = tg
	levels, reason := h.checkLoop(r)
	if reason != "" {
		return rq.refuse(http.StatusLoopDetected, reason)
	}
	rq.ahead, rq.frontier = h.startAhead, -1
	if levels > 0 {
		// A child gateway's fill: it reads all it asked for.
		rq.ahead, rq.eager = h.raBlocks, true
	}
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		setPlaceholders(repl, tg)
	}
	// The Linux Delivery Optimization agent resends its whole header list
	// on every resume, so the k-th resume carries k Range lines, oldest
	// first: the last one is meant.
	if v := r.Header.Values("Range"); len(v) > 1 {
		r.Header["Range"] = v[len(v)-1:]
	}
	if c := h.place(tg.key); c != nil {
		rq.c, rq.t.c = c, c
	}
	store, err := rq.c.wait(r.Context())
	if err != nil && r.Context().Err() != nil {
		return err
	}
	if store == nil || rq.c.down.Load() {
		// The store could not be opened (logged at start): still serve,
		// without caching.
		rq.t.answer(statusBypass)
		w.Header().Set("Cache-Status", h.Name+"; fwd=bypass; detail=store-unavailable")
		return next.ServeHTTP(w, r)
	}
	rq.store = store
	defer func() { rq.reading.unlimit() }()
	return rq.serve()
}

// logTally adds the request's cache status and byte sources to its access
// log entry.
func logTally(r *http.Request, t *tally) {
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok && t.answered {
		extra.Add(zap.String("cache_status", t.status.String()))
		extra.Add(zap.Int64("cache_bytes", t.hit))
		extra.Add(zap.Int64("upstream_bytes", t.miss))
	}
}

// checkLoop counts the caches r passed through, and returns why it must be
// refused as a forwarding loop: it already passed through this node, or
// through MaxLevels caches. Each caddy-mcc
// adds "1.1 mcc-<node id>" to the Via header of its fills (RFC 9110
// section 7.6.3 lets a proxy name itself with a pseudonym).
func (h *Handler) checkLoop(r *http.Request) (levels int, reason string) {
	for _, v := range r.Header.Values("Via") {
		for _, hop := range strings.Split(v, ",") {
			fields := strings.Fields(hop)
			if len(fields) < 2 || !strings.HasPrefix(fields[1], "mcc-") {
				continue
			}
			for _, c := range h.caches {
				if fields[1] == c.node {
					return levels, "forwarding loop: this request already passed through this cache (" + c.node + ")"
				}
			}
			levels++
		}
	}
	if levels >= h.MaxLevels {
		return levels, fmt.Sprintf("forwarding loop: the request passed through %d caches (max_levels %d)", levels, h.MaxLevels)
	}
	return levels, ""
}

func setPlaceholders(repl *caddy.Replacer, tg target) {
	repl.Set("http.mcc.origin_host", tg.origin)
	uri := tg.uri
	if !strings.Contains(uri, "?") {
		// An empty query, so that `rewrite {http.mcc.origin_uri}` drops
		// the client's (cacheHostOrigin): without a "?" Caddy's rewrite
		// keeps the original query.
		uri += "?"
	}
	repl.Set("http.mcc.origin_uri", uri)
}

// refuse answers a request the cache does not serve, with a short reason.
func (rq *request) refuse(status int, reason string) error {
	rq.t.answer(statusBypass)
	hdr := rq.w.Header()
	hdr.Set("Content-Type", "text/plain; charset=utf-8")
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("Cache-Status", rq.h.Name+"; fwd=bypass")
	rq.w.WriteHeader(status)
	_, err := fmt.Fprintf(rq.w, "caddy-mcc: %s\n", reason)
	return err
}

// validToken reports whether s is an RFC 9110 token (a Cache-Status cache
// name).
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == ',' || c == ';' || c == '=' || c == '(' || c == ')' || c == '/' || c == ':' || c == '<' || c == '>' || c == '?' || c == '@' || c == '[' || c == ']' || c == '\\' || c == '{' || c == '}' {
			return false
		}
	}
	return true
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
