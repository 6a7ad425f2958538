package caddymcc

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// counters are a cache's running totals since its store was opened in this
// process, shared by every config that uses the store directory. A byte sent
// to a client is a hit when its block was on disk when the request needed
// it, and a miss otherwise (it came from a fill).
type counters struct {
	hitBytes       atomic.Int64 // bytes sent from blocks on disk
	missBytes      atomic.Int64 // bytes sent from fills
	upstreamBytes  atomic.Int64 // body bytes fills received from upstream
	upstreamErrors atomic.Int64 // fills that failed (not an origin's own 4xx)
	fillsStarted   atomic.Int64
	fillsInFlight  atomic.Int64
	collapsed      atomic.Int64 // client waits on a fill it did not start
	// uncachedStreams counts downloads that went on from upstream,
	// uncached, because the store would not take their blocks.
	uncachedStreams atomic.Int64
	requests        [numStatuses]atomic.Int64
	fillErrors      [numFillErrors]atomic.Int64
	fillSeconds     histogram // duration of fills

	// ledger adds the totals of earlier runs and keeps the history the
	// summary shows (lifetime.go).
	ledger ledger
}

// fillError classifies why a fill failed, for metrics.
type fillError int

const (
	fillTimeout  fillError = iota // upstream idle past fill_timeout
	fillAborted                   // upstream connection cut mid-body
	fillInvalid                   // wrong range, no length, short or long body
	fillChanged                   // object changed upstream (identity)
	fillStore                     // the store refused the bytes (disk budget, I/O)
	fillUpstream                  // reverse_proxy failed (dial, 5xx from the proxy), or panicked
	numFillErrors
)

var fillErrorNames = [numFillErrors]string{"timeout", "aborted", "invalid", "changed", "store", "upstream"}

func (k fillError) String() string { return fillErrorNames[k] }

func classifyFillError(err error) fillError {
	switch {
	case errors.Is(err, errFillIdle), errors.Is(err, context.DeadlineExceeded):
		return fillTimeout
	case errors.Is(err, errUpstreamAborted):
		return fillAborted
	case errors.Is(err, errIdentityChanged):
		return fillChanged
	case errors.Is(err, errShortBody), errors.Is(err, errLongBody), errors.Is(err, errWrongRange), errors.Is(err, errNoLength), errors.Is(err, errTooLarge):
		return fillInvalid
	case storeRefused(err), errors.Is(err, rangestore.ErrClosed):
		return fillStore
	}
	return fillUpstream
}

// fillBuckets are the upper bounds, in seconds, of the fill duration
// histogram.
var fillBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// histogram is a fixed-bucket histogram safe for concurrent use.
type histogram struct {
	counts [14]atomic.Int64 // len(fillBuckets)+1, the last for +Inf
	sumNs  atomic.Int64
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(fillBuckets) && s > fillBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(int64(d))
}

// snapshot returns cumulative bucket counts (as Prometheus wants), the
// total count and the sum in seconds.
func (h *histogram) snapshot() (buckets map[float64]uint64, count uint64, sum float64) {
	buckets = make(map[float64]uint64, len(fillBuckets))
	var cum uint64
	for i, ub := range fillBuckets {
		cum += uint64(h.counts[i].Load())
		buckets[ub] = cum
	}
	count = cum + uint64(h.counts[len(fillBuckets)].Load())
	return buckets, count, time.Duration(h.sumNs.Load()).Seconds()
}

// cacheStatus classifies an answer, as its Cache-Status header does.
type cacheStatus int

const (
	statusHit     cacheStatus = iota // every byte from disk
	statusMiss                       // fetched: nothing was on disk
	statusPartial                    // some blocks on disk, the rest fetched
	statusBypass                     // refused (403, 405) or served uncached
	statusError                      // upstream failure: 502, 504 or a cut connection
	numStatuses
)

var statusNames = [numStatuses]string{"hit", "miss", "partial", "bypass", "error"}

func (s cacheStatus) String() string { return statusNames[s] }

// tally is one request's share of the counters: its cache status and the
// bytes it was sent from disk and from fills. It adds to the cache's totals
// as it goes and ends up in the access log.
type tally struct {
	c         *cache
	answered  bool
	status    cacheStatus
	hit, miss int64
}

func (t *tally) answer(s cacheStatus) {
	t.answered = true
	t.status = s
	t.c.stats.requests[s].Add(1)
}

func (t *tally) sentHit(n int64) {
	t.hit += n
	t.c.stats.hitBytes.Add(n)
}

// onDisk records which blocks of a range were present when the request
// came: the bytes sent from them are hits, all others misses, even once a
// fill (the request's own read-ahead, say) has stored them.
type onDisk struct {
	first int // block of had[0]
	had   []bool
}

func (d onDisk) at(b int) bool {
	i := b - d.first
	return i >= 0 && i < len(d.had) && d.had[i]
}

// sent counts n bytes at off of obj sent from blocks on disk.
func (t *tally) sent(obj *rangestore.Object, off, n int64, d onDisk) {
	for n > 0 {
		b := obj.BlockOf(off)
		blk := obj.Block(b)
		k := min(n, blk.Off+blk.Len-off)
		if d.at(b) {
			t.sentHit(k)
		} else {
			t.sentMiss(k)
		}
		off += k
		n -= k
	}
}

func (t *tally) sentMiss(n int64) {
	t.miss += n
	t.c.stats.missBytes.Add(n)
}
