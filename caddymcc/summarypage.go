package caddymcc

import (
	_ "embed"
	"fmt"
	"html/template"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
)

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

// summaryHTML is the HTML summary: one page, no external assets, well
// formed as XML too.
//
//go:embed summary.html
var summaryHTML string

var summaryPage = template.Must(template.New("summary").Parse(summaryHTML))
