package caddymcc

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
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

	// Drives lists every store in use (each drive of every mcc handler).
	Drives []driveSummary `json:"drives"`
}

// driveSummary is one store of the summary's drive list.
type driveSummary struct {
	Dir         string `json:"dir"`
	Up          bool   `json:"up"`
	Objects     int    `json:"objects"`
	BytesOnDisk int64  `json:"bytes_on_disk"`
	MaxSize     int64  `json:"max_size"`
	byteSummary
}

// drives summarises every open store in use.
func drives() []driveSummary {
	out := []driveSummary{}
	for _, c := range cachesInUse() {
		select {
		case <-c.ready:
		default:
			continue
		}
		d := driveSummary{Dir: c.dir, Up: !c.down.Load() && c.store != nil,
			byteSummary: newByteSummary(c.stats.hitBytes.Load(), c.stats.missBytes.Load())}
		if c.store != nil {
			st := c.store.Stats()
			d.Objects, d.BytesOnDisk, d.MaxSize = st.Objects, st.BytesPresent, st.MaxSize
		}
		out = append(out, d)
	}
	return out
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
		Drives:         drives(),
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
	return summaryPage.Execute(w, newSummaryView(s, c.history(), summaryPeriod, now))
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

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*Summary)(nil)
	_ caddyfile.Unmarshaler       = (*Summary)(nil)
)
