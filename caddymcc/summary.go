package caddymcc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"mime"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	caddy.RegisterModule(Summary{})
	httpcaddyfile.RegisterHandlerDirective("mcc_summary", parseSummaryCaddyfile)
	// Where Caddy's own `metrics` page goes: after auth and encode, and
	// before mcc, so that `mcc_summary /summary` can share a site with the
	// cache without mcc refusing the path.
	httpcaddyfile.RegisterDirectiveOrder("mcc_summary", httpcaddyfile.Before, "metrics")
}

// Summary answers with a summary of a cache, like Microsoft Connected
// Cache's summary page and with its field names: the bytes sent to clients
// from disk (`hitBytes`) and fetched for them (`missBytes`), their sum
// (`egressBytes`) and `hitRatioBytes`, for the lifetime of the store and
// for the last 15-second period; and what the store holds. A byte counts as
// a hit when it was on disk when the request needed it. Lifetime totals are
// kept in the store directory and survive restarts.
//
// The answer is JSON, or, when the client asks for `text/html`, a small page
// with a chart of the hit ratio and egress over the last hour. A `format`
// query parameter (`json` or `html`) overrides the Accept header. The admin
// API gives the same answer at `GET /mcc/summary`.
type Summary struct {
	// Dir names the store to summarise, as the `dir` of an mcc handler.
	// Default: the only store in use; with several, the one in Caddy's
	// default directory, or else the first by path.
	Dir string `json:"dir,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Summary) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mcc_summary",
		New: func() caddy.Module { return new(Summary) },
	}
}

// ServeHTTP implements caddyhttp.MiddlewareHandler. It answers every
// request itself.
func (s *Summary) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
	}
	if err := writeSummary(w, r, s.Dir); err != nil {
		var oe opError
		if errors.As(err, &oe) {
			return caddyhttp.Error(oe.status, oe.err)
		}
		return err
	}
	return nil
}

func parseSummaryCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	s := new(Summary)
	err := s.UnmarshalCaddyfile(h.Dispenser)
	return s, err
}

// UnmarshalCaddyfile sets up the summary handler from Caddyfile tokens.
// Syntax:
//
//	mcc_summary [<matcher>] {
//	    dir <path>    # default: the only store in use
//	}
//
// It answers every request it matches, so give it a site or a path of its
// own: `:5001 { mcc_summary }`, or `mcc_summary /summary` next to `mcc`.
func (s *Summary) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "dir":
			if !d.NextArg() {
				return d.ArgErr()
			}
			s.Dir = d.Val()
		default:
			return d.Errf("unknown mcc_summary subdirective %q", d.Val())
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	return nil
}

// opError is an operation's failure and the HTTP status that answers it;
// the summary handler and the admin API each turn it into their own error
// type.
type opError struct {
	status int
	err    error
}

func (e opError) Error() string { return e.err.Error() }
func (e opError) Unwrap() error { return e.err }

// findCache returns the open cache of store directory dir, or, for "",
// the only one in use; with several, the one in Caddy's default directory,
// or else the first by path. It waits for the store to open.
func findCache(ctx context.Context, dir string) (*cache, error) {
	found := cachesInUse()
	var c *cache
	if dir != "" {
		abs, err := filepath.Abs(dir)
		if err != nil {
			return nil, opError{http.StatusBadRequest, err}
		}
		for _, f := range found {
			if f.dir == abs {
				c = f
			}
		}
		if c == nil {
			return nil, opError{http.StatusNotFound, fmt.Errorf("no mcc handler uses store %s", abs)}
		}
	} else {
		if len(found) == 0 {
			return nil, opError{http.StatusServiceUnavailable, errors.New("no mcc handler is configured")}
		}
		c = found[0]
		def := filepath.Join(caddy.AppDataDir(), "mcc")
		for _, f := range found {
			if f.dir == def {
				c = f
			}
		}
	}
	if _, err := c.wait(ctx); err != nil {
		if ctx.Err() != nil {
			return nil, err
		}
		return nil, opError{http.StatusServiceUnavailable, fmt.Errorf("store %s is not open: %w", c.dir, err)}
	}
	select {
	case <-c.ledger().ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return c, nil
}

// summary is the answer of the summary page. The byte counts carry MCC's
// names; the rest follows Caddy's JSON style.
type summary struct {
	Dir  string    `json:"dir"`
	Time time.Time `json:"time"`
	// Since is when the lifetime totals began.
	Since time.Time `json:"since"`
	byteSummary
	Period   periodSummary    `json:"period"`
	Requests map[string]int64 `json:"requests"`

	Objects        int   `json:"objects"`
	BytesOnDisk    int64 `json:"bytes_on_disk"`
	MaxSize        int64 `json:"max_size"`
	Evictions      int64 `json:"evictions"`
	FillsInFlight  int64 `json:"fills_in_flight"`
	UpstreamErrors int64 `json:"upstream_errors"`
	UpstreamBytes  int64 `json:"upstream_bytes"`
}

// byteSummary are MCC's byte counts.
type byteSummary struct {
	HitBytes      int64   `json:"hitBytes"`
	MissBytes     int64   `json:"missBytes"`
	EgressBytes   int64   `json:"egressBytes"`
	HitRatioBytes float64 `json:"hitRatioBytes"`
}

func newByteSummary(hit, miss int64) byteSummary {
	b := byteSummary{HitBytes: hit, MissBytes: miss, EgressBytes: hit + miss}
	if b.EgressBytes > 0 {
		b.HitRatioBytes = float64(hit) / float64(b.EgressBytes)
	}
	return b
}

// periodSummary is the byte counts of the last whole period.
type periodSummary struct {
	Start   time.Time `json:"start"`
	End     time.Time `json:"end"`
	Seconds float64   `json:"seconds"`
	byteSummary
}

// summary reads the cache's summary. The store must be open and the ledger
// ready.
func (c *cache) summary(now time.Time) summary {
	t := c.totals()
	from, to := c.lastPeriod(now)
	st := c.store.Stats()
	return summary{
		Dir:         c.dir,
		Time:        now.UTC(),
		Since:       t.Since,
		byteSummary: newByteSummary(t.HitBytes, t.MissBytes),
		Period: periodSummary{
			Start:       from.at.UTC(),
			End:         to.at.UTC(),
			Seconds:     to.at.Sub(from.at).Seconds(),
			byteSummary: newByteSummary(to.hit-from.hit, to.miss-from.miss),
		},
		Requests:       t.Requests,
		Objects:        st.Objects,
		BytesOnDisk:    st.BytesPresent,
		MaxSize:        st.MaxSize,
		Evictions:      t.Evictions,
		FillsInFlight:  c.stats.fillsInFlight.Load(),
		UpstreamErrors: t.UpstreamErrors,
		UpstreamBytes:  t.UpstreamBytes,
	}
}

// writeSummary answers r with the summary of store dir, as JSON or HTML.
func writeSummary(w http.ResponseWriter, r *http.Request, dir string) error {
	c, err := findCache(r.Context(), dir)
	if err != nil {
		return err
	}
	now := time.Now()
	s := c.summary(now)
	hdr := w.Header()
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("Vary", "Accept")
	if !wantsHTML(r) {
		hdr.Set("Content-Type", "application/json")
		if r.Method == http.MethodHead {
			return nil
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "\t")
		return enc.Encode(s)
	}
	hdr.Set("Content-Type", "text/html; charset=utf-8")
	hdr.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
	if r.Method == http.MethodHead {
		return nil
	}
	return summaryPage.Execute(w, newSummaryView(s, c.history(), c.stats.ledger.period, now))
}

// wantsHTML reports whether r asks for the HTML page: `?format=html`, or
// an Accept header that lists text/html at least as high as JSON.
func wantsHTML(r *http.Request) bool {
	switch r.URL.Query().Get("format") {
	case "html":
		return true
	case "json":
		return false
	}
	htmlQ, jsonQ := 0.0, 0.0
	for _, part := range strings.Split(r.Header.Get("Accept"), ",") {
		mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil {
			continue
		}
		q := 1.0
		if v, ok := params["q"]; ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				q = f
			}
		}
		switch mt {
		case "text/html":
			htmlQ = max(htmlQ, q)
		case "application/json":
			jsonQ = max(jsonQ, q)
		}
	}
	return htmlQ > 0 && htmlQ >= jsonQ
}

// summaryView is what the HTML page shows.
type summaryView struct {
	S                summary
	Lifetime, Period []row
	Store            []row
	Chart            chart
	Refresh          int
	PeriodLabel      string
}

type row struct{ Name, Value string }

// chart is the geometry of the page's SVG chart: the hit ratio of each
// period as a line over the upper panel, its egress as bars in the lower.
type chart struct {
	Width, RatioTop, RatioHeight, EgressTop, EgressHeight, Height int
	RatioPath                                                     string // SVG path data
	Bars                                                          []bar
	MaxEgress                                                     string
	Span, Ago                                                     string // "hour", "1 hour ago"
}

type bar struct{ X, Y, W, H string }

const (
	chartWidth   = 720
	ratioTop     = 20 // the 100% line, under its label
	ratioHeight  = 120
	egressTop    = 150
	egressHeight = 100
)

func newSummaryView(s summary, hist []sample, period time.Duration, now time.Time) summaryView {
	bytesRows := func(b byteSummary) []row {
		return []row{
			{"hitBytes", humanize.IBytes(uint64(b.HitBytes))},
			{"missBytes", humanize.IBytes(uint64(b.MissBytes))},
			{"egressBytes", humanize.IBytes(uint64(b.EgressBytes))},
			{"hitRatioBytes", fmt.Sprintf("%.1f%%", 100*b.HitRatioBytes)},
		}
	}
	maxSize := "none"
	if s.MaxSize > 0 {
		maxSize = humanize.IBytes(uint64(s.MaxSize))
	}
	return summaryView{
		S:        s,
		Lifetime: bytesRows(s.byteSummary),
		Period:   bytesRows(s.Period.byteSummary),
		Store: []row{
			{"objects", strconv.Itoa(s.Objects)},
			{"bytes on disk", humanize.IBytes(uint64(s.BytesOnDisk))},
			{"max_size", maxSize},
			{"evictions", strconv.FormatInt(s.Evictions, 10)},
			{"fills in flight", strconv.FormatInt(s.FillsInFlight, 10)},
			{"upstream errors", strconv.FormatInt(s.UpstreamErrors, 10)},
		},
		Chart:       newChart(hist, period, now),
		Refresh:     max(1, int(period/time.Second)),
		PeriodLabel: fmt.Sprintf("last %s", time.Duration(s.Period.Seconds*float64(time.Second)).Round(time.Second)),
	}
}

// newChart draws the periods of hist over the last historyLen periods,
// oldest at the left; periods without egress leave a gap in the line.
func newChart(hist []sample, period time.Duration, now time.Time) chart {
	ch := chart{
		Width: chartWidth, RatioTop: ratioTop, RatioHeight: ratioHeight,
		EgressTop: egressTop, EgressHeight: egressHeight, Height: egressTop + egressHeight + 10,
		Span: spanText(historyLen * period),
	}
	ch.Ago = "1 " + ch.Span + " ago"
	if strings.Contains(ch.Span, " ") {
		ch.Ago = ch.Span + " ago"
	}
	window := float64(historyLen * period)
	x := func(t time.Time) float64 {
		return chartWidth * (1 - float64(now.Sub(t))/window)
	}
	var maxEgress int64
	for i := 1; i < len(hist); i++ {
		maxEgress = max(maxEgress, hist[i].hit+hist[i].miss-hist[i-1].hit-hist[i-1].miss)
	}
	ch.MaxEgress = humanize.IBytes(uint64(maxEgress))
	var path strings.Builder
	pen := false
	for i := 1; i < len(hist); i++ {
		from, to := hist[i-1], hist[i]
		hit, egress := to.hit-from.hit, to.hit+to.miss-from.hit-from.miss
		x0, x1 := max(0, x(from.at)), x(to.at)
		if x1 <= 0 {
			continue
		}
		if egress <= 0 {
			pen = false
			continue
		}
		h := float64(egressHeight) * float64(egress) / float64(maxEgress)
		ch.Bars = append(ch.Bars, bar{f1(x0), f1(egressTop + egressHeight - h), f1(max(0.5, x1-x0)), f1(h)})
		y := ratioTop + float64(ratioHeight-ratioTop)*(1-float64(hit)/float64(egress))
		cmd := "L"
		if !pen {
			cmd = "M"
			pen = true
		}
		fmt.Fprintf(&path, "%s%s %s ", cmd, f1((x0+x1)/2), f1(y))
	}
	ch.RatioPath = strings.TrimSpace(path.String())
	return ch
}

// spanText names the chart's span for its labels: "hour", "2 hours",
// "30 minutes".
func spanText(d time.Duration) string {
	switch {
	case d == time.Hour:
		return "hour"
	case d%time.Hour == 0:
		return fmt.Sprintf("%d hours", d/time.Hour)
	case d%time.Minute == 0:
		return fmt.Sprintf("%d minutes", d/time.Minute)
	}
	return d.String()
}

func f1(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }

// summaryPage is the HTML summary: one page, no external assets, well
// formed as XML too.
var summaryPage = template.Must(template.New("summary").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"/>
<meta http-equiv="refresh" content="{{.Refresh}}"/>
<title>caddy-mcc summary</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 760px; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.dir { color: #666; font-family: monospace; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 2em; margin: 1.2em 0; }
table { border-collapse: collapse; }
th, td { padding: 0.15em 0.8em 0.15em 0; text-align: left; }
td.v { text-align: right; font-variant-numeric: tabular-nums; }
th { border-bottom: 1px solid #ccc; }
svg { border: 1px solid #ddd; background: #fcfcfc; }
.ratio { fill: none; stroke: #1a7f37; stroke-width: 2; }
.egress { fill: #0969da; }
.grid { stroke: #ddd; stroke-width: 1; }
.label { font-size: 11px; fill: #555; }
footer { color: #888; font-size: 0.85em; }
</style>
</head>
<body>
<h1>caddy-mcc summary</h1>
<div class="dir">{{.S.Dir}}</div>
<div class="tables">
<table>
<tr><th>lifetime</th><th></th></tr>
{{range .Lifetime}}<tr><td>{{.Name}}</td><td class="v">{{.Value}}</td></tr>
{{end}}</table>
<table>
<tr><th>{{.PeriodLabel}}</th><th></th></tr>
{{range .Period}}<tr><td>{{.Name}}</td><td class="v">{{.Value}}</td></tr>
{{end}}</table>
<table>
<tr><th>store</th><th></th></tr>
{{range .Store}}<tr><td>{{.Name}}</td><td class="v">{{.Value}}</td></tr>
{{end}}</table>
</div>
<svg xmlns="http://www.w3.org/2000/svg" width="{{.Chart.Width}}" height="{{.Chart.Height}}" viewBox="0 0 {{.Chart.Width}} {{.Chart.Height}}" role="img" aria-label="hit ratio and egress over the last {{.Chart.Span}}">
<title>Hit ratio (line) and egress (bars) per period over the last {{.Chart.Span}}</title>
<line class="grid" x1="0" y1="{{.Chart.RatioTop}}" x2="{{.Chart.Width}}" y2="{{.Chart.RatioTop}}"/>
<line class="grid" x1="0" y1="{{.Chart.RatioHeight}}" x2="{{.Chart.Width}}" y2="{{.Chart.RatioHeight}}"/>
<text class="label" x="4" y="{{.Chart.RatioTop}}" dy="-4">hit ratio 100%</text>
<text class="label" x="4" y="{{.Chart.RatioHeight}}" dy="-4">0%</text>
{{if .Chart.RatioPath}}<path class="ratio" d="{{.Chart.RatioPath}}"/>
{{end}}<line class="grid" x1="0" y1="{{.Chart.EgressTop}}" x2="{{.Chart.Width}}" y2="{{.Chart.EgressTop}}"/>
<text class="label" x="4" y="{{.Chart.EgressTop}}" dy="-4">egress per period, max {{.Chart.MaxEgress}}</text>
{{range .Chart.Bars}}<rect class="egress" x="{{.X}}" y="{{.Y}}" width="{{.W}}" height="{{.H}}"/>
{{end}}<text class="label" x="4" y="{{.Chart.Height}}" dy="-1">{{.Chart.Ago}}</text>
<text class="label" x="{{.Chart.Width}}" y="{{.Chart.Height}}" dy="-1" text-anchor="end">now</text>
</svg>
<footer>
<p>Since {{.S.Since.Format "2006-01-02 15:04:05 MST"}}; at {{.S.Time.Format "2006-01-02 15:04:05 MST"}}. A byte is a hit when it was on disk when the request needed it. <a href="?format=json">JSON</a></p>
</footer>
</body>
</html>
`))

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*Summary)(nil)
	_ caddyfile.Unmarshaler       = (*Summary)(nil)
)
