// Command mccbench measures caddy-mcc against nginx's slice cache on this
// machine, side by side in one run, and prints a Markdown table.
//
// It builds (or takes) the project's Caddy binary, starts a deterministic
// origin, caddy-mcc, nginx with a tuned slice cache, and as references nginx
// and Caddy's file_server serving the same bytes as static files, all on
// loopback. Each scenario runs against every server in alternating order for
// several rounds; the table gives medians and the ratio caddy-mcc / nginx.
//
//	go run ./cmd/mccbench            # full run, several minutes
//	go run ./cmd/mccbench -quick     # every scenario, small, under a minute
package main

import (
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mccbench:", err)
		os.Exit(1)
	}
}

// sizes are a run's object sizes and durations.
type sizes struct {
	hitObject  int64         // scenarios 1-3
	herdObject int64         // scenario 4
	herdSize   int           // clients in the herd
	linear     int64         // scenario 5
	memObject  int64         // scenario 6
	memClients int           // scenario 6
	memTime    time.Duration // scenario 6, per phase
	loadTime   time.Duration // scenarios 1-3, per round and server
	rounds     int
	chain      int64 // chain
	wanOne     int64 // wan, the one device's object
	wanEach    int64 // wan, each of the ten devices' objects
	wanChain   int64 // wan, through three levels
	wanRounds  int   // wan, whose rounds take seconds per server
	abandon    int64 // abandon, each client's object
}

var full = sizes{
	hitObject: 256 << 20, herdObject: 64 << 20, herdSize: 100, linear: 64 << 20,
	memObject: 1 << 30, memClients: 200, memTime: 10 * time.Second,
	loadTime: 4 * time.Second, rounds: 3,
	// At 100 Mbit/s 128 MiB take 11 s and ten times 16 MiB 13 s per
	// server and round; nginx's slice cache takes about twice that.
	chain: 256 << 20, wanOne: 128 << 20, wanEach: 16 << 20, wanChain: 64 << 20, wanRounds: 2,
	abandon: 64 << 20,
}

var quick = sizes{
	hitObject: 16 << 20, herdObject: 8 << 20, herdSize: 20, linear: 8 << 20,
	memObject: 32 << 20, memClients: 20, memTime: 1 * time.Second,
	loadTime: 500 * time.Millisecond, rounds: 2,
	chain: 16 << 20, wanOne: 4 << 20, wanEach: 1 << 20, wanChain: 4 << 20, wanRounds: 2,
	abandon: 16 << 20,
}

// scenarios are the -scenarios names, in the order they run.
var scenarios = []string{"1", "2", "3", "4", "5", "6", "chain", "wan", "abandon"}

type bench struct {
	sz       sizes
	out      io.Writer
	base     string
	caddyBin string
	nginxBin string
	origin   *origin
	mcc      *server
	slice    *server
	static   *server
	fileSrv  *server
	// results by scenario row and server name: one value per round.
	results map[string]map[string][]float64
	notes   []string
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("mccbench", flag.ContinueOnError)
	caddyBin := fs.String("caddy", "", "caddy binary with caddy-mcc (default: go build ./cmd/caddy)")
	nginxBin := fs.String("nginx", "/usr/sbin/nginx", "nginx binary (Debian's, with the slice module)")
	quickMode := fs.Bool("quick", false, "run every scenario small, in under a minute")
	pin := fs.Bool("pin", false, "run the servers on half the CPUs and the origin, links and clients on the other half (with taskset), as if the gateway were a machine of its own")
	rounds := fs.Int("rounds", 0, "rounds per scenario (default 3, quick 2)")
	keep := fs.Bool("keep", false, "keep the temporary directory")
	hitMiB := fs.Int64("hit-mib", 0, "object size for the hit scenarios 1-3, MiB (default 256, quick 16)")
	memMiB := fs.Int64("mem-mib", 0, "object size for the memory scenario 6, MiB (default 1024, quick 32)")
	only := fs.String("scenarios", strings.Join(scenarios, ","), "comma-separated scenarios to run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *pin && !pinned() {
		return runPinned(args, out)
	}
	b := &bench{sz: full, out: out, results: map[string]map[string][]float64{}}
	if *quickMode {
		b.sz = quick
	}
	if *rounds > 0 {
		b.sz.rounds, b.sz.wanRounds = *rounds, *rounds
	}
	if *hitMiB > 0 {
		b.sz.hitObject = *hitMiB << 20
	}
	if *memMiB > 0 {
		b.sz.memObject = *memMiB << 20
	}
	want := map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		s = strings.TrimSpace(s)
		if !slices.Contains(scenarios, s) {
			return fmt.Errorf("unknown scenario %q; the scenarios are %s", s, strings.Join(scenarios, ","))
		}
		want[s] = true
	}
	base, err := os.MkdirTemp("", "mccbench-")
	if err != nil {
		return err
	}
	b.base = base
	if !*keep {
		defer os.RemoveAll(base)
	}
	if *caddyBin == "" {
		*caddyBin = filepath.Join(base, "caddy")
		fmt.Fprintln(os.Stderr, "building ./cmd/caddy ...")
		cmd := exec.Command("go", "build", "-o", *caddyBin, "github.com/caddy-mcc/caddy-mcc/cmd/caddy")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building caddy (run inside the module, or pass -caddy): %w", err)
		}
	}
	b.caddyBin, b.nginxBin = *caddyBin, *nginxBin
	if b.origin, err = startOrigin(0); err != nil {
		return err
	}
	hitName := fmt.Sprintf("hit-%d", b.sz.hitObject)
	if err := writeStatic(base, hitName, b.sz.hitObject); err != nil {
		return err
	}
	if b.mcc, err = startCaddy("caddy-mcc", *caddyBin, caddyMCCConfig, base, b.origin.addr, mccQuery); err != nil {
		return err
	}
	defer b.mcc.stop()
	if b.slice, err = startNginx("nginx-slice", *nginxBin, nginxSliceConfig, base, b.origin.addr); err != nil {
		return err
	}
	defer b.slice.stop()
	if b.static, err = startNginx("nginx-static", *nginxBin, nginxStaticConfig, base, b.origin.addr); err != nil {
		return err
	}
	defer b.static.stop()
	if b.fileSrv, err = startCaddy("caddy-file_server", *caddyBin, caddyFileConfig, base, b.origin.addr, ""); err != nil {
		return err
	}
	defer b.fileSrv.stop()

	fmt.Fprintln(os.Stderr, "warming and verifying caches ...")
	c, _ := objectFor("/obj/" + hitName)
	wantSum := contentSum(c)
	for _, s := range []*server{b.mcc, b.slice, b.static, b.fileSrv} {
		got, n, err := download(newClient(1), s.url+"/obj/"+hitName+s.query)
		if err != nil || got != wantSum {
			return fmt.Errorf("%s served %d bytes with SHA-256 %s, want %s (%v)", s.name, n, got, wantSum, err)
		}
	}
	// A second pass so nginx's slice cache has every slice from disk.
	download(newClient(1), b.slice.url+"/obj/"+hitName)

	hitServers := []*server{b.mcc, b.slice, b.static, b.fileSrv}
	if want["1"] {
		fmt.Fprintln(os.Stderr, "1: hit, 1 MiB ranges ...")
		b.scenarioRanges("1", hitServers, hitName, 1<<20, 8)
	}
	if want["2"] {
		fmt.Fprintln(os.Stderr, "2: hit, 4 KiB ranges ...")
		b.scenarioRanges("2", hitServers, hitName, 4<<10, 32)
	}
	if want["3"] {
		fmt.Fprintln(os.Stderr, "3: hit, whole object ...")
		b.scenarioWhole(hitServers, hitName)
	}
	if want["4"] {
		fmt.Fprintln(os.Stderr, "4: cold herd ...")
		if err := b.scenarioHerd(); err != nil {
			return err
		}
	}
	if want["5"] {
		fmt.Fprintln(os.Stderr, "5: cold linear, 20 ms origin latency ...")
		if err := b.scenarioLinear(); err != nil {
			return err
		}
	}
	if want["6"] {
		fmt.Fprintln(os.Stderr, "6: memory ...")
		b.scenarioMemory()
	}
	if want["chain"] {
		fmt.Fprintln(os.Stderr, "chain: cold linear through three levels ...")
		if err := b.scenarioChain(); err != nil {
			return err
		}
	}
	if want["wan"] {
		fmt.Fprintln(os.Stderr, "wan: cold over a 100 ms, 100 Mbit/s link ...")
		if err := b.scenarioWAN(); err != nil {
			return err
		}
	}
	if want["abandon"] {
		fmt.Fprintln(os.Stderr, "abandon: clients that leave after the headers ...")
		b.scenarioAbandon()
	}
	b.report()
	return nil
}

func writeStatic(base, name string, size int64) error {
	dir := filepath.Join(base, "static", "obj")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	c, _ := objectFor("/obj/" + name)
	if _, err := io.Copy(f, io.NewSectionReader(c, 0, size)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func (b *bench) record(row, server string, v float64) {
	if b.results[row] == nil {
		b.results[row] = map[string][]float64{}
	}
	b.results[row][server] = append(b.results[row][server], v)
}

// alternate returns the servers in round r's order: A B A B, then B A B A.
func alternate(servers []*server, r int) []*server {
	out := append([]*server(nil), servers...)
	if r%2 == 1 {
		for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
			out[i], out[j] = out[j], out[i]
		}
	}
	return out
}

// scenarioRanges: random ranges of n bytes, half block-aligned, half not.
func (b *bench) scenarioRanges(id string, servers []*server, name string, n int64, clients int) {
	size := b.sz.hitObject
	for r := 0; r < b.sz.rounds; r++ {
		for _, s := range alternate(servers, r) {
			url := s.url + "/obj/" + name + s.query
			res := runLoad(s, clients, b.sz.loadTime, func(rnd *rand.Rand) request {
				var off int64
				if rnd.IntN(2) == 0 {
					off = rnd.Int64N(size/(1<<20)) << 20
				} else {
					off = rnd.Int64N(size - n)
				}
				off = min(off, size-n)
				return request{url: url, rng: fmt.Sprintf("bytes=%d-%d", off, off+n-1), wantLen: n}
			})
			b.record(id+" req/s", s.name, res.rps())
			b.record(id+" MB/s", s.name, res.mbps())
			b.record(id+" p50 ms", s.name, ms(percentile(res.latency, 0.5)))
			b.record(id+" p99 ms", s.name, ms(percentile(res.latency, 0.99)))
			b.record(id+" CPU s/GB", s.name, res.cpuPerGB())
			b.record(id+" errors", s.name, float64(res.errors))
		}
	}
}

func (b *bench) scenarioWhole(servers []*server, name string) {
	for r := 0; r < b.sz.rounds; r++ {
		for _, s := range alternate(servers, r) {
			url := s.url + "/obj/" + name + s.query
			res := runLoad(s, 4, b.sz.loadTime, func(*rand.Rand) request {
				return request{url: url, wantLen: b.sz.hitObject}
			})
			b.record("3 MB/s", s.name, res.mbps())
			b.record("3 CPU s/GB", s.name, res.cpuPerGB())
			b.record("3 errors", s.name, float64(res.errors))
		}
	}
}

func (b *bench) scenarioHerd() error {
	for r := 0; r < b.sz.rounds; r++ {
		for _, s := range alternate([]*server{b.mcc, b.slice}, r) {
			name := fmt.Sprintf("herd-%s-%d-%d", s.name, r, b.sz.herdObject)
			sent0 := b.origin.sent.Load()
			res := runHerd(s.url+"/obj/"+name+s.query, b.sz.herdSize, b.sz.herdObject)
			ratio := float64(b.origin.sent.Load()-sent0) / float64(b.sz.herdObject)
			b.record("4 origin bytes / object", s.name, ratio)
			if len(res.ttfb) > 0 {
				b.record("4 leader TTFB ms", s.name, ms(res.ttfb[0]))
				waiters := res.ttfb[1:]
				b.record("4 waiter TTFB p50 ms", s.name, ms(percentile(waiters, 0.5)))
				b.record("4 waiter TTFB p99 ms", s.name, ms(percentile(waiters, 0.99)))
			}
			b.record("4 total s", s.name, res.total.Seconds())
			b.record("4 errors", s.name, float64(res.errors))
			// The same herd again, now all hits: the part of the waiters'
			// tail that is the machine serving n downloads at once rather
			// than waiting on a fill.
			hit := runHerd(s.url+"/obj/"+name+s.query, b.sz.herdSize, b.sz.herdObject)
			if len(hit.ttfb) > 1 {
				b.record("4 same herd as hits: waiter TTFB p99 ms", s.name, ms(percentile(hit.ttfb[1:], 0.99)))
			}
			b.record("4 errors", s.name, float64(hit.errors))
		}
	}
	return nil
}

func (b *bench) scenarioLinear() error {
	b.origin.latency.Store(int64(20 * time.Millisecond))
	defer b.origin.latency.Store(0)
	direct := &server{name: "direct", url: "http://" + b.origin.addr}
	for r := 0; r < b.sz.rounds; r++ {
		for _, s := range alternate([]*server{b.mcc, b.slice, direct}, r) {
			mbps, err := coldDownload(s, fmt.Sprintf("linear-%s-%d-%d", s.name, r, b.sz.linear))
			if err != nil {
				return err
			}
			b.record("5 MB/s", s.name, mbps)
		}
	}
	return nil
}

// coldDownload downloads the object name (new to s) whole through s, checks
// its SHA-256, and returns MB/s.
func coldDownload(s *server, name string) (float64, error) {
	return coldDownloads(s, []string{name})
}

func (b *bench) scenarioMemory() {
	for _, s := range []*server{b.mcc, b.slice} {
		name := fmt.Sprintf("mem-%s-%d", s.name, b.sz.memObject)
		url := s.url + "/obj/" + name + s.query
		cold, errs := runMemory(s, url, b.sz.memClients, b.sz.memTime)
		b.record("6 peak RSS MB, cold fill", s.name, float64(cold)/1e6)
		// Let the fill finish, then the hit phase reads the stored object.
		download(newClient(1), url)
		hit, errs2 := runMemory(s, url, b.sz.memClients, b.sz.memTime)
		b.record("6 peak RSS MB, hit", s.name, float64(hit)/1e6)
		b.record("6 errors", s.name, float64(errs+errs2))
	}
}

// quiesce writes back every dirty page before a timed download, so that
// the page cache the previous download left (a cache's stored object) is
// not written back during the next one, whichever server that is.
func quiesce() { syscall.Sync() }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// rows are the table's rows in order, with their targets.
var rows = []struct{ key, target string }{
	{"1 req/s", "≥ 1.1× slice, ≥ 0.9× static"},
	{"1 MB/s", "≥ 1.1× slice, ≥ 0.9× static"},
	{"1 CPU s/GB", "≤ 1.5× slice"},
	{"2 req/s", "≥ 1.0× slice"},
	{"2 p50 ms", ""},
	{"2 p99 ms", ""},
	{"2 CPU s/GB", "≤ 1.5× slice"},
	{"3 MB/s", "≥ 1.0× slice, ≥ 0.9× static"},
	{"3 CPU s/GB", "≤ 1.5× slice"},
	{"4 origin bytes / object", "= 1.00"},
	{"4 leader TTFB ms", ""},
	{"4 waiter TTFB p50 ms", ""},
	{"4 waiter TTFB p99 ms", "≤ leader + 50 ms"},
	{"4 same herd as hits: waiter TTFB p99 ms", "(reference)"},
	{"4 total s", ""},
	{"5 MB/s", "≥ 0.9× direct in every round"},
	{"6 peak RSS MB, cold fill", "≤ 150"},
	{"6 peak RSS MB, hit", "≤ 150"},
	{"chain MB/s", "≥ 0.85× direct"},
	{"wan 1 device, × link", "≥ 0.95× link"},
	{wanDevicesRow, "≥ 0.95× link"},
	{"wan chain, × link", "≥ 0.95× link"},
	{"abandon origin MiB / request", "≤ 2 MiB"},
}

func (b *bench) report() {
	w := b.out
	pinned := ""
	if serverCPUs != "" {
		pinned = fmt.Sprintf(", servers pinned to CPUs %s, origin, links and clients to CPUs %s", serverCPUs, benchCPUs)
	}
	fmt.Fprintf(w, "## mccbench results (%s, %d rounds, medians%s)\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"), b.sz.rounds, pinned)
	fmt.Fprintln(w, "| scenario / metric | caddy-mcc | nginx slice | mcc / slice | nginx static | mcc / static | Caddy file_server | direct | target |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---|")
	cell := func(row, srv string) (float64, string) {
		v, ok := b.results[row][srv]
		if !ok {
			return 0, ""
		}
		m := median(v)
		return m, fmt.Sprintf("%.2f", m)
	}
	ratio := func(a, c float64, ok bool) string {
		if !ok || c == 0 {
			return ""
		}
		return fmt.Sprintf("%.2f×", a/c)
	}
	for _, r := range rows {
		m, ms := cell(r.key, "caddy-mcc")
		s, ss := cell(r.key, "nginx-slice")
		st, sts := cell(r.key, "nginx-static")
		_, fs := cell(r.key, "caddy-file_server")
		d, ds := cell(r.key, "direct")
		mcStatic := ratio(m, st, sts != "")
		if d != 0 {
			mcStatic = "" // the direct column has the reference instead
		}
		dc := withRatio(ds, b.results[r.key]["caddy-mcc"], b.results[r.key]["direct"])
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.key, ms, ss, ratio(m, s, ss != "" && ms != ""), sts, mcStatic, fs, dc, r.target)
	}
	var errs []string
	for row, bySrv := range b.results {
		if strings.HasSuffix(row, "errors") {
			for srv, v := range bySrv {
				if t := sum(v); t > 0 {
					errs = append(errs, fmt.Sprintf("%s: %s had %.0f failed requests", row, srv, t))
				}
			}
		}
	}
	sort.Strings(errs)
	fmt.Fprintln(w)
	if len(errs) == 0 {
		fmt.Fprintln(w, "No failed requests.")
	}
	for _, e := range errs {
		fmt.Fprintln(w, "- "+e)
	}
	fmt.Fprintf(w, "\nObjects: hit %d MiB, herd %d MiB × %d clients, linear %d MiB, memory %d MiB × %d clients for %s per phase, "+
		"chain %d MiB, wan %d MiB, %d × %d MiB and %d MiB through three levels (%d rounds), abandon %d MiB × %d clients.\n",
		b.sz.hitObject>>20, b.sz.herdObject>>20, b.sz.herdSize, b.sz.linear>>20, b.sz.memObject>>20, b.sz.memClients, b.sz.memTime,
		b.sz.chain>>20, b.sz.wanOne>>20, wanDevices, b.sz.wanEach>>20, b.sz.wanChain>>20, b.sz.wanRounds, b.sz.abandon>>20, abandonClients)
	fmt.Fprintf(w, "\nThe direct column's (mcc …×, min …×) is caddy-mcc's ratio to direct: the median and the lowest over rounds, each round's run against that round's direct run. "+
		"chain: origin +%s per request, levels bottom → middle → top → origin, each hop between levels a loopback link delaying %s each way. "+
		"wan: the origin behind a loopback link delaying %s each way, %d Mbit/s shared by all connections; figures are achieved throughput / link rate; wan chain: three levels as in chain, the top's misses over that link.\n",
		chainLatency, hopDelay, wanDelay, wanRate*8/1e6)
	for _, n := range b.notes {
		fmt.Fprintln(w, "\n"+n)
	}
	fmt.Fprintf(w, "\n<details><summary>every round</summary>\n\n")
	for _, r := range rows {
		for _, srv := range []string{"caddy-mcc", "nginx-slice", "nginx-static", "caddy-file_server", "direct"} {
			if v, ok := b.results[r.key][srv]; ok {
				fmt.Fprintf(w, "- %s, %s: %s\n", r.key, srv, rounds(v))
			}
		}
	}
	fmt.Fprintln(w, "</details>")
	fmt.Fprintf(w, "\n<details><summary>nginx slice configuration</summary>\n\n```nginx\n%s```\n</details>\n", b.slice.config)
	fmt.Fprintf(w, "\n<details><summary>caddy-mcc configuration</summary>\n\n```caddyfile\n%s```\n</details>\n", b.mcc.config)
}

// withRatio shows the direct value and caddy-mcc's ratio to it: the median
// and the lowest of the rounds' ratios, each of caddy-mcc's rounds against
// the same round's direct run.
func withRatio(ds string, mcc, direct []float64) string {
	if ds == "" || len(mcc) == 0 || len(mcc) != len(direct) {
		return ds
	}
	r := make([]float64, len(mcc))
	for i := range mcc {
		if direct[i] == 0 {
			return ds
		}
		r[i] = mcc[i] / direct[i]
	}
	return fmt.Sprintf("%s (mcc %.2f×, min %.2f×)", ds, median(r), slices.Min(r))
}

// rounds formats a row's values in the order the rounds ran.
func rounds(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(s, ", ")
}

func sum(v []float64) (t float64) {
	for _, x := range v {
		t += x
	}
	return t
}
