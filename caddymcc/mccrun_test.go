package caddymcc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// helperArgsEnv, when set, turns this test binary into the caddy command
// with these arguments (separated by newlines): the tests below run
// `caddy mcc run` as a process of its own, as a container runs it.
const helperArgsEnv = "CADDYMCC_TEST_CADDY_ARGS"

func TestMCCRunHelperProcess(t *testing.T) {
	args := os.Getenv(helperArgsEnv)
	if args == "" {
		t.Skip("runs only as the caddy process of another test")
	}
	os.Args = append([]string{"caddy"}, strings.Split(args, "\n")...)
	caddycmd.Main() // exits
}

// mccProcess is `caddy mcc run` in a process of its own, configured only
// by environment variables.
type mccProcess struct {
	cmd    *exec.Cmd
	url    string // content listener
	sumURL string // summary listener
	admin  string
	mu     sync.Mutex
	stderr bytes.Buffer
}

// helperCmd is this test binary as `caddy <args...>` with env (and
// nothing else of the test's environment).
func helperCmd(t *testing.T, env map[string]string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestMCCRunHelperProcess$", "-test.count=1")
	home := t.TempDir()
	cmd.Env = []string{helperArgsEnv + "=" + strings.Join(args, "\n"), "HOME=" + home,
		"XDG_DATA_HOME=" + home + "/data", "XDG_CONFIG_HOME=" + home + "/config"}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	return cmd
}

// startMCCRun starts `caddy mcc run` with env on loopback ports and
// returns once Caddy says it serves the config (read from its log, so no
// guessing how long start-up takes).
func startMCCRun(t *testing.T, env map[string]string, driveRoot string) *mccProcess {
	t.Helper()
	p := &mccProcess{admin: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sumListen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p.url, p.sumURL = "http://"+listen, "http://"+sumListen
	env["CADDY_ADMIN"] = p.admin
	p.cmd = helperCmd(t, env, "mcc", "run", "--drive-root", driveRoot, "--listen", listen, "--summary-listen", sumListen)
	errPipe, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGINT)
		p.cmd.Wait()
	})
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(errPipe)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		signalled := false
		for sc.Scan() {
			p.mu.Lock()
			p.stderr.Write(append(sc.Bytes(), '\n'))
			p.mu.Unlock()
			if !signalled && strings.Contains(sc.Text(), "serving initial configuration") {
				signalled = true
				ready <- true
			}
		}
		if !signalled {
			ready <- false // exited before serving
		}
	}()
	select {
	case ok := <-ready:
		if !ok {
			p.cmd.Wait()
			t.Fatalf("caddy mcc run exited before serving:\n%s", p.log())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("caddy mcc run did not start within a minute:\n%s", p.log())
	}
	return p
}

func (p *mccProcess) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// storedBytes asks the process's admin API how many bytes of key it has.
func (p *mccProcess) storedBytes(t *testing.T, key string) int64 {
	t.Helper()
	resp, err := http.Get("http://" + p.admin + "/mcc/objects?prefix=" + key)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Objects []struct {
			Key          string `json:"key"`
			BytesPresent int64  `json:"bytes_present"`
		} `json:"objects"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	for _, o := range list.Objects {
		if o.Key == key {
			return o.BytesPresent
		}
	}
	return 0
}

// waitStored waits until the process has all n bytes of key on disk. A
// client can have the last bytes of a fill before their block is
// committed, and no event crosses the process boundary, so this polls the
// admin API, bounded.
func (p *mccProcess) waitStored(t *testing.T, key string, n int64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for p.storedBytes(t, key) != n {
		if time.Now().After(deadline) {
			t.Fatalf("%s never stored all %d bytes of %s (has %d)", p.url, n, key, p.storedBytes(t, key))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMCCRunThreeLevelChainFromEnvOnly runs three `caddy mcc run`
// processes configured as an MCC deployment would be: the top with
// STORAGE_1_SIZE_GB and a custom origin on a port of its own, the lower
// levels with UPSTREAM_HOST naming their parent.
func TestMCCRunThreeLevelChainFromEnvOnly(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/repo/fw.swu", 3<<20+17, 120)
	origin := o.addr() // 127.0.0.1:<port>
	level := func(name, parent string) *mccProcess {
		root := driveRoot(t, 1)
		env := map[string]string{
			"STORAGE_1_SIZE_GB":       "10",
			"CACHEABLE_CUSTOM_1_HOST": origin,
			"CACHE_NODE_ID":           name,
			"CUSTOMER_ID":             "c0ffee00-0000-4000-8000-000000000001",
			"CUSTOMER_KEY":            "c0ffee00-0000-4000-8000-000000000002",
		}
		if parent != "" {
			env["UPSTREAM_HOST"] = parent
		}
		p := startMCCRun(t, env, root)
		return p
	}
	top := level("top", "")
	middle := level("middle", strings.TrimPrefix(top.url, "http://"))
	bottom := level("bottom", strings.TrimPrefix(middle.url, "http://"))

	path := "/repo/fw.swu?cacheHostOrigin=" + origin
	resp, got := getURL(t, bottom.url+path)
	if resp.StatusCode != 200 || sum(got) != sum(want) {
		t.Fatalf("cold download at the bottom: status %d (%.200s), sha256 %s, want %s", resp.StatusCode, got, sum(got), sum(want))
	}
	if cs := resp.Header.Get("Cache-Status"); cs != "top; fwd=miss, middle; fwd=miss, bottom; fwd=miss" {
		t.Errorf("Cache-Status %q: want every level, top first", cs)
	}
	key := origin + "/repo/fw.swu"
	originRequests := len(o.log())
	for _, l := range []struct {
		name string
		p    *mccProcess
	}{{"bottom", bottom}, {"middle", middle}, {"top", top}} {
		l.p.waitStored(t, key, int64(len(want)))
		resp, got := getURL(t, l.p.url+path)
		if resp.StatusCode != 200 || sum(got) != sum(want) || resp.Header.Get("Cache-Status") != l.name+"; hit" {
			t.Errorf("second download at %s: status %d, sha256 equal %v, Cache-Status %q", l.name, resp.StatusCode, sum(got) == sum(want), resp.Header.Get("Cache-Status"))
		}
	}
	if n := len(o.log()); n != originRequests {
		t.Errorf("hits reached the origin (%d -> %d requests)", originRequests, n)
	}

	// The summary, on its own listener, for the gateway itself (loopback).
	resp, body := getURL(t, bottom.sumURL+"/summary")
	var s summary
	if err := json.Unmarshal(body, &s); resp.StatusCode != 200 || err != nil || s.Objects != 1 {
		t.Errorf("bottom summary: status %d, err %v, objects %d (%.300s)", resp.StatusCode, err, s.Objects, body)
	}
	if resp, _ := getURL(t, bottom.sumURL+"/"); resp.StatusCode != 404 {
		t.Errorf("summary listener at /: status %d, want 404", resp.StatusCode)
	}
	// An origin not configured is refused at once.
	if resp, _ := getURL(t, bottom.url+"/x?cacheHostOrigin=www.example.com"); resp.StatusCode != 403 {
		t.Errorf("an unconfigured origin: status %d, want 403", resp.StatusCode)
	}
}

// TestMCCRunStopsOnAWrongVariableWithOneLine runs `caddy mcc run` with a
// size that is no number: it must not start, and say so in one line.
func TestMCCRunStopsOnAWrongVariableWithOneLine(t *testing.T) {
	root := driveRoot(t, 1)
	cmd := helperCmd(t, map[string]string{"STORAGE_1_SIZE_GB": "ten"}, "mcc", "run", "--drive-root", root, "--listen", "127.0.0.1:0")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		t.Fatal("started with STORAGE_1_SIZE_GB=ten")
	}
	// The test binary's own framing ("PASS", "ok") goes to stdout.
	want := `Error: caddy-mcc: STORAGE_1_SIZE_GB: "ten" is not a whole number of gigabytes` + "\n"
	if stderr.String() != want {
		t.Errorf("stderr %q, want %q", stderr.String(), want)
	}
}

// TestMCCRunPrintConfigPrintsTheTranslation runs the subcommand with
// --print-config: it prints caddyfileFromEnv's text for the process
// environment and returns.
func TestMCCRunPrintConfigPrintsTheTranslation(t *testing.T) {
	root := driveRoot(t, 2)
	env := map[string]string{"STORAGE_1_SIZE_GB": "10", "STORAGE_2_SIZE_GB": "20", "UPSTREAM_HOST": "parent.local", "CACHE_NODE_ID": "floor-2"}
	for k, v := range env {
		t.Setenv(k, v)
	}
	cmd := newRunCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"--print-config", "--drive-root", root})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	want, err := caddyfileFromEnv(env, envOpts(root))
	if err != nil {
		t.Fatal(err)
	}
	if out.String() != want {
		t.Errorf("printed:\n%s\nwant:\n%s", out.String(), want)
	}
	if !strings.Contains(want, "drive "+filepath.Join(root, "cache2")+" 20GiB") {
		t.Errorf("no drive line for cache2:\n%s", want)
	}
}
