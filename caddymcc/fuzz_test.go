package caddymcc

import (
	"bufio"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// Fuzz targets for every parser that reads what a client or an upstream
// sends. Seeds are in testdata/fuzz/<Name>/ (crashers found are kept
// there); run one with
//
//	go test -run X -fuzz FuzzParseRange -fuzztime 3m ./caddymcc/

// FuzzParseRange: parseRange never panics, returns only non-empty ranges
// inside the object, and agrees with wantedSpan, which learn uses to pick
// the first block to fetch before the object's length is known.
func FuzzParseRange(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string, size int64) {
		if size < 0 {
			size = -(size + 1)
		}
		ranges, err := parseRange(s, size)
		ws, we := wantedSpan(s)
		if ws < 0 || we < -1 || we >= 0 && we < ws {
			t.Fatalf("wantedSpan(%q) = %d, %d", s, ws, we)
		}
		if err != nil {
			if ranges != nil {
				t.Fatalf("parseRange(%q, %d) = %v with error %v", s, size, ranges, err)
			}
			if err == errNoOverlap && size == 0 {
				t.Fatalf("parseRange(%q, 0): 416 for an empty object", s)
			}
			return
		}
		if size == 0 && ranges != nil {
			t.Fatalf("parseRange(%q, 0) = %v, want the Range ignored", s, ranges)
		}
		for _, r := range ranges {
			if r.start < 0 || r.length <= 0 || r.start > size-r.length {
				t.Fatalf("parseRange(%q, %d) = %v: range outside the object", s, size, ranges)
			}
			if _, e, tot, ok := parseContentRange(r.contentRange(size)); !ok || e != r.start+r.length-1 || tot != size {
				t.Fatalf("parseRange(%q, %d): Content-Range %q does not parse back", s, size, r.contentRange(size))
			}
		}
		// wantedSpan reads the first range spec; when parseRange kept it
		// (it starts inside the object), both agree on where it starts and,
		// when closed, where it ends.
		if len(ranges) > 0 && ws < size && (ws > 0 || we >= 0) {
			r := ranges[0]
			if r.start != ws || we >= 0 && r.start+r.length-1 != min(we, size-1) {
				t.Fatalf("parseRange(%q, %d) = %v but wantedSpan = %d, %d", s, size, ranges, ws, we)
			}
		}
	})
}

// FuzzParseContentRange: parseContentRange never panics, accepts only
// ranges that make sense, and what it accepts formats back to a string it
// parses to the same numbers.
func FuzzParseContentRange(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		start, end, total, ok := parseContentRange(s)
		if !ok {
			return
		}
		if total < -1 {
			t.Fatalf("parseContentRange(%q): total %d", s, total)
		}
		var formatted string
		tot := "*"
		if total >= 0 {
			tot = strconv.FormatInt(total, 10)
		}
		if start == -1 && end == -1 {
			formatted = "bytes */" + tot
		} else {
			if start < 0 || end < start || total >= 0 && end >= total {
				t.Fatalf("parseContentRange(%q) = %d, %d, %d", s, start, end, total)
			}
			formatted = "bytes " + strconv.FormatInt(start, 10) + "-" + strconv.FormatInt(end, 10) + "/" + tot
			if total >= 0 {
				if f := (httpRange{start, end - start + 1}).contentRange(total); f != formatted {
					t.Fatalf("httpRange.contentRange = %q, want %q", f, formatted)
				}
			}
		}
		s2, e2, t2, ok2 := parseContentRange(formatted)
		if !ok2 || s2 != start || e2 != end || t2 != total {
			t.Fatalf("%q parsed as %d, %d, %d; formatted %q parses as %d, %d, %d, %v", s, start, end, total, formatted, s2, e2, t2, ok2)
		}
	})
}

// fuzzAllowed is the allowlist of FuzzClassify.
var fuzzAllowed = []originPattern{{host: "origin.test"}, {suffix: ".cdn.test"}, {host: "deb.debian.org"}}

// FuzzClassify reads an arbitrary request line and Host header as the
// server would and classifies it: never a panic; an accepted origin is a
// valid host name on the allowlist; the key is that host and the uri; the
// path is absolute and normal (no dot segments, no escaped unreserved
// characters); and the uri sent upstream carries no cacheHostOrigin that
// the origin, a parent gateway or any Go server would read.
func FuzzClassify(f *testing.F) {
	f.Fuzz(func(t *testing.T, target, host string) {
		if strings.ContainsAny(target+host, "\r\n") {
			return
		}
		raw := "GET " + target + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n"
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return
		}
		tg, err := classify(r, fuzzAllowed)
		if err != nil {
			if _, ok := err.(errNotAllowed); !ok {
				t.Fatalf("classify(%q, Host %q): error of type %T", target, host, err)
			}
			return
		}
		if checkHostName(tg.origin) != nil || !allowedHost(tg.origin, fuzzAllowed) {
			t.Fatalf("classify(%q, Host %q): origin %q accepted", target, host, tg.origin)
		}
		if tg.key != tg.origin+tg.uri || !strings.HasPrefix(tg.uri, "/") {
			t.Fatalf("classify(%q, Host %q): origin %q uri %q key %q", target, host, tg.origin, tg.uri, tg.key)
		}
		p, query, _ := strings.Cut(tg.uri, "?")
		if normalizePath(p) != p {
			t.Fatalf("classify(%q, Host %q): path %q is not normal (%q)", target, host, p, normalizePath(p))
		}
		for _, seg := range strings.Split(p, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("classify(%q, Host %q): dot segment in %q", target, host, p)
			}
		}
		if _, err := url.ParseRequestURI(tg.uri); err != nil {
			t.Fatalf("classify(%q, Host %q): uri %q does not parse: %v", target, host, tg.uri, err)
		}
		if _, origins, _ := splitOriginParam(query); len(origins) > 0 {
			t.Fatalf("classify(%q, Host %q): uri %q still names an origin %q", target, host, tg.uri, origins)
		}
		if q, _ := url.ParseQuery(query); q.Has(originParam) {
			t.Fatalf("classify(%q, Host %q): uri %q has a cacheHostOrigin for net/url", target, host, tg.uri)
		}
		// A second gateway classifying what this one sends (a parent, by
		// the same Host) finds the same key.
		r2, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET " + tg.uri + " HTTP/1.1\r\nHost: " + tg.origin + "\r\n\r\n")))
		if err != nil {
			t.Fatalf("classify(%q, Host %q): uri %q is not a request-target: %v", target, host, tg.uri, err)
		}
		if tg2, err := classify(r2, fuzzAllowed); err != nil || tg2 != tg {
			t.Fatalf("classify(%q, Host %q) = %+v; the upstream request classifies as %+v, %v", target, host, tg, tg2, err)
		}
	})
}

// FuzzFreshness: freshnessLifetime and uncacheable never panic on any
// Cache-Control, Age, Expires and Date; a lifetime lies within ±2^31 s
// (less an Age of at most 2^31 s), is negative only when an Age or an
// Expires says the object arrived stale, and an uncacheable response is
// always expired.
func FuzzFreshness(f *testing.F) {
	h := &Handler{indexTTL: defaultIndexTTL}
	const capped = time.Duration(maxDelta) * time.Second
	f.Fuzz(func(t *testing.T, cc, age, expires, date string) {
		m := rangestore.Meta{Header: map[string][]string{}, Internal: map[string]string{metaStored: "1767225600"}}
		for _, v := range strings.Split(cc, "\n") {
			m.Header["Cache-Control"] = append(m.Header["Cache-Control"], v)
		}
		if age != "" {
			m.Internal[metaAge] = age
		}
		if expires != "" {
			m.Header["Expires"] = []string{expires}
		}
		if date != "" {
			m.Internal[metaDate] = date
		}
		for _, uri := range []string{"/f.swu", "/debian/dists/stable/InRelease", "/debian/pool/x.deb"} {
			ttl, exp := h.freshnessLifetime(m, uri)
			if !exp {
				if ttl != 0 {
					t.Fatalf("never-stale object with lifetime %s", ttl)
				}
				continue
			}
			if ttl > capped || ttl < -2*capped {
				t.Fatalf("Cache-Control %q Age %q Expires %q Date %q: lifetime %s out of bounds", cc, age, expires, date, ttl)
			}
			if a, _ := parseDeltaSeconds(age); ttl < 0 && a == 0 && expires == "" {
				t.Fatalf("Cache-Control %q Age %q: negative lifetime %s without an Age or Expires", cc, age, ttl)
			}
			if uncacheable(m) && ttl != 0 {
				t.Fatalf("Cache-Control %q: uncacheable yet fresh for %s", cc, ttl)
			}
		}
	})
}
