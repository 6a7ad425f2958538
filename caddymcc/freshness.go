package caddymcc

import (
	"math"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// Freshness (RFC 9111 section 4.2) for package repositories, whose index
// files change while package files and update images never do.
//
// An object is fresh for the lifetime its origin gave it (s-maxage,
// max-age, or Expires - Date; no-cache means zero; no-store and private
// responses are never kept, see fillWriter.pin),
// counted from when it was last fetched or validated, less the Age it
// arrived with. Without any of those, apt's index files (InRelease,
// Packages*, ...) are fresh for IndexTTL and everything else never goes
// stale: update images and .deb files are immutable, and a changed object is
// still caught by its pinned identity when a missing block is fetched.
//
// A stale object is revalidated with a conditional request through the next
// handler before it is served (collapsed across clients): a 304 makes it
// fresh again, a new version replaces it, and when the upstream fails the
// stale copy is served for up to StaleIfError past its expiry.

// now is the clock of freshness decisions.
func (c *cache) now() time.Time { return time.Now().Add(time.Duration(c.skew.Load())) }

// Bookkeeping kept with an object (rangestore.Meta.Internal), never sent to
// clients.
const (
	metaStored = "Stored" // unix seconds the object's first block arrived
	metaAge    = "Age"    // the Age header it arrived with, seconds
	metaDate   = "Date"   // the upstream's Date header
	metaOrigin = "Origin" // the origin host whose answer created the version
)

// stampMeta records when a response arrived, for freshness.
func stampMeta(m *rangestore.Meta, h http.Header, now time.Time) {
	m.Internal = map[string]string{metaStored: strconv.FormatInt(now.Unix(), 10)}
	if a := h.Get("Age"); a != "" {
		m.Internal[metaAge] = a
	}
	if d := h.Get("Date"); d != "" {
		m.Internal[metaDate] = d
	}
}

// metaValue returns the bookkeeping value k of m. Stores written before
// rangestore.Meta had Internal kept it among the headers as "Mcc-" + k.
func metaValue(m rangestore.Meta, k string) (string, bool) {
	if v, ok := m.Internal[k]; ok {
		return v, true
	}
	if v := m.Header["Mcc-"+k]; len(v) > 0 {
		return v[0], true
	}
	return "", false
}

func metaInt(m rangestore.Meta, k string) int64 {
	v, _ := metaValue(m, k)
	n, _ := strconv.ParseInt(v, 10, 64)
	return n
}

// freshnessLifetime returns how long after validation m stays fresh
// (RFC 9111 section 4.2.1), less the Age it arrived with: negative when it
// was already stale on arrival. expires is false for objects that never go
// stale.
func (h *Handler) freshnessLifetime(m rangestore.Meta, uri string) (ttl time.Duration, expires bool) {
	cc := strings.ToLower(strings.Join(m.Header["Cache-Control"], ","))
	var maxAge, sMaxAge = int64(-1), int64(-1)
	for _, d := range strings.Split(cc, ",") {
		name, val, _ := strings.Cut(strings.TrimSpace(d), "=")
		switch name {
		case "no-cache", "no-store", "private":
			return 0, true
		case "max-age":
			maxAge = directiveSeconds(val)
		case "s-maxage":
			sMaxAge = directiveSeconds(val)
		}
	}
	// Age is a delta-seconds (RFC 9111 section 5.1): an invalid or absent
	// one counts as 0.
	ageValue, _ := metaValue(m, metaAge)
	ageSeconds, _ := parseDeltaSeconds(ageValue)
	age := time.Duration(ageSeconds) * time.Second
	switch {
	case sMaxAge >= 0:
		return time.Duration(sMaxAge)*time.Second - age, true
	case maxAge >= 0:
		return time.Duration(maxAge)*time.Second - age, true
	}
	if exp := m.Header["Expires"]; len(exp) > 0 {
		e, err := http.ParseTime(exp[0])
		if err != nil {
			return 0, true // an invalid Expires means already expired
		}
		date := time.Unix(metaInt(m, metaStored), 0)
		if d, ok := metaValue(m, metaDate); ok {
			if t, err := http.ParseTime(d); err == nil {
				date = t
			}
		}
		// Within ±2^31 s, so that subtracting the Age cannot overflow.
		lifetime := min(max(e.Sub(date), -maxDelta*time.Second), maxDelta*time.Second)
		return lifetime - age, true
	}
	p, _, _ := strings.Cut(uri, "?")
	switch {
	case aptImmutable(p):
		return 0, false
	case aptIndex(p):
		return h.indexTTL, true
	}
	return 0, false
}

// maxDelta is the greatest delta-seconds value this cache represents:
// larger values count as 2^31 seconds (RFC 9111 section 1.2.2), so a huge
// max-age cannot overflow a time.Duration into "always stale".
const maxDelta = 1 << 31

// parseDeltaSeconds parses a delta-seconds value (1*DIGIT, RFC 9111 section
// 1.2.2), capped at maxDelta; ok is false for anything else, a sign
// included.
func parseDeltaSeconds(s string) (n int64, ok bool) {
	if s == "" {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		if n < maxDelta {
			n = n*10 + int64(c-'0')
		}
	}
	return min(n, maxDelta), true
}

// directiveSeconds is the value of a max-age or s-maxage directive; an
// invalid one (a sign, a fraction, none at all) counts as 0, stale, as RFC
// 9111 section 4.2.1 encourages.
func directiveSeconds(val string) int64 {
	v := val
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		v = v[1 : len(v)-1] // the quoted-string form (RFC 9111 section 5.2)
	}
	n, _ := parseDeltaSeconds(v) // 0 when invalid
	return n
}

// aptIndex reports whether p is a repository index that changes in place.
func aptIndex(p string) bool {
	base := path.Base(p)
	switch {
	case base == "InRelease" || base == "Release" || base == "Release.gpg":
		return true
	case strings.HasSuffix(p, ".diff/Index"):
		return true
	}
	for _, prefix := range []string{"Packages", "Sources", "Contents", "Translation"} {
		if strings.HasPrefix(base, prefix) {
			return true
		}
	}
	return false
}

// aptImmutable reports whether p names content that never changes in
// place: by-hash paths and package files.
func aptImmutable(p string) bool {
	if strings.Contains(p, "/by-hash/") {
		return true
	}
	base := path.Base(p)
	for _, ext := range []string{".deb", ".udeb", ".dsc"} {
		if strings.HasSuffix(base, ext) {
			return true
		}
	}
	return strings.Contains(base, ".tar.")
}

// uncacheable reports whether a response may not be kept for later
// requests: Cache-Control no-store, or private (this is a shared cache).
func uncacheable(m rangestore.Meta) bool {
	return hasDirective(m, "no-store", "private")
}

// hasDirective reports whether the stored response's Cache-Control has
// one of the directives names (lower case).
func hasDirective(m rangestore.Meta, names ...string) bool {
	for _, v := range m.Header["Cache-Control"] {
		for _, d := range strings.Split(strings.ToLower(v), ",") {
			name, _, _ := strings.Cut(strings.TrimSpace(d), "=")
			if slices.Contains(names, name) {
				return true
			}
		}
	}
	return false
}

// validations records when each object version was last confirmed
// current upstream. It keeps at most one version per cache key (the last
// validated) and, once it has grown to pruneValidations entries and to
// twice its size after the last pruning, drops the keys no longer stored:
// without that, every version ever revalidated would stay in it.
type validations struct {
	mu   sync.Mutex
	m    map[uint64]time.Time // by object version (rangestore.Object.ID)
	ids  map[string]uint64    // cache key -> its version in m
	next int                  // prune when m has this many entries
}

// pruneValidations is the least size at which validations is pruned.
const pruneValidations = 4096

// expiry returns when obj goes stale, and false when it never does.
func (rq *request) expiry(obj *rangestore.Object) (time.Time, bool) {
	m := obj.Meta()
	ttl, expires := rq.h.freshnessLifetime(m, rq.uri)
	if !expires {
		return time.Time{}, false
	}
	v := &rq.c.validated
	v.mu.Lock()
	validated, ok := v.m[obj.ID()]
	v.mu.Unlock()
	if !ok {
		validated = time.Unix(metaInt(m, metaStored), 0)
	}
	return validated.Add(ttl), true
}

// markValidated records that obj was confirmed current upstream now.
func (c *cache) markValidated(obj *rangestore.Object) {
	key, id := obj.Key(), obj.ID()
	if key == "" {
		return // transient (no-store): never looked up again
	}
	v := &c.validated
	v.mu.Lock()
	if v.ids == nil {
		v.ids = make(map[string]uint64)
	}
	if old, ok := v.ids[key]; ok && old != id {
		delete(v.m, old) // superseded by this version
	}
	v.ids[key] = id
	v.m[id] = c.now()
	prune := len(v.m) >= max(v.next, pruneValidations)
	if prune {
		v.next = math.MaxInt // one pruning at a time
	}
	v.mu.Unlock()
	if prune {
		v.prune(c.store)
	}
}

// prune drops the validations of keys no longer stored. Listing the store
// happens outside the lock, so requests are not held up by it; a key
// stored meanwhile may lose its entry, which only makes its object stale
// earlier (counted from when it was stored), never fresh longer.
func (v *validations) prune(s *rangestore.Store) {
	stored := make(map[string]struct{})
	for _, o := range s.List() {
		stored[o.Key] = struct{}{}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for key, id := range v.ids {
		if _, ok := stored[key]; !ok {
			delete(v.ids, key)
			delete(v.m, id)
		}
	}
	v.next = 2 * len(v.m)
}
