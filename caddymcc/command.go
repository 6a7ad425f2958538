package caddymcc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "mcc",
		Usage: "stats|prefetch|run [--address <interface>]",
		Short: "Shows a cache's summary, warms the cache, or runs it from MCC's environment",
		Long: `
Talks to the mcc routes of a running Caddy's admin API.

  caddy mcc stats [--dir <store>] [--json]
      prints the summary of a cache: hit and miss bytes, hit ratio for the
      store's lifetime and the last period, objects and bytes stored.

  caddy mcc prefetch --file <urls.txt> [--concurrency <n>]
      downloads every URL of the file (one a line; blank lines and lines
      starting with # are skipped) through the gateway, so that later
      downloads are hits. The URLs must point at the gateway itself, in
      the form http://<gateway>/<path>?cacheHostOrigin=<origin>.
      Exits with status 1 if any URL failed.

  caddy mcc run [--print-config] [--drive-root /nginx] [--listen :8081]
      runs the cache configured from the environment variables of
      Microsoft Connected Cache's IoT Edge module (see README, "Deploy on
      IoT Edge"); --print-config prints the generated Caddyfile instead.

The admin API address is taken from --address, or from the config given
with --config, or else is the default, ` + caddy.DefaultAdminListen + `.`,
		CobraFunc: func(cmd *cobra.Command) {
			stats := &cobra.Command{
				Use:   "stats",
				Short: "Prints the summary of a cache",
				Args:  cobra.NoArgs,
				RunE:  cmdStats,
			}
			stats.Flags().String("dir", "", "Store directory (default: the only store in use)")
			stats.Flags().Bool("json", false, "Print the summary as JSON")
			prefetch := &cobra.Command{
				Use:   "prefetch --file <path>",
				Short: "Downloads URLs through the gateway to fill the cache",
				Args:  cobra.NoArgs,
				RunE:  cmdPrefetch,
			}
			prefetch.Flags().StringP("file", "f", "", "File of URLs, one a line (- for standard input)")
			prefetch.Flags().Int("concurrency", defaultPrefetchConcurrency, "URLs fetched at once")
			for _, c := range []*cobra.Command{stats, prefetch} {
				c.Flags().String("address", "", "Address of the administration API listener (if --config is not used)")
				c.Flags().StringP("config", "c", "", "Configuration file (if --address is not used)")
				c.Flags().StringP("adapter", "a", "", "Name of config adapter to apply (if --config is used)")
			}
			cmd.AddCommand(stats, prefetch, newRunCommand())
		},
	})
}

// adminAddress finds the admin API from the command's flags.
func adminAddress(cmd *cobra.Command) (string, error) {
	fl := cmd.Flags()
	addr, _ := fl.GetString("address")
	config, _ := fl.GetString("config")
	adapter, _ := fl.GetString("adapter")
	a, err := caddycmd.DetermineAdminAPIAddress(addr, nil, config, adapter)
	if err != nil {
		return "", fmt.Errorf("finding the admin API: %w", err)
	}
	return a, nil
}

func cmdStats(cmd *cobra.Command, _ []string) error {
	cmd.SilenceUsage = true
	addr, err := adminAddress(cmd)
	if err != nil {
		return err
	}
	dir, _ := cmd.Flags().GetString("dir")
	asJSON, _ := cmd.Flags().GetBool("json")
	uri := "/mcc/summary"
	if dir != "" {
		uri += "?dir=" + url.QueryEscape(dir)
	}
	resp, err := caddycmd.AdminAPIRequest(addr, http.MethodGet, uri, http.Header{"Accept": {"application/json"}}, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if asJSON {
		_, err := out.Write(body)
		return err
	}
	var s summary
	if err := json.Unmarshal(body, &s); err != nil {
		return fmt.Errorf("decoding the summary: %w", err)
	}
	return printSummary(out, s)
}

// printSummary writes s for a reader: one quantity a line.
func printSummary(w io.Writer, s summary) error {
	b := &bytes.Buffer{}
	line := func(name, format string, args ...any) {
		fmt.Fprintf(b, "%-18s "+format+"\n", append([]any{name}, args...)...)
	}
	ib := func(n int64) string { return humanize.IBytes(uint64(max(0, n))) }
	pct := func(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) }
	line("store", "%s", s.Dir)
	line("since", "%s", s.Since.Local().Format("2006-01-02 15:04:05"))
	line("", "%-14s %s", "lifetime", fmt.Sprintf("last %.0fs", s.Period.Seconds))
	line("hit ratio", "%-14s %s", pct(s.HitRatioBytes), pct(s.Period.HitRatioBytes))
	line("hit bytes", "%-14s %s", ib(s.HitBytes), ib(s.Period.HitBytes))
	line("miss bytes", "%-14s %s", ib(s.MissBytes), ib(s.Period.MissBytes))
	line("egress bytes", "%-14s %s", ib(s.EgressBytes), ib(s.Period.EgressBytes))
	line("upstream bytes", "%s", ib(s.UpstreamBytes))
	line("upstream errors", "%d", s.UpstreamErrors)
	line("requests", "hit %d, partial %d, miss %d, error %d, bypass %d",
		s.Requests["hit"], s.Requests["partial"], s.Requests["miss"], s.Requests["error"], s.Requests["bypass"])
	line("objects", "%d", s.Objects)
	maxSize := "no cap"
	if s.MaxSize > 0 {
		maxSize = ib(s.MaxSize)
	}
	line("bytes on disk", "%s of %s", ib(s.BytesOnDisk), maxSize)
	line("evictions", "%d", s.Evictions)
	line("fills in flight", "%d", s.FillsInFlight)
	_, err := w.Write(b.Bytes())
	return err
}

func cmdPrefetch(cmd *cobra.Command, _ []string) error {
	cmd.SilenceUsage = true
	addr, err := adminAddress(cmd)
	if err != nil {
		return err
	}
	file, _ := cmd.Flags().GetString("file")
	concurrency, _ := cmd.Flags().GetInt("concurrency")
	if file == "" {
		return fmt.Errorf("--file is required")
	}
	urls, err := readURLs(file, cmd.InOrStdin())
	if err != nil {
		return err
	}
	if len(urls) == 0 {
		return fmt.Errorf("%s lists no URLs", file)
	}
	body, err := json.Marshal(prefetchRequest{URLs: urls, Concurrency: concurrency})
	if err != nil {
		return err
	}
	resp, err := caddycmd.AdminAPIRequest(addr, http.MethodPost, "/mcc/prefetch", nil, bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out := cmd.OutOrStdout()
	p := &progress{w: out, total: len(urls), tty: isTerminal(out)}
	dec := json.NewDecoder(resp.Body)
	for {
		var res prefetchResult
		if err := dec.Decode(&res); err == io.EOF {
			break
		} else if err != nil {
			return fmt.Errorf("reading prefetch results: %w", err)
		}
		p.add(res)
	}
	p.finish()
	switch {
	case p.done < p.total:
		return fmt.Errorf("prefetch ended after %d of %d URLs", p.done, p.total)
	case p.failed > 0:
		return fmt.Errorf("%d of %d URLs failed", p.failed, p.total)
	}
	return nil
}

// readURLs reads a URL list: one a line, blank lines and # comments
// skipped.
func readURLs(file string, stdin io.Reader) ([]string, error) {
	var r io.Reader = stdin
	if file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	var urls []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		urls = append(urls, line)
	}
	return urls, sc.Err()
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progress reports prefetch results: on a terminal, a bar redrawn in place
// with failures printed above it; otherwise one plain line per URL.
type progress struct {
	w                   io.Writer
	tty                 bool
	total, done, failed int
	bytes               int64
}

const barWidth = 30

func (p *progress) add(r prefetchResult) {
	p.done++
	p.bytes += r.Bytes
	if r.Error != "" {
		p.failed++
	}
	if !p.tty {
		state := "ok"
		if r.Error != "" {
			state = "FAILED"
		}
		fmt.Fprintf(p.w, "%d/%d %s %s %d %s", p.done, p.total, state, r.URL, r.Status, humanize.IBytes(uint64(r.Bytes)))
		if r.CacheStatus != "" {
			fmt.Fprintf(p.w, " (%s)", r.CacheStatus)
		}
		if r.Error != "" {
			fmt.Fprintf(p.w, ": %s", r.Error)
		}
		fmt.Fprintln(p.w)
		return
	}
	if r.Error != "" {
		// Clear the bar's line, print the failure, then redraw.
		fmt.Fprintf(p.w, "\r\x1b[KFAILED %s: %s\n", r.URL, r.Error)
	}
	p.draw()
}

func (p *progress) draw() {
	filled := barWidth * p.done / max(1, p.total)
	fmt.Fprintf(p.w, "\r\x1b[K[%s%s] %d/%d URLs, %s",
		strings.Repeat("#", filled), strings.Repeat(".", barWidth-filled), p.done, p.total, humanize.IBytes(uint64(p.bytes)))
	if p.failed > 0 {
		fmt.Fprintf(p.w, ", %d failed", p.failed)
	}
}

func (p *progress) finish() {
	if p.tty {
		p.draw()
		fmt.Fprintln(p.w)
		return
	}
	fmt.Fprintf(p.w, "prefetched %d of %d URLs, %s; %d failed\n", p.done-p.failed, p.total, humanize.IBytes(uint64(p.bytes)), p.failed)
}
