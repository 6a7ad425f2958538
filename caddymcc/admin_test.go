package caddymcc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// Tests in this file pin the admin API: objects, purge and prefetch.

func TestPurgeMakesNextRequestAMiss(t *testing.T) {
	o := newOrigin(t)
	a := o.add("/a.bin", 300*kib, 73)
	b := o.add("/dir/b.bin", 300*kib, 74)
	g := startGateway(t, o, "")
	download(t, g, "/a.bin", "origin.test", a, csMiss)
	download(t, g, "/a.bin", "x.cdn.test", a, csMiss)
	download(t, g, "/dir/b.bin", "x.cdn.test", b, csMiss)
	g.waitFills()

	var res struct{ Purged int }
	adminJSON(t, g, http.MethodPost, "/mcc/purge", purgeRequest{Origin: "Origin.Test"}, &res)
	if res.Purged != 1 {
		t.Errorf("purging origin.test purged %d objects, want 1", res.Purged)
	}
	download(t, g, "/a.bin", "x.cdn.test", a, csHit)
	download(t, g, "/a.bin", "origin.test", a, csMiss)

	adminJSON(t, g, http.MethodPost, "/mcc/purge", purgeRequest{Prefix: "x.cdn.test/dir/"}, &res)
	if res.Purged != 1 {
		t.Errorf("purging prefix x.cdn.test/dir/ purged %d objects, want 1", res.Purged)
	}
	download(t, g, "/a.bin", "x.cdn.test", a, csHit)
	download(t, g, "/dir/b.bin", "x.cdn.test", b, csMiss)

	for _, c := range []struct {
		method string
		body   any
		want   int
	}{
		{http.MethodPost, map[string]string{}, 400},
		{http.MethodPost, purgeRequest{Origin: "origin.test", Prefix: "x"}, 400},
		{http.MethodPost, purgeRequest{Origin: "not a host"}, 400},
		{http.MethodPost, map[string]string{"orign": "origin.test"}, 400},
		{http.MethodGet, nil, 405},
	} {
		if status, body := adminCall(t, g, c.method, "/mcc/purge", c.body); status != c.want {
			t.Errorf("%s /mcc/purge %v: %d %s, want %d", c.method, c.body, status, body, c.want)
		}
	}
}

func TestObjectsListAndDelete(t *testing.T) {
	o := newOrigin(t)
	a := o.add("/a.bin", 300*kib, 75)
	b := o.add("/b.bin", 270*kib, 76)
	g := startGateway(t, o, "")
	download(t, g, "/a.bin", "origin.test", a, csMiss)
	download(t, g, "/b.bin", "x.cdn.test", b, csMiss)
	g.waitFills()

	var page objectList
	adminJSON(t, g, http.MethodGet, "/mcc/objects", nil, &page)
	if page.Total != 2 || len(page.Objects) != 2 {
		t.Fatalf("objects: %+v, want 2", page)
	}
	first := page.Objects[0]
	if first.Key != "origin.test/a.bin" || first.Origin != "origin.test" || first.Size != int64(len(a)) || first.BytesPresent != int64(len(a)) || first.LastAccess.IsZero() {
		t.Errorf("first object %+v", first)
	}
	adminJSON(t, g, http.MethodGet, "/mcc/objects?offset=1&limit=1", nil, &page)
	if page.Total != 2 || len(page.Objects) != 1 || page.Objects[0].Key != "x.cdn.test/b.bin" || page.Objects[0].Origin != "x.cdn.test" {
		t.Errorf("second page: %+v", page)
	}
	adminJSON(t, g, http.MethodGet, "/mcc/objects?origin=x.cdn.test", nil, &page)
	if page.Total != 1 || len(page.Objects) != 1 || page.Objects[0].Key != "x.cdn.test/b.bin" {
		t.Errorf("objects of x.cdn.test: %+v", page)
	}

	var del struct{ Deleted int }
	adminJSON(t, g, http.MethodDelete, "/mcc/objects?key=origin.test/a.bin", nil, &del)
	if del.Deleted != 1 {
		t.Errorf("delete: %+v", del)
	}
	if status, body := adminCall(t, g, http.MethodDelete, "/mcc/objects?key=origin.test/a.bin", nil); status != 404 {
		t.Errorf("deleting it again: %d %s, want 404", status, body)
	}
	download(t, g, "/b.bin", "x.cdn.test", b, csHit)
	download(t, g, "/a.bin", "origin.test", a, csMiss)

	for _, q := range []string{"?limit=0", "?limit=x", "?offset=-1", "?origin=a&prefix=b"} {
		if status, body := adminCall(t, g, http.MethodGet, "/mcc/objects"+q, nil); status != 400 {
			t.Errorf("GET /mcc/objects%s: %d %s, want 400", q, status, body)
		}
	}
	if status, _ := adminCall(t, g, http.MethodDelete, "/mcc/objects", nil); status != 400 {
		t.Errorf("DELETE without a key: %d, want 400", status)
	}
	if status, _ := adminCall(t, g, http.MethodGet, "/mcc/objects?dir=/no/such/store", nil); status != 404 {
		t.Errorf("objects of an unknown store: %d, want 404", status)
	}
}

// prefetch posts urls to the admin API and returns the results by index.
func prefetch(t *testing.T, g *gateway, urls ...string) []prefetchResult {
	t.Helper()
	status, data := adminCall(t, g, http.MethodPost, "/mcc/prefetch", prefetchRequest{URLs: urls})
	if status != 200 {
		t.Fatalf("prefetch: %d %s", status, data)
	}
	out := make([]prefetchResult, len(urls))
	sc := bufio.NewScanner(bytes.NewReader(data))
	lines := 0
	for sc.Scan() {
		var r prefetchResult
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.Index < 0 || r.Index >= len(urls) || r.URL != urls[r.Index] {
			t.Fatalf("prefetch line %q: %v", sc.Text(), err)
		}
		out[r.Index] = r
		lines++
	}
	if lines != len(urls) {
		t.Fatalf("prefetch answered %d lines for %d URLs", lines, len(urls))
	}
	return out
}

func TestPrefetchMakesDownloadsFullHits(t *testing.T) {
	o := newOrigin(t)
	objs := map[string][]byte{
		"/p1.bin":     o.add("/p1.bin", 300*kib+1, 77),
		"/p2.bin":     o.add("/p2.bin", 260*kib, 78),
		"/dir/p3.bin": o.add("/dir/p3.bin", 1*mib+5, 79),
	}
	g := startGateway(t, o, "")
	var urls []string
	for p := range objs {
		urls = append(urls, g.url+p+"?cacheHostOrigin=origin.test")
	}
	for i, r := range prefetch(t, g, urls...) {
		path := strings.TrimPrefix(strings.Split(urls[i], "?")[0], g.url)
		if r.Status != 200 || r.Error != "" || r.Bytes != int64(len(objs[path])) || r.CacheStatus != csMiss {
			t.Errorf("prefetch %s: %+v", path, r)
		}
	}
	g.waitFills()
	sent, asked := o.bytesSent(), len(o.log())
	for p, want := range objs {
		download(t, g, p, "origin.test", want, csHit)
	}
	if o.bytesSent() != sent || len(o.log()) != asked {
		t.Errorf("downloads after the prefetch reached the origin: %d more bytes, %d more requests", o.bytesSent()-sent, len(o.log())-asked)
	}

	// Only the gateway's own listeners are fetched from.
	refused := []string{
		"file:///etc/passwd",
		"http://192.0.2.1/p1.bin?cacheHostOrigin=origin.test",
		"http://" + o.addr() + "/p1.bin",
		"http://user@" + strings.TrimPrefix(g.url, "http://") + "/p1.bin?cacheHostOrigin=origin.test",
		"::",
	}
	for i, r := range prefetch(t, g, refused...) {
		if r.Error == "" || r.Status != 0 {
			t.Errorf("prefetch %s: %+v, want refused", refused[i], r)
		}
	}
	if len(o.log()) != asked {
		t.Error("a refused prefetch reached the origin")
	}
	r := prefetch(t, g, g.url+"/missing.bin?cacheHostOrigin=origin.test")[0]
	if r.Status != 404 || r.Error == "" {
		t.Errorf("prefetch of a missing object: %+v, want a 404 failure", r)
	}
	for _, body := range []any{prefetchRequest{}, prefetchRequest{URLs: urls, Concurrency: 99}} {
		if status, data := adminCall(t, g, http.MethodPost, "/mcc/prefetch", body); status != 400 {
			t.Errorf("prefetch %+v: %d %s, want 400", body, status, data)
		}
	}
}
