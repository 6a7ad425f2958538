package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// server is one HTTP server under test, run as its own process.
type server struct {
	name   string
	url    string // http://127.0.0.1:port
	query  string // appended to object paths, e.g. "?cacheHostOrigin=origin.bench"
	cmd    *exec.Cmd
	config string // the configuration it ran with, for the report
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s *server) start(dir string, name string, args ...string) error {
	logf, err := os.Create(filepath.Join(dir, s.name+".log"))
	if err != nil {
		return err
	}
	s.cmd = command(name, args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return err
	}
	addr := strings.TrimPrefix(s.url, "http://")
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
	}
	b, _ := os.ReadFile(logf.Name())
	return fmt.Errorf("%s did not start listening on %s: %s", s.name, addr, b)
}

func (s *server) stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}
}

// caddyGlobals starts both Caddy configs.
const caddyGlobals = `{
	admin off
	auto_https off
	persist_config off
	storage file_system {{dir}}/caddy-data
	log {
		level ERROR
	}
}
`

// mccQuery names the origin on every request to caddy-mcc.
const mccQuery = "?cacheHostOrigin=origin.bench"

const caddyMCCConfig = caddyGlobals + `http://:{{port}} {
	bind 127.0.0.1
	mcc {
		dir {{dir}}/mcc
		origins origin.bench
		min_free 0
	}
	reverse_proxy {{origin}}
}
`

const caddyFileConfig = caddyGlobals + `http://:{{port}} {
	bind 127.0.0.1
	root * {{dir}}/static
	file_server
}
`

// nginxPrelude starts both nginx configs: run from the benchmark's own
// directory, never the system service's, with sendfile on.
const nginxPrelude = `user root;
worker_processes auto;
daemon off;
pid {{dir}}/nginx.pid;
error_log {{dir}}/error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	sendfile on;
	tcp_nopush on;
	keepalive_requests 100000;
	client_body_temp_path {{dir}}/client_temp;
	proxy_temp_path {{dir}}/proxy_temp;
	fastcgi_temp_path {{dir}}/fastcgi_temp;
	uwsgi_temp_path {{dir}}/uwsgi_temp;
	scgi_temp_path {{dir}}/scgi_temp;
`

// nginxSliceConfig is nginx's slice cache tuned as lancache and nginx's
// documentation advise: 1 MiB slices keyed by range, a cache lock with
// generous timeouts, keepalive to the origin, sendfile.
const nginxSliceConfig = "# nginx slice cache used by mccbench\n" + nginxPrelude + `	proxy_cache_path {{dir}}/cache levels=1:2 keys_zone=mcc:64m max_size=100g inactive=7d use_temp_path=off;
	upstream origin {
		server {{origin}};
		keepalive 64;
	}
	server {
		listen 127.0.0.1:{{port}};
		location / {
			slice 1m;
			proxy_cache mcc;
			proxy_cache_key $uri$is_args$args$slice_range;
			proxy_set_header Range $slice_range;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_cache_valid 200 206 7d;
			proxy_cache_lock on;
			proxy_cache_lock_timeout 1h;
			proxy_cache_lock_age 1h;
			proxy_ignore_client_abort on;
			proxy_pass http://origin;
		}
	}
}
`

const nginxStaticConfig = "# nginx serving the same bytes as static files\n" + nginxPrelude + `	server {
		listen 127.0.0.1:{{port}};
		root {{static}};
	}
}
`

func render(tmpl, dir string, port int, originAddr, static string) string {
	return strings.NewReplacer("{{dir}}", dir, "{{port}}", strconv.Itoa(port), "{{origin}}", originAddr, "{{static}}", static).Replace(tmpl)
}

// startCaddy runs the caddy binary with a Caddyfile from tmpl.
func startCaddy(name, caddyBin, tmpl, base, originAddr, query string) (*server, error) {
	dir := filepath.Join(base, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	cfg := render(tmpl, dir, port, originAddr, "")
	if tmpl == caddyFileConfig {
		cfg = strings.ReplaceAll(cfg, dir+"/static", filepath.Join(base, "static"))
	}
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	s := &server{name: name, url: fmt.Sprintf("http://127.0.0.1:%d", port), query: query, config: cfg}
	return s, s.start(dir, caddyBin, "run", "--config", path, "--adapter", "caddyfile")
}

// startNginx runs nginx from its own prefix and config, never the system
// service.
func startNginx(name, nginxBin, tmpl, base, originAddr string) (*server, error) {
	dir := filepath.Join(base, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	cfg := render(tmpl, dir, port, originAddr, filepath.Join(base, "static"))
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	s := &server{name: name, url: fmt.Sprintf("http://127.0.0.1:%d", port), config: cfg}
	return s, s.start(dir, nginxBin, "-p", dir, "-c", path, "-e", filepath.Join(dir, "error.log"))
}

// pids returns the server's processes: the one started and its children
// (nginx's workers).
func (s *server) pids() []int {
	root := s.cmd.Process.Pid
	out := []int{root}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == root {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := statFields(b)
		if len(f) > 3 {
			if ppid, _ := strconv.Atoi(f[3]); ppid == root {
				out = append(out, pid)
			}
		}
	}
	return out
}

// statFields splits /proc/pid/stat, whose second field may hold spaces.
func statFields(b []byte) []string {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return append([]string{"pid", "comm"}, strings.Fields(string(b[i+1:]))...)
}

var clockTicks = 100.0 // USER_HZ on Linux

// cpuSeconds returns the user+system CPU time of the server's processes.
func (s *server) cpuSeconds() float64 {
	var total float64
	for _, pid := range s.pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		f := statFields(b)
		if len(f) > 14 {
			u, _ := strconv.ParseFloat(f[13], 64)
			st, _ := strconv.ParseFloat(f[14], 64)
			total += (u + st) / clockTicks
		}
	}
	return total
}

// resetPeakRSS resets the kernel's peak RSS counters (VmHWM) of the
// server's processes.
func (s *server) resetPeakRSS() {
	for _, pid := range s.pids() {
		os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
	}
}

// peakRSS returns the sum of the server's processes' peak RSS in bytes.
func (s *server) peakRSS() int64 {
	var total int64
	for _, pid := range s.pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				total += kb << 10
			}
		}
	}
	return total
}
