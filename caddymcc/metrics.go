package caddymcc

import (
	"errors"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

// provisionMetrics registers the cache metrics in the config's registry
// (each config has its own, served at the admin API's /metrics) and starts
// every drive's ledger, whose history and lifetime totals the summary shows.
func (h *Handler) provisionMetrics(ctx caddy.Context) error {
	for _, c := range h.caches {
		c.ledger()
	}
	err := ctx.GetMetricsRegistry().Register(cacheMetrics{})
	// Every mcc handler of a config registers the same collector, which
	// reports every cache in use.
	if are := (prometheus.AlreadyRegisteredError{}); errors.As(err, &are) {
		return nil
	}
	return err
}

// cacheMetrics reports the counters of every cache in use at scrape time,
// labelled by store directory. It reads the live counters, so it needs no
// updates on the request path and survives config reloads unchanged.
type cacheMetrics struct{}

const metricsNamespace = "caddy_mcc_"

var (
	metricRequests = prometheus.NewDesc(metricsNamespace+"requests_total",
		"Requests answered by the cache, by cache status: hit, miss, partial, bypass (refused or served without the store) and error.",
		[]string{"dir", "status"}, nil)
	metricServedBytes = prometheus.NewDesc(metricsNamespace+"served_bytes_total",
		"Body bytes sent to clients, by source: cache (on disk when the request needed it) or upstream (fetched for it).",
		[]string{"dir", "source"}, nil)
	metricUpstreamBytes = prometheus.NewDesc(metricsNamespace+"upstream_bytes_total",
		"Body bytes that fills received from upstream.",
		[]string{"dir"}, nil)
	metricFills = prometheus.NewDesc(metricsNamespace+"fills_total",
		"Fills started: upstream range requests for missing blocks.",
		[]string{"dir"}, nil)
	metricFillsInFlight = prometheus.NewDesc(metricsNamespace+"fills_in_flight",
		"Fills running now.",
		[]string{"dir"}, nil)
	metricFillsQueued = prometheus.NewDesc(metricsNamespace+"fills_queued",
		"Fills waiting for a turn under max_fills.",
		[]string{"dir"}, nil)
	metricFillDuration = prometheus.NewDesc(metricsNamespace+"fill_duration_seconds",
		"How long fills took, from the upstream request to the last block stored or the failure.",
		[]string{"dir"}, nil)
	metricCollapsed = prometheus.NewDesc(metricsNamespace+"collapsed_total",
		"Client waits collapsed onto a fill that another request started.",
		[]string{"dir"}, nil)
	metricUncached = prometheus.NewDesc(metricsNamespace+"uncached_streams_total",
		"Downloads that went on from upstream uncached because the store would not take their blocks (disk budget full of objects in use, or the object purged while read).",
		[]string{"dir"}, nil)
	metricFillErrors = prometheus.NewDesc(metricsNamespace+"fill_errors_total",
		"Fills that failed, by kind: timeout, aborted, invalid, changed, store, upstream.",
		[]string{"dir", "kind"}, nil)
	metricEvictions = prometheus.NewDesc(metricsNamespace+"evictions_total",
		"Objects evicted to keep to the disk budget.",
		[]string{"dir"}, nil)
	metricStoredBytes = prometheus.NewDesc(metricsNamespace+"stored_bytes",
		"Bytes of cached blocks on disk.",
		[]string{"dir"}, nil)
	metricStoredObjects = prometheus.NewDesc(metricsNamespace+"stored_objects",
		"Objects in the store.",
		[]string{"dir"}, nil)
	metricDriveUp = prometheus.NewDesc(metricsNamespace+"drive_up",
		"1 while the store's drive passes its health check, 0 while it is out of service.",
		[]string{"dir"}, nil)
	metricMaxSize = prometheus.NewDesc(metricsNamespace+"max_size_bytes",
		"The store's max_size; 0 for no cap.",
		[]string{"dir"}, nil)
)

// Describe implements prometheus.Collector.
func (cacheMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		metricRequests, metricServedBytes, metricUpstreamBytes, metricFills,
		metricFillsInFlight, metricFillsQueued, metricFillDuration, metricCollapsed, metricUncached, metricFillErrors,
		metricEvictions, metricStoredBytes, metricStoredObjects, metricMaxSize, metricDriveUp,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. Counters count since the store
// was opened in this process, as Prometheus expects of counters; the
// summary's totals span restarts.
func (cacheMetrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range cachesInUse() {
		s, dir := &c.stats, c.dir
		counter := func(d *prometheus.Desc, v int64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append([]string{dir}, labels...)...)
		}
		gauge := func(d *prometheus.Desc, v int64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), dir)
		}
		for st := range cacheStatus(numStatuses) {
			counter(metricRequests, s.requests[st].Load(), st.String())
		}
		counter(metricServedBytes, s.hitBytes.Load(), "cache")
		counter(metricServedBytes, s.missBytes.Load(), "upstream")
		counter(metricUpstreamBytes, s.upstreamBytes.Load())
		counter(metricFills, s.fillsStarted.Load())
		gauge(metricFillsInFlight, s.fillsInFlight.Load())
		gauge(metricFillsQueued, int64(c.queue.queued()))
		up := int64(1)
		if c.down.Load() {
			up = 0
		}
		gauge(metricDriveUp, up)
		counter(metricCollapsed, s.collapsed.Load())
		counter(metricUncached, s.uncachedStreams.Load())
		for k := range fillError(numFillErrors) {
			counter(metricFillErrors, s.fillErrors[k].Load(), k.String())
		}
		buckets, count, sum := s.fillSeconds.snapshot()
		ch <- prometheus.MustNewConstHistogram(metricFillDuration, count, sum, buckets, dir)

		select {
		case <-c.ready:
		default:
			continue // the store is still opening
		}
		if c.store == nil {
			continue
		}
		st := c.store.Stats()
		counter(metricEvictions, st.Evictions)
		gauge(metricStoredBytes, st.BytesPresent)
		gauge(metricStoredObjects, int64(st.Objects))
		gauge(metricMaxSize, st.MaxSize)
	}
}

// Interface guards
var _ prometheus.Collector = cacheMetrics{}
