package caddymcc

import "sync"

// flights collapses concurrent requests for one key onto one fill: the
// first request starts it, the others join it and take their answer from
// it (a single-flight, as in groupcache). The cache keeps one for learning
// new objects and one for revalidating stale ones.
type flights struct {
	mu sync.Mutex
	m  map[string]*fill
}

func newFlights() *flights { return &flights{m: make(map[string]*fill)} }

// join returns the fill in flight for key, starting one with start when
// there is none (start may find there is nothing to do and return nil);
// joined reports that another request had started it. The caller is
// counted as a learner of the fill (see fill.headers) before the fill can
// end, so a transient object it fetches stays open for the caller.
func (fl *flights) join(key string, start func() *fill) (f *fill, joined bool) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	f = fl.m[key]
	joined = f != nil
	if !joined {
		if f = start(); f == nil {
			return nil, false
		}
		fl.m[key] = f
	}
	f.join()
	return f, joined
}

// land removes f from key when it ends, if it is still the fill in flight
// there; requests arriving from then on start a fill of their own.
func (fl *flights) land(key string, f *fill) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if fl.m[key] == f {
		delete(fl.m, key)
	}
}
