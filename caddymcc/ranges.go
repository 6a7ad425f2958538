package caddymcc

// Range and precondition handling for answers that are streamed while blocks
// are still arriving, where http.ServeContent cannot be used. The logic
// follows net/http's fs.go (BSD licence, The Go Authors) line for line, so a
// partial hit answers exactly as a full hit served by ServeContent does.

import (
	"errors"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"
)

// httpRange is a byte range [start, start+length) of the object.
type httpRange struct {
	start, length int64
}

func (r httpRange) contentRange(size int64) string {
	return "bytes " + strconv.FormatInt(r.start, 10) + "-" + strconv.FormatInt(r.start+r.length-1, 10) + "/" + strconv.FormatInt(size, 10)
}

var (
	errNoOverlap    = errors.New("invalid range: failed to overlap")
	errInvalidRange = errors.New("invalid range")
)

// parseRange parses a Range header (RFC 9110 section 14.2) against an object
// of size bytes; errNoOverlap when no range overlaps a non-empty object. On
// an empty object a Range is ignored (nil, nil), as net/http's ServeContent
// does: some clients add one to every request.
func parseRange(s string, size int64) ([]httpRange, error) {
	if s == "" {
		return nil, nil
	}
	spec, ok := strings.CutPrefix(s, "bytes=")
	if !ok {
		return nil, errInvalidRange
	}
	var ranges []httpRange
	noOverlap := false
	for ra := range strings.SplitSeq(spec, ",") {
		ra = textproto.TrimString(ra)
		if ra == "" {
			continue
		}
		start, end, ok := strings.Cut(ra, "-")
		if !ok {
			return nil, errInvalidRange
		}
		start, end = textproto.TrimString(start), textproto.TrimString(end)
		var r httpRange
		if start == "" {
			// A suffix range: the last end bytes.
			if end == "" || end[0] == '-' {
				return nil, errInvalidRange
			}
			i, err := strconv.ParseInt(end, 10, 64)
			if i < 0 || err != nil {
				return nil, errInvalidRange
			}
			if i == 0 || size == 0 {
				// No bytes: "bytes=-0", or any suffix of an empty
				// object, is not satisfiable (RFC 9110 section 14.1.2),
				// where net/http would answer 206 with
				// "Content-Range: bytes 0--1/0".
				noOverlap = true
				continue
			}
			i = min(i, size)
			r.start = size - i
			r.length = size - r.start
		} else {
			i, err := strconv.ParseInt(start, 10, 64)
			if err != nil || i < 0 {
				return nil, errInvalidRange
			}
			if i >= size {
				noOverlap = true
				continue
			}
			r.start = i
			if end == "" {
				r.length = size - r.start
			} else {
				i, err := strconv.ParseInt(end, 10, 64)
				if err != nil || r.start > i {
					return nil, errInvalidRange
				}
				i = min(i, size-1)
				r.length = i - r.start + 1
			}
		}
		ranges = append(ranges, r)
	}
	if noOverlap && len(ranges) == 0 {
		if size == 0 {
			return nil, nil
		}
		return nil, errNoOverlap
	}
	return ranges, nil
}

func sumRangesSize(ranges []httpRange) (size int64) {
	for _, ra := range ranges {
		size += ra.length
	}
	return size
}

// scanETag returns the entity tag at the start of s and the rest, or "", ""
// when there is none.
func scanETag(s string) (etag string, remain string) {
	s = textproto.TrimString(s)
	start := 0
	if strings.HasPrefix(s, "W/") {
		start = 2
	}
	if len(s[start:]) < 2 || s[start] != '"' {
		return "", ""
	}
	for i := start + 1; i < len(s); i++ {
		c := s[i]
		switch {
		case c == 0x21 || c >= 0x23 && c <= 0x7E || c >= 0x80:
		case c == '"':
			return s[:i+1], s[i+1:]
		default:
			return "", ""
		}
	}
	return "", ""
}

func etagStrongMatch(a, b string) bool { return a == b && a != "" && a[0] == '"' }

func etagWeakMatch(a, b string) bool {
	return strings.TrimPrefix(a, "W/") == strings.TrimPrefix(b, "W/")
}

// etagListMatches reports whether the If-Match / If-None-Match list matches
// etag ("*" matches anything); ok is false for an empty header.
func etagListMatches(list, etag string, match func(a, b string) bool) (matched, ok bool) {
	if list == "" {
		return false, false
	}
	for {
		list = textproto.TrimString(list)
		if len(list) == 0 {
			return false, true
		}
		if list[0] == ',' {
			list = list[1:]
			continue
		}
		if list[0] == '*' {
			return true, true
		}
		tag, remain := scanETag(list)
		if tag == "" {
			return false, true
		}
		if match(tag, etag) {
			return true, true
		}
		list = remain
	}
}

// modifiedSince reports whether modtime is after the date in header h;
// ok is false without a usable date.
func modifiedSince(r *http.Request, h string, modtime time.Time) (after, ok bool) {
	v := r.Header.Get(h)
	if v == "" || modtime.IsZero() || modtime.Unix() == 0 {
		return false, false
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return false, false
	}
	return modtime.Truncate(time.Second).After(t), true
}

// checkPreconditions evaluates RFC 9110 section 13.2.2 in order and returns
// 412 or 304 when the request is answered by it, else 0.
func checkPreconditions(r *http.Request, etag string, modtime time.Time) int {
	if m, ok := etagListMatches(r.Header.Get("If-Match"), etag, etagStrongMatch); ok {
		if !m {
			return http.StatusPreconditionFailed
		}
	} else if after, ok := modifiedSince(r, "If-Unmodified-Since", modtime); ok && after {
		return http.StatusPreconditionFailed
	}
	get := r.Method == http.MethodGet || r.Method == http.MethodHead
	if m, ok := etagListMatches(r.Header.Get("If-None-Match"), etag, etagWeakMatch); ok {
		if m {
			if get {
				return http.StatusNotModified
			}
			return http.StatusPreconditionFailed
		}
	} else if after, ok := modifiedSince(r, "If-Modified-Since", modtime); ok && get && !after {
		return http.StatusNotModified
	}
	return 0
}

// ifRangeMatches reports whether a Range header applies: there is no
// If-Range, or it names the current strong ETag or exact Last-Modified.
func ifRangeMatches(r *http.Request, etag string, modtime time.Time) bool {
	ir := r.Header.Get("If-Range")
	if ir == "" {
		return true
	}
	if tag, _ := scanETag(ir); tag != "" {
		return etagStrongMatch(tag, etag)
	}
	if modtime.IsZero() {
		return false
	}
	t, err := http.ParseTime(ir)
	return err == nil && t.Unix() == modtime.Unix()
}

// writeConditional answers 304 or 412, with the metadata RFC 9110 section
// 15.4.5 allows on a 304.
func writeConditional(w http.ResponseWriter, code int) {
	h := w.Header()
	if code == http.StatusNotModified {
		delete(h, "Content-Type")
		delete(h, "Content-Length")
		delete(h, "Content-Encoding")
		if h.Get("Etag") != "" {
			delete(h, "Last-Modified")
		}
	}
	w.WriteHeader(code)
}

// parseHTTPDate parses a Last-Modified value; the zero time when absent or
// malformed.
func parseHTTPDate(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	t, err := http.ParseTime(s)
	if err != nil {
		return time.Time{}
	}
	return t
}

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
