package caddymcc

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// Tests in this file pin the `caddy mcc` command line against a live
// server.

// runMcc runs `caddy mcc args...` as the caddy binary would, and returns
// what it printed.
func runMcc(args ...string) (string, error) {
	root := &cobra.Command{Use: "mcc"}
	caddycmd.Commands()["mcc"].CobraFunc(root)
	root.SetArgs(args)
	out := &bytes.Buffer{}
	root.SetOut(out)
	root.SetErr(out)
	err := root.Execute()
	return out.String(), err
}

func TestCommandsRunAgainstLiveServer(t *testing.T) {
	o := newOrigin(t)
	a := o.add("/c1.bin", 300*kib, 81)
	b := o.add("/c2.bin", 260*kib, 82)
	g := startGateway(t, o, "")

	list := filepath.Join(t.TempDir(), "urls.txt")
	text := "# warm the rollout\n\n" + g.url + "/c1.bin?cacheHostOrigin=origin.test\n  " + g.url + "/c2.bin?cacheHostOrigin=origin.test  \n"
	if err := os.WriteFile(list, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runMcc("prefetch", "--file", list, "--address", g.adminAddr)
	if err != nil {
		t.Fatalf("prefetch: %v\n%s", err, out)
	}
	if !strings.Contains(out, "prefetched 2 of 2 URLs, 560 KiB; 0 failed") || strings.Count(out, " ok ") != 2 {
		t.Errorf("prefetch printed:\n%s", out)
	}
	g.waitFills()
	download(t, g, "/c1.bin", "origin.test", a, csHit)
	download(t, g, "/c2.bin", "origin.test", b, csHit)

	out, err = runMcc("stats", "--address", g.adminAddr)
	if err != nil {
		t.Fatalf("stats: %v\n%s", err, out)
	}
	// How the cold bytes split between hit and miss depends on how far
	// read-ahead ran ahead of the prefetch; the totals do not.
	for _, s := range []string{"store              " + g.storeDir(), "hit ratio", "upstream bytes     560 KiB", "objects            2", "requests           hit 2, partial 0, miss 2", "bytes on disk      560 KiB of no cap"} {
		if !strings.Contains(out, s) {
			t.Errorf("stats lacks %q:\n%s", s, out)
		}
	}
	out, err = runMcc("stats", "--json", "--address", g.adminAddr, "--dir", g.storeDir())
	var s summary
	if err != nil || json.Unmarshal([]byte(out), &s) != nil || s.Objects != 2 || s.UpstreamBytes != int64(len(a)+len(b)) {
		t.Errorf("stats --json: %v\n%s", err, out)
	}

	bad := filepath.Join(t.TempDir(), "bad.txt")
	os.WriteFile(bad, []byte(g.url+"/none.bin?cacheHostOrigin=origin.test\n"), 0o644)
	out, err = runMcc("prefetch", "--file", bad, "--address", g.adminAddr)
	if err == nil || !strings.Contains(out, "FAILED") {
		t.Errorf("prefetch of a missing object: err %v\n%s", err, out)
	}
	if _, err := runMcc("stats", "--address", g.adminAddr, "--dir", "/no/such/store"); err == nil {
		t.Error("stats of an unknown store succeeded")
	}
}

func TestProgressBarOnTerminal(t *testing.T) {
	out := &bytes.Buffer{}
	p := &progress{w: out, total: 4, tty: true}
	p.add(prefetchResult{URL: "http://gw/a", Status: 200, Bytes: 1 << 20})
	p.add(prefetchResult{URL: "http://gw/b", Status: 502, Error: "502 Bad Gateway"})
	p.finish()
	got := out.String()
	for _, s := range []string{
		"\r\x1b[K[#######.......................] 1/4 URLs, 1.0 MiB",
		"\r\x1b[KFAILED http://gw/b: 502 Bad Gateway\n",
		"[###############...............] 2/4 URLs, 1.0 MiB, 1 failed\n",
	} {
		if !strings.Contains(got, s) {
			t.Errorf("progress output lacks %q:\n%q", s, got)
		}
	}
}
