package caddymcc

import "sync/atomic"

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
	requests       [numStatuses]atomic.Int64
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
