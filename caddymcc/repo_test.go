package caddymcc

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
)

// rawRequest sends a request line and headers as written, as apt with
// Acquire::http::Proxy does (absolute form), and reads the answer.
func rawRequest(t *testing.T, g *gateway, lines ...string) (*http.Response, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, strings.Join(lines, "\r\n")+"\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func TestAptProxyModeAbsoluteForm(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", 150*kib, 96)
	g := startGateway(t, o, "")
	for _, label := range []string{"cold", "hit"} {
		resp, got := rawRequest(t, g, "GET http://origin.test/debian/pool/main/h/hello/hello_2.10-3_amd64.deb HTTP/1.1", "Host: origin.test")
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("%s absolute-form GET: status %d, equal %v", label, resp.StatusCode, sum(got) == sum(want))
		}
	}
	if n := len(o.log()); n != 1 {
		t.Errorf("origin asked %d times for one object", n)
	}
	resp, body := rawRequest(t, g, "GET http://evil.test/debian/x.deb HTTP/1.1", "Host: evil.test")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("absolute-form request for another host: %d %s, want 403", resp.StatusCode, body)
	}
	resp, body = rawRequest(t, g, "CONNECT origin.test:443 HTTP/1.1", "Host: origin.test:443")
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("CONNECT: %d %s, want 405", resp.StatusCode, body)
	}
}

func TestCanonicalMirrorsShareOneCacheKey(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/debian/dists/bookworm/main/binary-amd64/Packages.xz", 90*kib, 97)
	g := startGateway(t, o, "canonical deb.debian.org ftp.de.debian.org ftp.us.debian.org")
	path := "/debian/dists/bookworm/main/binary-amd64/Packages.xz"
	for i, mirror := range []string{"ftp.de.debian.org", "ftp.us.debian.org", "deb.debian.org"} {
		resp := g.get(path, mirror)
		got := readAll(t, resp)
		if resp.StatusCode != 200 || sum(got) != sum(want) {
			t.Fatalf("via %s: status %d, equal %v", mirror, resp.StatusCode, sum(got) == sum(want))
		}
		cs := resp.Header.Get("Cache-Status")
		if i == 0 && !strings.Contains(cs, "fwd=miss") || i > 0 && cs != "caddy-mcc; hit" {
			t.Errorf("via %s: Cache-Status %q", mirror, cs)
		}
	}
	if log := o.log(); len(log) != 1 || log[0].host != "ftp.de.debian.org" {
		t.Errorf("origin saw %+v; want one request, to the mirror the first client named", log)
	}
}
