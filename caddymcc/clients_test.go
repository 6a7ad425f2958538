package caddymcc

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Tests in this file download through an in-process gateway with the
// command-line clients that people point at a cache (curl, wget, aria2c),
// over real TCP on 127.0.0.1, and compare what lands on disk with the
// origin's bytes. CI installs the clients (.ci/run); a machine without one
// skips its test.

const mib = 1 << 20

// harnessBlockSize is the block_size of the harness's gatewayConfig: the
// unit in which the gateway fetches from the origin.
const harnessBlockSize = 64 * kib

// clientTimeout bounds one client run; a healthy run takes well under a
// second, so reaching it means a hang.
const clientTimeout = 2 * time.Minute

// needClient returns the path of a client binary, skipping the test when
// it is not installed; under CI (CI=true), which installs every client in
// .ci/run, a missing one fails the test instead of hiding behind a skip.
func needClient(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not installed, and .ci/run should have installed it: %v", name, err)
		}
		t.Skipf("%s is not installed (CI installs it): %v", name, err)
	}
	return p
}

// clientEnv is the environment for a client run: the test's own, without
// any proxy variable, with HOME in a fresh directory so that no ~/.curlrc,
// ~/.wgetrc or ~/.aria2/aria2.conf of the machine applies.
func clientEnv(t *testing.T) []string {
	home := t.TempDir()
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch n := strings.ToLower(name); {
		case strings.HasSuffix(n, "_proxy"), n == "home", n == "curl_home", n == "wgetrc", n == "xdg_config_home":
			continue
		}
		env = append(env, kv)
	}
	return append(env, "HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, ".config"))
}

// runClient runs a client to completion in dir and returns its standard
// output and standard error; a non-zero exit fails the test.
func runClient(t *testing.T, dir, bin string, args ...string) (stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	cmd.Env = clientEnv(t)
	cmd.Stdin = nil
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", filepath.Base(bin), strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String(), errb.String()
}

// fileSum returns the SHA-256 of a file's contents and its length.
func fileSum(t *testing.T, path string) (string, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil)), n
}

// checkFile fails the test unless the file at path holds exactly want.
func checkFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, n := fileSum(t, path)
	if n != int64(len(want)) || got != sum(want) {
		t.Fatalf("%s: %d bytes, sha256 %s; origin has %d bytes, sha256 %s", filepath.Base(path), n, got, len(want), sum(want))
	}
}

// writePartial writes the first n bytes of data to path, as an interrupted
// download leaves them.
func writePartial(t *testing.T, path string, data []byte, n int) {
	t.Helper()
	if err := os.WriteFile(path, data[:n], 0o644); err != nil {
		t.Fatal(err)
	}
}

// blockStart is the offset of the gateway block holding byte off: a fill
// for a range starting at off fetches from there.
func blockStart(off int) int64 { return int64(off) / harnessBlockSize * harnessBlockSize }

// curlResult is what curl's --write-out reports of one transfer.
type curlResult struct {
	status      int
	downloaded  int64
	cacheStatus string
}

// curlWriteOut is the --write-out format parsed by curlGet: status, bytes
// of body received, and the Cache-Status header, one per line.
const curlWriteOut = `%{http_code}\n%{size_download}\n%header{cache-status}\n`

// curlGet runs curl (with extra arguments before the URL) and parses its
// --write-out report.
func curlGet(t *testing.T, dir, bin string, extra ...string) curlResult {
	t.Helper()
	// -q must come first: it makes curl skip any .curlrc.
	args := append([]string{"-q", "--silent", "--show-error", "--fail", "--noproxy", "*", "--write-out", curlWriteOut}, extra...)
	out, _ := runClient(t, dir, bin, args...)
	lines := strings.Split(out, "\n")
	if len(lines) < 3 {
		t.Fatalf("curl --write-out gave %q", out)
	}
	status, err1 := strconv.Atoi(lines[0])
	n, err2 := strconv.ParseInt(lines[1], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("curl --write-out gave %q", out)
	}
	return curlResult{status: status, downloaded: n, cacheStatus: lines[2]}
}

// TestCurlDownloadAndResume downloads a 3 MiB object with curl, then has
// `curl -C -` finish two interrupted downloads, one of the cached object
// and one of an object the gateway has never seen. Every file must match
// the origin's bytes; the cold resume must fetch only from the block of
// the resume point on.
func TestCurlDownloadAndResume(t *testing.T) {
	curl := needClient(t, "curl")
	o := newOrigin(t)
	want := o.add("/curl/full.bin", 3*mib+12345, 101)
	g := startGateway(t, o, "")
	dir := t.TempDir()
	url := g.url + "/curl/full.bin?cacheHostOrigin=origin.test"

	r := curlGet(t, dir, curl, "--output", "full.bin", url)
	if r.status != 200 || r.downloaded != int64(len(want)) || !strings.Contains(r.cacheStatus, "fwd=miss") {
		t.Errorf("cold download: %+v, want 200 of %d bytes, fwd=miss", r, len(want))
	}
	checkFile(t, filepath.Join(dir, "full.bin"), want)
	if sent := o.bytesSent(); sent != int64(len(want)) {
		t.Errorf("origin sent %d bytes for a %d byte object", sent, len(want))
	}

	// Resume the cached object from a point inside a block.
	const cut = 1234567
	writePartial(t, filepath.Join(dir, "hit.bin"), want, cut)
	before := o.bytesSent()
	r = curlGet(t, dir, curl, "--continue-at", "-", "--output", "hit.bin", url)
	if r.status != 206 || r.downloaded != int64(len(want)-cut) || r.cacheStatus != "caddy-mcc; hit" {
		t.Errorf("resume of a cached object: %+v, want 206 of %d bytes, hit", r, len(want)-cut)
	}
	checkFile(t, filepath.Join(dir, "hit.bin"), want)
	if d := o.bytesSent() - before; d != 0 {
		t.Errorf("resume of a cached object fetched %d bytes from the origin", d)
	}

	// Resume an object the gateway has not stored yet.
	cold := o.add("/curl/cold.bin", 3*mib+777, 102)
	const coldCut = 2000001
	writePartial(t, filepath.Join(dir, "cold.bin"), cold, coldCut)
	before = o.bytesSent()
	r = curlGet(t, dir, curl, "--continue-at", "-", "--output", "cold.bin", g.url+"/curl/cold.bin?cacheHostOrigin=origin.test")
	if r.status != 206 || r.downloaded != int64(len(cold)-coldCut) || !strings.Contains(r.cacheStatus, "fwd=miss") {
		t.Errorf("cold resume: %+v, want 206 of %d bytes, fwd=miss", r, len(cold)-coldCut)
	}
	checkFile(t, filepath.Join(dir, "cold.bin"), cold)
	if d, wantSent := o.bytesSent()-before, int64(len(cold))-blockStart(coldCut); d != wantSent {
		t.Errorf("cold resume at %d fetched %d bytes from the origin, want %d (from the block of the resume point on)", coldCut, d, wantSent)
	}
}

// TestWgetContinue has `wget -c` finish interrupted downloads: first of an
// object the gateway has never seen, then, from an earlier point, of the
// same object, whose answer mixes blocks fetched now with blocks stored by
// the first resume, and last of a complete file, which must stay as it is.
// The origin must send each block once.
func TestWgetContinue(t *testing.T) {
	wget := needClient(t, "wget")
	o := newOrigin(t)
	want := o.add("/wget/w.bin", 3*mib+4321, 201)
	g := startGateway(t, o, "")
	dir := t.TempDir()
	url := g.url + "/wget/w.bin?cacheHostOrigin=origin.test"
	path := filepath.Join(dir, "w.bin")
	wgetC := func() string {
		t.Helper()
		// --server-response prints the response headers to stderr.
		_, stderr := runClient(t, dir, wget, "--no-config", "--no-proxy", "--no-verbose", "--server-response",
			"--continue", "--output-document", "w.bin", url)
		return stderr
	}

	const late, early = 2500000, 700000
	writePartial(t, path, want, late)
	log := wgetC()
	if !strings.Contains(log, " 206 ") || !strings.Contains(log, "Cache-Status: caddy-mcc; fwd=miss") {
		t.Errorf("cold resume: want a 206 with fwd=miss, wget said:\n%s", log)
	}
	checkFile(t, path, want)
	if sent, wantSent := o.bytesSent(), int64(len(want))-blockStart(late); sent != wantSent {
		t.Errorf("cold resume at %d: origin sent %d bytes, want %d", late, sent, wantSent)
	}

	writePartial(t, path, want, early)
	log = wgetC()
	if !strings.Contains(log, " 206 ") || !strings.Contains(log, "Cache-Status: caddy-mcc; fwd=partial") {
		t.Errorf("resume over stored and missing blocks: want a 206 with fwd=partial, wget said:\n%s", log)
	}
	checkFile(t, path, want)
	if sent, wantSent := o.bytesSent(), int64(len(want))-blockStart(early); sent != wantSent {
		t.Errorf("after the resume at %d: origin sent %d bytes in all, want %d", early, sent, wantSent)
	}

	// The file is complete: wget asks for the bytes past its end, gets
	// 416, and leaves the file alone.
	before := o.bytesSent()
	log = wgetC()
	if !strings.Contains(log, " 416 ") {
		t.Errorf("resume of a complete file: want a 416, wget said:\n%s", log)
	}
	checkFile(t, path, want)
	if d := o.bytesSent() - before; d != 0 {
		t.Errorf("resume of a complete file fetched %d bytes from the origin", d)
	}
}

// TestAria2cSegmentedDownload downloads an 8 MiB object with aria2c over
// four connections in 1 MiB pieces, cold and then again from the cache.
// Both files must match the origin's bytes, and the origin must have sent
// every byte exactly once: the gateway collapses the overlapping ranges of
// the four connections.
func TestAria2cSegmentedDownload(t *testing.T) {
	aria2c := needClient(t, "aria2c")
	o := newOrigin(t)
	want := o.add("/aria2/a.bin", 8*mib+333, 301)
	g := startGateway(t, o, "")
	url := g.url + "/aria2/a.bin?cacheHostOrigin=origin.test"

	for _, run := range []string{"cold", "hit"} {
		dir := t.TempDir()
		logPath := filepath.Join(t.TempDir(), "aria2.log")
		runClient(t, dir, aria2c, "--no-conf", "--no-proxy=127.0.0.1", "--all-proxy=",
			"--console-log-level=warn", "--summary-interval=0", "--download-result=hide",
			"--file-allocation=none", "--auto-file-renaming=false",
			"--log="+logPath, "--log-level=info", "-x4", "-s4", "-k1M", "--allow-overwrite=true", "-d", dir, "-o", "a.bin", url)
		checkFile(t, filepath.Join(dir, "a.bin"), want)
		// The info log holds each request aria2c sent: the pieces after
		// the first are asked for with Range on further connections.
		log, err := os.ReadFile(logPath)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(log), "\nRange: bytes="); n < 1 {
			t.Errorf("%s: aria2c sent no ranged request; the download was not segmented:\n%s", run, log)
		}
		if fileExists(filepath.Join(dir, "a.bin.aria2")) {
			t.Errorf("%s: aria2c left its control file: the download is not complete", run)
		}
		if sent := o.bytesSent(); sent != int64(len(want)) {
			t.Errorf("after the %s download the origin has sent %d bytes for a %d byte object", run, sent, len(want))
		}
	}
}
