package caddymcc

import (
	"bytes"
	"fmt"
	"net/http"
	"reflect"
	"testing"
	"time"
)

// Table tests of every range and header parser, with the overflowing and
// garbage inputs an upstream or a client may send.

func TestParseRange(t *testing.T) {
	const size = 1000
	cases := []struct {
		in   string
		want []httpRange
		err  error
	}{
		{"", nil, nil},
		{"bytes=0-99", []httpRange{{0, 100}}, nil},
		{"bytes=100-", []httpRange{{100, 900}}, nil},
		{"bytes=-100", []httpRange{{900, 100}}, nil},
		{"bytes=-2000", []httpRange{{0, 1000}}, nil},
		{"bytes=990-5000", []httpRange{{990, 10}}, nil},
		{"bytes= 0-1 , 5-6", []httpRange{{0, 2}, {5, 2}}, nil},
		{"bytes=0-0,2000-3000", []httpRange{{0, 1}}, nil},
		{"bytes=0-9223372036854775807", []httpRange{{0, 1000}}, nil},
		{"bytes=-9223372036854775807", []httpRange{{0, 1000}}, nil},
		{"bytes=1000-", nil, errNoOverlap},
		{"bytes=9223372036854775807-", nil, errNoOverlap},
		{"bytes=1000-1001,2000-", nil, errNoOverlap},
		{"bytes=0-99999999999999999999", nil, errInvalidRange},
		{"bytes=99999999999999999999-", nil, errInvalidRange},
		{"bytes=-99999999999999999999", nil, errInvalidRange},
		{"bytes=5-2", nil, errInvalidRange},
		{"bytes=--5", nil, errInvalidRange},
		{"bytes=-", nil, errInvalidRange},
		{"bytes=-1-2", nil, errInvalidRange},
		{"bytes=5", nil, errInvalidRange},
		{"bytes=a-b", nil, errInvalidRange},
		{"bytes=0-1,x", nil, errInvalidRange},
		{"items=0-1", nil, errInvalidRange},
		{"0-1", nil, errInvalidRange},
		// A suffix of no bytes is unsatisfiable (RFC 9110 section
		// 14.1.2), not "bytes 1000-999/1000".
		{"bytes=-0", nil, errNoOverlap},
		{"bytes=-000", nil, errNoOverlap},
		{"bytes=-0,1000-", nil, errNoOverlap},
		{"bytes=-0,0-1", []httpRange{{0, 2}}, nil},
		{"bytes=-0,-1", []httpRange{{999, 1}}, nil},
	}
	for _, c := range cases {
		got, err := parseRange(c.in, size)
		if err != c.err || !reflect.DeepEqual(got, c.want) {
			t.Errorf("parseRange(%q, %d) = %v, %v; want %v, %v", c.in, size, got, err, c.want, c.err)
		}
	}
	// On an empty object every well-formed Range is ignored, as net/http
	// does (200 with the empty body), never "bytes 0--1/0".
	empty := []struct {
		in  string
		err error
	}{
		{"bytes=-5", nil},
		{"bytes=-0", nil},
		{"bytes=0-", nil},
		{"bytes=0-0", nil},
		{"bytes=0-0,-1", nil},
		{"bytes=-x", errInvalidRange},
		{"bytes=x-", errInvalidRange},
	}
	for _, c := range empty {
		got, err := parseRange(c.in, 0)
		if err != c.err || got != nil {
			t.Errorf("parseRange(%q, 0) = %v, %v; want no ranges, %v", c.in, got, err, c.err)
		}
	}
}

// TestEmptySuffixRangesNeverAnswerNegativeContentRange asks a real gateway,
// cold and then from disk, for suffixes of no bytes and for ranges of an
// empty object: the answer is 416 with "bytes */size" or 200 with the whole
// object, never a 206 whose Content-Range ends before it starts.
func TestEmptySuffixRangesNeverAnswerNegativeContentRange(t *testing.T) {
	o := newOrigin(t)
	full := o.add("/full.bin", 100*kib, 301)
	o.add("/empty.bin", 0, 302)
	g := startGateway(t, o, "")
	cases := []struct {
		path, rng string
		status    int
		body      []byte // for 200
	}{
		{"/full.bin", "bytes=-0", http.StatusRequestedRangeNotSatisfiable, nil},
		{"/full.bin", "bytes=-0", http.StatusRequestedRangeNotSatisfiable, nil},
		{"/empty.bin", "bytes=-0", http.StatusOK, []byte{}},
		{"/empty.bin", "bytes=-0", http.StatusOK, []byte{}},
		{"/empty.bin", "bytes=-500", http.StatusOK, []byte{}},
		{"/empty.bin", "bytes=0-", http.StatusOK, []byte{}},
		{"/full.bin", "bytes=-0,-10", http.StatusPartialContent, full[len(full)-10:]},
	}
	for i, c := range cases {
		resp, done := getOwnConn(t, g, c.path, "origin.test", "Range", c.rng)
		got := readAll(t, resp)
		done()
		cr := resp.Header.Get("Content-Range")
		if resp.StatusCode != c.status {
			t.Errorf("%d: GET %s with %s: status %d (Content-Range %q), want %d", i, c.path, c.rng, resp.StatusCode, cr, c.status)
			continue
		}
		switch c.status {
		case http.StatusRequestedRangeNotSatisfiable:
			if want := "bytes */" + fmt.Sprint(len(full)); cr != want {
				t.Errorf("%d: GET %s with %s: Content-Range %q, want %q", i, c.path, c.rng, cr, want)
			}
		case http.StatusOK:
			if cr != "" || !bytes.Equal(got, c.body) {
				t.Errorf("%d: GET %s with %s: Content-Range %q, %d bytes, want the whole object", i, c.path, c.rng, cr, len(got))
			}
		case http.StatusPartialContent:
			if want := fmt.Sprintf("bytes %d-%d/%d", len(full)-10, len(full)-1, len(full)); cr != want || !bytes.Equal(got, c.body) {
				t.Errorf("%d: GET %s with %s: Content-Range %q, body equal %v; want %q", i, c.path, c.rng, cr, bytes.Equal(got, c.body), want)
			}
		}
	}
}

func TestWantedSpan(t *testing.T) {
	cases := []struct {
		in         string
		start, end int64
	}{
		{"", 0, -1},
		{"bytes=100-", 100, -1},
		{"bytes=100-199", 100, 199},
		{"bytes= 100 - 199 ", 100, 199},
		{"bytes=1-2,5-6", 1, 2},
		{"bytes=-500", 0, -1},
		{"bytes=5-2", 5, -1},
		{"bytes=9223372036854775807-", 9223372036854775807, -1},
		{"bytes=0-99999999999999999999", 0, -1},
		{"bytes=99999999999999999999-", 0, -1},
		{"bytes=x-y", 0, -1},
		{"bytes=5", 0, -1},
		{"items=1-2", 0, -1},
	}
	for _, c := range cases {
		if start, end := wantedSpan(c.in); start != c.start || end != c.end {
			t.Errorf("wantedSpan(%q) = %d, %d; want %d, %d", c.in, start, end, c.start, c.end)
		}
	}
}

func TestParseContentRange(t *testing.T) {
	cases := []struct {
		in                string
		start, end, total int64
		ok                bool
	}{
		{"bytes 0-99/1000", 0, 99, 1000, true},
		{"bytes 999-999/1000", 999, 999, 1000, true},
		{"bytes */1000", -1, -1, 1000, true},
		{"bytes */0", -1, -1, 0, true},
		{"bytes 0-99/*", 0, 99, -1, true},
		{"bytes 0-99/9223372036854775807", 0, 99, 9223372036854775807, true},
		{"bytes 0-1000/1000", 0, 0, 0, false},
		{"bytes 5-2/10", 0, 0, 0, false},
		{"bytes 0-99", 0, 0, 0, false},
		{"0-99/1000", 0, 0, 0, false},
		{"bytes=0-99/1000", 0, 0, 0, false},
		{"bytes -1-5/10", 0, 0, 0, false},
		{"bytes 0-99/-5", 0, 0, 0, false},
		{"bytes 0-99/99999999999999999999", 0, 0, 0, false},
		{"bytes 0-99999999999999999999/*", 0, 0, 0, false},
		{"bytes a-b/10", 0, 0, 0, false},
		{"bytes 0-1/ten", 0, 0, 0, false},
		{"", 0, 0, 0, false},
	}
	for _, c := range cases {
		start, end, total, ok := parseContentRange(c.in)
		if ok != c.ok || ok && (start != c.start || end != c.end || total != c.total) {
			t.Errorf("parseContentRange(%q) = %d, %d, %d, %v; want %d, %d, %d, %v", c.in, start, end, total, ok, c.start, c.end, c.total, c.ok)
		}
	}
}

func TestScanETag(t *testing.T) {
	cases := []struct{ in, etag, rest string }{
		{`"abc"`, `"abc"`, ""},
		{` "abc", "d"`, `"abc"`, `, "d"`},
		{`W/"x" rest`, `W/"x"`, " rest"},
		{`""`, `""`, ""},
		{`abc`, "", ""},
		{`"unterminated`, "", ""},
		{"\"a\x01b\"", "", ""},
		{`W/`, "", ""},
		{``, "", ""},
	}
	for _, c := range cases {
		if etag, rest := scanETag(c.in); etag != c.etag || rest != c.rest {
			t.Errorf("scanETag(%q) = %q, %q; want %q, %q", c.in, etag, rest, c.etag, c.rest)
		}
	}
}

func TestETagListMatches(t *testing.T) {
	cases := []struct {
		list, etag  string
		strong      bool
		matched, ok bool
	}{
		{"", `"a"`, true, false, false},
		{"*", `"a"`, true, true, true},
		{`"a", "b"`, `"b"`, true, true, true},
		{`,, "b"`, `"b"`, true, true, true},
		{`"a"`, `"b"`, true, false, true},
		{`W/"b"`, `"b"`, true, false, true},
		{`W/"b"`, `"b"`, false, true, true},
		{`"b"`, `W/"b"`, false, true, true},
		{`garbage`, `"a"`, true, false, true},
		{`"a" garbage`, `"a"`, true, true, true},
	}
	for _, c := range cases {
		match := etagWeakMatch
		if c.strong {
			match = etagStrongMatch
		}
		if m, ok := etagListMatches(c.list, c.etag, match); m != c.matched || ok != c.ok {
			t.Errorf("etagListMatches(%q, %q, strong %v) = %v, %v; want %v, %v", c.list, c.etag, c.strong, m, ok, c.matched, c.ok)
		}
	}
}

func TestCheckPreconditionsAndIfRange(t *testing.T) {
	mod := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	before, same, after := mod.Add(-time.Hour).Format(http.TimeFormat), mod.Format(http.TimeFormat), mod.Add(time.Hour).Format(http.TimeFormat)
	const etag = `"v1"`
	cases := []struct {
		method       string
		hdr          []string
		precondition int
		ifRange      bool
	}{
		{"GET", nil, 0, true},
		{"GET", []string{"If-Match", `"v1"`}, 0, true},
		{"GET", []string{"If-Match", `"v2"`}, http.StatusPreconditionFailed, true},
		{"GET", []string{"If-Match", `W/"v1"`}, http.StatusPreconditionFailed, true},
		{"GET", []string{"If-Unmodified-Since", before}, http.StatusPreconditionFailed, true},
		{"GET", []string{"If-Unmodified-Since", same}, 0, true},
		{"GET", []string{"If-Unmodified-Since", "garbage"}, 0, true},
		{"GET", []string{"If-None-Match", `W/"v1"`}, http.StatusNotModified, true},
		{"HEAD", []string{"If-None-Match", "*"}, http.StatusNotModified, true},
		{"GET", []string{"If-None-Match", `"v2"`, "If-Modified-Since", after}, 0, true},
		{"GET", []string{"If-Modified-Since", same}, http.StatusNotModified, true},
		{"GET", []string{"If-Modified-Since", before}, 0, true},
		{"GET", []string{"If-Range", `"v1"`}, 0, true},
		{"GET", []string{"If-Range", `W/"v1"`}, 0, false},
		{"GET", []string{"If-Range", `"v2"`}, 0, false},
		{"GET", []string{"If-Range", same}, 0, true},
		{"GET", []string{"If-Range", after}, 0, false},
		{"GET", []string{"If-Range", "garbage"}, 0, false},
	}
	for _, c := range cases {
		r, _ := http.NewRequest(c.method, "http://gw/x", nil)
		for i := 0; i+1 < len(c.hdr); i += 2 {
			r.Header.Set(c.hdr[i], c.hdr[i+1])
		}
		if got := checkPreconditions(r, etag, mod); got != c.precondition {
			t.Errorf("%s %v: checkPreconditions = %d, want %d", c.method, c.hdr, got, c.precondition)
		}
		if got := ifRangeMatches(r, etag, mod); got != c.ifRange {
			t.Errorf("%s %v: ifRangeMatches = %v, want %v", c.method, c.hdr, got, c.ifRange)
		}
	}
	// Without a Last-Modified, a date never matches If-Range.
	r, _ := http.NewRequest("GET", "http://gw/x", nil)
	r.Header.Set("If-Range", same)
	if ifRangeMatches(r, etag, time.Time{}) {
		t.Error("If-Range with a date matched an object without Last-Modified")
	}
}

func TestParseHTTPDate(t *testing.T) {
	want := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for in, exp := range map[string]time.Time{
		"":                               {},
		"garbage":                        {},
		"Fri, 02 Jan 2026 03:04:05 GMT":  want,
		"Friday, 02-Jan-26 03:04:05 GMT": want,
		"Fri Jan  2 03:04:05 2026":       want,
		"Fri, 02 Jan 2026 03:04:05":      {},
	} {
		if got := parseHTTPDate(in); !got.Equal(exp) {
			t.Errorf("parseHTTPDate(%q) = %v, want %v", in, got, exp)
		}
	}
}
