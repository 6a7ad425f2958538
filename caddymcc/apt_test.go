package caddymcc

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// aptRepo is a tiny flat apt repository served by a counting file origin.
type aptRepo struct {
	t     *testing.T
	dir   string // served root; the repository is dir/repo
	srv   *httptest.Server
	mu    sync.Mutex
	sent  int64
	debs  int            // requests for .deb files
	paths map[string]int // requests per path
}

func newAptRepo(t *testing.T) *aptRepo {
	for _, tool := range []string{"dpkg-deb", "apt-ftparchive", "apt-get"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is missing: .ci/run installs apt-utils", tool)
			}
			t.Skipf("%s is not installed", tool)
		}
	}
	a := &aptRepo{t: t, dir: t.TempDir(), paths: make(map[string]int)}
	files := http.FileServer(http.Dir(a.dir))
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &aptCounter{ResponseWriter: w, a: a}
		a.mu.Lock()
		if strings.HasSuffix(r.URL.Path, ".deb") {
			a.debs++
		}
		a.paths[r.URL.Path]++
		a.mu.Unlock()
		files.ServeHTTP(cw, r)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

type aptCounter struct {
	http.ResponseWriter
	a *aptRepo
}

func (c *aptCounter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.a.mu.Lock()
	c.a.sent += int64(n)
	c.a.mu.Unlock()
	return n, err
}

// asked returns how often the origin was asked for path.
func (a *aptRepo) asked(path string) int {
	waitAllFills()
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.paths[path]
}

func (a *aptRepo) counts() (sent int64, debs int) {
	waitAllFills()
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.sent, a.debs
}

func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "HOME=" + dir}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// publish builds mcc-hello at version into the repository and regenerates
// its indexes, dated later than any before.
func (a *aptRepo) publish(version string, stamp time.Time) {
	t := a.t
	pkg := filepath.Join(t.TempDir(), "pkg")
	os.MkdirAll(filepath.Join(pkg, "DEBIAN"), 0o755)
	os.MkdirAll(filepath.Join(pkg, "usr/share/mcc-hello"), 0o755)
	os.WriteFile(filepath.Join(pkg, "DEBIAN/control"), []byte("Package: mcc-hello\nVersion: "+version+"\nArchitecture: all\nMaintainer: caddy-mcc tests <tests@example.invalid>\nDescription: a package for caddy-mcc's apt test\n"), 0o644)
	os.WriteFile(filepath.Join(pkg, "usr/share/mcc-hello/hello.txt"), []byte(strings.Repeat("hello "+version+"\n", 20000)), 0o644)
	repo := filepath.Join(a.dir, "repo")
	os.MkdirAll(repo, 0o755)
	run(t, repo, "dpkg-deb", "--build", "--root-owner-group", pkg, filepath.Join(repo, "mcc-hello_"+version+"_all.deb"))
	packages := run(t, repo, "apt-ftparchive", "packages", ".")
	os.WriteFile(filepath.Join(repo, "Packages"), []byte(packages), 0o644)
	os.Chtimes(filepath.Join(repo, "Packages"), stamp, stamp)
	release := run(t, repo, "apt-ftparchive", "release", ".")
	os.WriteFile(filepath.Join(repo, "Release"), []byte(release), 0o644)
	os.Chtimes(filepath.Join(repo, "Release"), stamp, stamp)
}

// aptClient is apt-get with a private Dir, through the gateway as its
// proxy.
type aptClient struct {
	t     *testing.T
	dir   string
	proxy string
}

func newAptClient(t *testing.T, proxy string) *aptClient {
	c := &aptClient{t: t, dir: t.TempDir(), proxy: proxy}
	for _, d := range []string{"etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/trusted.gpg.d", "etc/apt/sources.list.d", "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg", "work"} {
		os.MkdirAll(filepath.Join(c.dir, d), 0o755)
	}
	os.WriteFile(filepath.Join(c.dir, "var/lib/dpkg/status"), nil, 0o644)
	// origin.test is never resolved: apt sends absolute-form requests to
	// its proxy, the gateway.
	os.WriteFile(filepath.Join(c.dir, "etc/apt/sources.list"), []byte("deb [trusted=yes] http://origin.test/repo ./\n"), 0o644)
	return c
}

func (c *aptClient) apt(args ...string) string { return c.tool("apt-get", args...) }

func (c *aptClient) tool(name string, args ...string) string {
	base := []string{
		"-o", "Dir=" + c.dir,
		"-o", "Dir::State::status=" + filepath.Join(c.dir, "var/lib/dpkg/status"),
		"-o", "Acquire::http::Proxy=" + c.proxy,
		"-o", "Acquire::Languages=none",
		"-o", "APT::Sandbox::User=root",
		"-o", "Debug::NoLocking=1",
		"-q",
	}
	return run(c.t, filepath.Join(c.dir, "work"), name, append(base, args...)...)
}

var aptChainConfig = testGlobals +
	cacheSite("{{top}}", "top", "", toOrigin) +
	cacheSite("{{bottom}}", "bottom", "", "reverse_proxy 127.0.0.1:{{top}}")

// TestRealAptThroughTwoLevels runs apt-get update and download through a
// two-level chain in apt's proxy mode, with the default index_ttl (30s),
// which the test waits out by moving the freshness clock.
func TestRealAptThroughTwoLevels(t *testing.T) {
	repo := newAptRepo(t)
	t0 := time.Now().Add(-time.Hour).Truncate(time.Second)
	repo.publish("1.0", t0)

	dir := t.TempDir()
	top, bottom := freePort(t), freePort(t)
	cfg := strings.NewReplacer("{{admin}}", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "{{dir}}", dir,
		"{{top}}", fmt.Sprint(top), "{{bottom}}", fmt.Sprint(bottom), "{{origin}}", strings.TrimPrefix(repo.srv.URL, "http://")).Replace(aptChainConfig)
	startCaddyfile(t, cfg)
	proxy := fmt.Sprintf("http://127.0.0.1:%d/", bottom)

	first := newAptClient(t, proxy)
	first.apt("update")
	first.apt("download", "mcc-hello")
	deb, err := os.ReadFile(filepath.Join(first.dir, "work", "mcc-hello_1.0_all.deb"))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(repo.dir, "repo", "mcc-hello_1.0_all.deb"))
	if sum(deb) != sum(want) {
		t.Fatal("the downloaded .deb differs from the origin's")
	}
	_, debs := repo.counts()

	// A second apt client: the .deb comes from the bottom gateway's disk.
	second := newAptClient(t, proxy)
	second.apt("update")
	second.apt("download", "mcc-hello")
	if _, d := repo.counts(); d != debs {
		t.Errorf("the second client's .deb reached the origin (%d -> %d requests)", debs, d)
	}

	// The DO apt plugin's form of the same file shares the cache.
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/repo/mcc-hello_1.0_all.deb?cacheHostOrigin=origin.test", bottom), nil)
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, resp)
	if sum(got) != sum(want) || resp.Header.Get("Cache-Status") != "bottom; hit" {
		t.Errorf("cacheHostOrigin form: equal %v, Cache-Status %q; want a hit shared with the proxy form", sum(got) == sum(want), resp.Header.Get("Cache-Status"))
	}

	// A new version is published. Within the index TTL apt still sees 1.0
	// (and asks the origin for nothing); past it, the next update sees 1.1
	// with no hash mismatch.
	repo.publish("1.1", t0.Add(time.Minute))
	releases := repo.asked("/repo/Release")
	if out := first.apt("update"); strings.Contains(out, "mismatch") {
		t.Fatalf("apt-get update within the TTL:\n%s", out)
	}
	if n := repo.asked("/repo/Release"); n != releases {
		t.Errorf("an update within the index TTL asked the origin for Release (%d -> %d)", releases, n)
	}
	if policy := first.tool("apt-cache", "policy", "mcc-hello"); !strings.Contains(policy, "Candidate: 1.0") {
		t.Fatalf("within the TTL apt should still see 1.0:\n%s", policy)
	}
	for _, level := range []string{"top", "bottom"} {
		cacheAt(t, filepath.Join(dir, level)).skew.Store(int64(defaultIndexTTL + time.Second))
	}
	out := first.apt("update")
	if strings.Contains(out, "Hash Sum mismatch") || strings.Contains(out, "mismatch") {
		t.Fatalf("apt-get update after the new version:\n%s", out)
	}
	first.apt("download", "mcc-hello")
	deb, err = os.ReadFile(filepath.Join(first.dir, "work", "mcc-hello_1.1_all.deb"))
	if err != nil {
		t.Fatalf("apt did not see version 1.1: %v", err)
	}
	want, _ = os.ReadFile(filepath.Join(repo.dir, "repo", "mcc-hello_1.1_all.deb"))
	if sum(deb) != sum(want) {
		t.Fatal("the new .deb differs from the origin's")
	}
}
