package caddymcc

import (
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
)

const kib = 1 << 10

func TestColdGetStreamsWholeObjectThenHits(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/f.swu", 1000*kib+123, 1)
	g := startGateway(t, o, "")

	resp := g.get("/f.swu", "origin.test")
	got := readAll(t, resp)
	if resp.StatusCode != 200 || resp.ContentLength != int64(len(want)) {
		t.Fatalf("cold GET: status %d length %d, want 200 %d", resp.StatusCode, resp.ContentLength, len(want))
	}
	if sum(got) != sum(want) {
		t.Fatal("cold GET body differs from the origin's")
	}
	if cs := resp.Header.Get("Cache-Status"); !strings.Contains(cs, "fwd=miss") {
		t.Errorf("cold Cache-Status = %q, want fwd=miss", cs)
	}
	for _, r := range o.log() {
		if !strings.HasPrefix(r.rangeHeader, "bytes=") || r.host != "origin.test" || r.query != "" {
			t.Errorf("origin got %+v; want a block-aligned range for Host origin.test, no query", r)
		}
	}
	sent := o.bytesSent()

	resp = g.get("/f.swu", "origin.test")
	got = readAll(t, resp)
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("hit: status %d, body equal %v", resp.StatusCode, sum(got) == sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != "caddy-mcc; hit" {
		t.Errorf("hit Cache-Status = %q", cs)
	}
	if o.bytesSent() != sent {
		t.Errorf("hit fetched %d more bytes from the origin", o.bytesSent()-sent)
	}
	if sent != int64(len(want)) {
		t.Errorf("origin sent %d bytes for a %d byte object", sent, len(want))
	}
}

func TestRangeAnswersMatchServeContent(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/r.bin", 300*kib+7, 2)
	g := startGateway(t, o, "")
	size := len(want)
	lm := "Fri, 02 Jan 2026 03:04:05 GMT"

	// Each case runs twice: cold (fills, streamed path) on a fresh object
	// for the first pass, then as a hit (ServeContent path).
	cases := []struct {
		name       string
		hdr        []string
		status     int
		body       []byte
		contentRng string
	}{
		{"whole", nil, 200, want, ""},
		{"closed range", []string{"Range", "bytes=70000-140000"}, 206, want[70000:140001], fmt.Sprintf("bytes 70000-140000/%d", size)},
		{"open range", []string{"Range", "bytes=200000-"}, 206, want[200000:], fmt.Sprintf("bytes 200000-%d/%d", size-1, size)},
		{"suffix", []string{"Range", "bytes=-1000"}, 206, want[size-1000:], fmt.Sprintf("bytes %d-%d/%d", size-1000, size-1, size)},
		{"end past size", []string{"Range", "bytes=300000-999999999"}, 206, want[300000:], fmt.Sprintf("bytes 300000-%d/%d", size-1, size)},
		{"unsatisfiable", []string{"Range", fmt.Sprintf("bytes=%d-", size)}, 416, nil, fmt.Sprintf("bytes */%d", size)},
		{"if-range etag match", []string{"Range", "bytes=10-19", "If-Range", `"2-307207"`}, 206, want[10:20], fmt.Sprintf("bytes 10-19/%d", size)},
		{"if-range etag mismatch", []string{"Range", "bytes=10-19", "If-Range", `"other"`}, 200, want, ""},
		{"if-range date match", []string{"Range", "bytes=10-19", "If-Range", lm}, 206, want[10:20], fmt.Sprintf("bytes 10-19/%d", size)},
		{"if-range date mismatch", []string{"Range", "bytes=10-19", "If-Range", "Fri, 02 Jan 2026 03:04:06 GMT"}, 200, want, ""},
		{"if-none-match", []string{"If-None-Match", `"2-307207"`}, 304, nil, ""},
		{"if-match fails", []string{"If-Match", `"nope"`}, 412, nil, ""},
	}
	for pass, label := range []string{"cold", "hit"} {
		for i, c := range cases {
			path := fmt.Sprintf("/r%d.bin", i)
			if pass == 0 {
				o.mu.Lock()
				o.objects[path] = o.objects["/r.bin"]
				o.mu.Unlock()
			}
			t.Run(label+"/"+c.name, func(t *testing.T) {
				resp := g.get(path, "origin.test", c.hdr...)
				got := readAll(t, resp)
				if resp.StatusCode != c.status {
					t.Fatalf("status %d, want %d", resp.StatusCode, c.status)
				}
				if c.body != nil && sum(got) != sum(c.body) {
					t.Fatalf("body of %d bytes differs from the origin's %d", len(got), len(c.body))
				}
				if cr := resp.Header.Get("Content-Range"); cr != c.contentRng {
					t.Errorf("Content-Range %q, want %q", cr, c.contentRng)
				}
				if resp.Header.Get("Cache-Status") == "" {
					t.Error("no Cache-Status")
				}
				if c.status == 200 || c.status == 206 {
					if et := resp.Header.Get("Etag"); et != `"2-307207"` {
						t.Errorf("ETag %q not replayed", et)
					}
					if resp.Header.Get("Last-Modified") != lm || resp.Header.Get("Content-Type") != "application/octet-stream" {
						t.Errorf("Last-Modified %q, Content-Type %q not replayed", resp.Header.Get("Last-Modified"), resp.Header.Get("Content-Type"))
					}
				}
			})
		}
	}
}

func TestMultiRangeAnswersMultipart(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/m.bin", 500*kib, 3)
	g := startGateway(t, o, "")
	for _, label := range []string{"cold", "hit"} {
		resp := g.get("/m.bin", "origin.test", "Range", "bytes=0-9,200000-200099,-5")
		if resp.StatusCode != 206 {
			t.Fatalf("%s: status %d", label, resp.StatusCode)
		}
		_, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
		if err != nil {
			t.Fatal(err)
		}
		mr := multipart.NewReader(resp.Body, params["boundary"])
		wantParts := [][]byte{want[0:10], want[200000:200100], want[len(want)-5:]}
		for i, wp := range wantParts {
			p, err := mr.NextPart()
			if err != nil {
				t.Fatalf("%s part %d: %v", label, i, err)
			}
			b, _ := io.ReadAll(p)
			if sum(b) != sum(wp) {
				t.Errorf("%s part %d differs", label, i)
			}
		}
		resp.Body.Close()
	}
}

func TestHeadAnswersHeadersWithoutBody(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/h.bin", 100*kib, 4)
	g := startGateway(t, o, "")
	for _, label := range []string{"cold", "hit"} {
		req, _ := http.NewRequest(http.MethodHead, g.url+"/h.bin?cacheHostOrigin=origin.test", nil)
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ContentLength != int64(len(want)) || resp.Header.Get("Etag") == "" {
			t.Errorf("%s HEAD: status %d length %d etag %q", label, resp.StatusCode, resp.ContentLength, resp.Header.Get("Etag"))
		}
	}
}

func TestResumeWithTwoRangeLinesUsesLast(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/do.swu", 400*kib, 5)
	g := startGateway(t, o, "")
	// The DO agent's second resume: the first resume's line, then its own.
	for _, label := range []string{"cold", "hit"} {
		resp := g.get("/do.swu", "origin.test", "Range", "bytes=1000-409599", "Range", "bytes=250000-409599")
		got := readAll(t, resp)
		if resp.StatusCode != 206 || resp.Header.Get("Content-Range") != "bytes 250000-409599/409600" {
			t.Fatalf("%s: status %d Content-Range %q", label, resp.StatusCode, resp.Header.Get("Content-Range"))
		}
		if sum(got) != sum(want[250000:]) {
			t.Fatalf("%s: body differs", label)
		}
	}
}

func TestOriginGetsQueryWithoutCacheHostOrigin(t *testing.T) {
	o := newOrigin(t)
	o.add("/q.bin", 1000, 6)
	g := startGateway(t, o, "")
	readAll(t, g.get("/q.bin", "origin.test"))
	req, _ := http.NewRequest(http.MethodGet, g.url+"/q.bin?a=1&cacheHostOrigin=origin.test&b=%2F", nil)
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	log := o.log()
	if len(log) != 2 || log[0].query != "" || log[1].query != "a=1&b=%2F" {
		t.Fatalf("origin saw queries %+v; want \"\" then \"a=1&b=%%2F\"", log)
	}
}
