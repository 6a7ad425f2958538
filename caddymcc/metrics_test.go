package caddymcc

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/caddyserver/caddy/v2"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Tests in this file pin the Prometheus metrics.

// scrape reads the admin API's /metrics.
func scrape(t *testing.T, g *gateway) map[string]*dto.MetricFamily {
	t.Helper()
	status, data := adminCall(t, g, http.MethodGet, "/metrics", nil)
	if status != 200 {
		t.Fatalf("/metrics: %d %s", status, data)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// metricValue returns the value of the metric of fams with the given
// labels besides dir (which must be the gateway's store); -1 if absent.
func metricValue(t *testing.T, g *gateway, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		if got["dir"] != g.storeDir() {
			continue
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if got[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

func TestMetricsStillMoveAfterReload(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/m.bin", 320*kib, 72)
	g := startGateway(t, o, "")
	download(t, g, "/m.bin", "origin.test", want, csMiss)
	g.waitFills()
	n := float64(len(want))

	m := scrape(t, g)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"caddy_mcc_requests_total", []string{"status", "miss"}, 1},
		{"caddy_mcc_requests_total", []string{"status", "hit"}, 0},
		{"caddy_mcc_upstream_bytes_total", nil, n},
		{"caddy_mcc_stored_objects", nil, 1},
		{"caddy_mcc_stored_bytes", nil, n},
		{"caddy_mcc_fills_in_flight", nil, 0},
		{"caddy_mcc_fill_errors_total", []string{"kind", "timeout"}, 0},
		{"caddy_mcc_evictions_total", nil, 0},
		{"caddy_mcc_max_size_bytes", nil, 0},
	} {
		if got := metricValue(t, g, m, c.name, c.labels...); got != c.want {
			t.Errorf("before reload: %s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	fromCache := metricValue(t, g, m, "caddy_mcc_served_bytes_total", "source", "cache")
	fromUpstream := metricValue(t, g, m, "caddy_mcc_served_bytes_total", "source", "upstream")
	if fromCache+fromUpstream != n || fromUpstream <= 0 {
		t.Errorf("served bytes: cache %v + upstream %v, want %v with some from upstream", fromCache, fromUpstream, n)
	}
	fills := metricValue(t, g, m, "caddy_mcc_fills_total")
	if fills < 1 || metricValue(t, g, m, "caddy_mcc_fill_duration_seconds") != fills {
		t.Errorf("fills_total %v, fill_duration_seconds count %v: want equal and at least 1", fills, metricValue(t, g, m, "caddy_mcc_fill_duration_seconds"))
	}

	// A reload gives the config a new registry: the collector must be in
	// it, and the counters must go on from where they were.
	cfg := g.config(o, gatewayPort(g), "read_ahead 128KiB")
	if status, body := adminCall(t, g, http.MethodPost, "/load", json.RawMessage(cfg)); status != 200 {
		t.Fatalf("reload: %d %s", status, body)
	}
	download(t, g, "/m.bin", "origin.test", want, csHit)
	// The admin endpoint as operators scrape it, and the new config's
	// own registry: until the old admin server has shut down, a scrape
	// may still reach it.
	actx := caddy.ActiveContext()
	active, err := actx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatalf("gathering the active registry: %v", err)
	}
	fams := map[string]*dto.MetricFamily{}
	for _, f := range active {
		fams[f.GetName()] = f
	}
	for src, m := range map[string]map[string]*dto.MetricFamily{"admin /metrics": scrape(t, g), "active registry": fams} {
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"caddy_mcc_requests_total", []string{"status", "miss"}, 1},
			{"caddy_mcc_requests_total", []string{"status", "hit"}, 1},
			{"caddy_mcc_served_bytes_total", []string{"source", "cache"}, fromCache + n},
			{"caddy_mcc_served_bytes_total", []string{"source", "upstream"}, fromUpstream},
			{"caddy_mcc_fills_total", nil, fills},
		} {
			if got := metricValue(t, g, m, c.name, c.labels...); got != c.want {
				t.Errorf("after reload, %s: %s%v = %v, want %v", src, c.name, c.labels, got, c.want)
			}
		}
	}
}
