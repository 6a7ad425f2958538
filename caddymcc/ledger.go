package caddymcc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// counterFile is the file in the store directory that carries a store's
// totals across restarts.
const counterFile = "mcc-counters.json"

// summaryPeriod is the summary's period, MCC's 15 seconds: the ledger
// samples the totals once a period and saves them, and the summary reports
// the last whole period.
const summaryPeriod = 15 * time.Second

// historyLen is how many samples the ledger keeps: an hour of periods.
const historyLen = 240

// totals are a store's counters since it was first used, as saved in
// counterFile.
type totals struct {
	Since          time.Time        `json:"since"`
	HitBytes       int64            `json:"hit_bytes"`
	MissBytes      int64            `json:"miss_bytes"`
	UpstreamBytes  int64            `json:"upstream_bytes"`
	UpstreamErrors int64            `json:"upstream_errors"`
	Evictions      int64            `json:"evictions"`
	Requests       map[string]int64 `json:"requests,omitempty"`
}

// ledger keeps a cache's totals since the store was first used, those of
// earlier runs (loaded from counterFile) plus this run's counters, and a
// sample of the bytes sent every period for the last hour. Its goroutine
// lives as long as the cache: it samples and saves the totals every
// period, and saves them once more when the cache is destructed.
type ledger struct {
	once   sync.Once
	logger *zap.Logger
	// periodMu orders the clock's period ends against holdPeriods; held
	// stops the clock.
	periodMu sync.Mutex
	held     bool
	ready    chan struct{} // closed once base and owner are set
	done     chan struct{} // closed after the last save
	base     totals        // earlier runs
	owner    bool          // this process has the store open and saves

	saveMu sync.Mutex // one save at a time; guards saved
	saved  []byte     // what the last save wrote

	mu      sync.Mutex
	samples [historyLen]sample // a ring: the oldest at head
	head, n int
}

// sample is the bytes a store sent since it was first used, at one
// moment.
type sample struct {
	at        time.Time
	hit, miss int64
}

// ledgers holds the latest ledger of each store directory. A cache that
// reopens a directory (a restart in the same process) loads the totals
// only after the previous cache of that directory saved its last ones.
var ledgers = struct {
	sync.Mutex
	last map[string]*ledger
}{last: make(map[string]*ledger)}

// ledger returns the cache's ledger, starting it on first use.
func (c *cache) ledger() *ledger {
	l := &c.stats.ledger
	l.once.Do(func() {
		l.logger = caddy.Log().Named("http.handlers.mcc")
		l.ready = make(chan struct{})
		l.done = make(chan struct{})
		ledgers.Lock()
		prev := ledgers.last[c.dir]
		ledgers.last[c.dir] = l
		ledgers.Unlock()
		go l.run(c, prev)
	})
	return l
}

// stop waits for a started ledger's last save; a ledger not started by now
// never will be.
func (l *ledger) stop() {
	l.once.Do(func() {})
	if l.done != nil {
		<-l.done
	}
}

func (l *ledger) run(c *cache, prev *ledger) {
	defer func() {
		if v := recover(); v != nil {
			// The counters stop being sampled and saved; serving goes on.
			l.logger.Error("panic in the summary ledger", zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
			select {
			case <-l.ready:
			default:
				close(l.ready)
			}
		}
		ledgers.Lock()
		if ledgers.last[c.dir] == l {
			delete(ledgers.last, c.dir)
		}
		ledgers.Unlock()
		close(l.done)
	}()
	if prev != nil {
		<-prev.done
	}
	<-c.ready
	// Only the process that opened the store saves: `caddy validate`
	// provisions the handler too, next to a running server whose totals
	// it must not overwrite. The store's lock decides.
	l.owner = c.store != nil
	l.base = totals{Since: time.Now().UTC()}
	if l.owner {
		t, err := loadTotals(c.dir)
		switch {
		case err == nil:
			l.base = t
		case !errors.Is(err, fs.ErrNotExist):
			l.logger.Warn("cannot read the saved counters; starting from zero", zap.String("dir", c.dir), zap.Error(err))
		}
	}
	l.record(c.sample(time.Now()))
	close(l.ready)

	tick := time.NewTicker(summaryPeriod)
	defer tick.Stop()
	for {
		select {
		case now := <-tick.C:
			l.periodMu.Lock()
			if !l.held {
				c.closePeriod(now)
			}
			l.periodMu.Unlock()
		case <-c.ctx.Done():
			// Destruct cancelled the cache: count what the fills still
			// finishing fetch, then save for the next run.
			c.running.Wait()
			c.save()
			return
		}
	}
}

// closePeriod ends a summary period at now: it records a sample and saves
// the totals.
func (c *cache) closePeriod(now time.Time) {
	l := c.ledger()
	<-l.ready
	l.record(c.sample(now))
	c.save()
}

// holdPeriods stops the ledger's clock, so that only closePeriod ends a
// period from now on, and restarts the history from a sample taken now.
// Tests use it to make period figures exact.
func (c *cache) holdPeriods() {
	l := c.ledger()
	<-l.ready
	l.periodMu.Lock()
	defer l.periodMu.Unlock()
	l.held = true
	l.mu.Lock()
	l.head, l.n = 0, 0
	l.mu.Unlock()
	l.record(c.sample(time.Now()))
}

// save writes the totals to counterFile, if this process owns
// the store and they changed since the last save: an idle gateway does
// not write to its disk every period.
func (c *cache) save() {
	l := &c.stats.ledger
	if !l.owner {
		return
	}
	l.saveMu.Lock()
	defer l.saveMu.Unlock()
	b, err := json.MarshalIndent(c.totals(), "", "\t")
	if err != nil || bytes.Equal(b, l.saved) {
		return
	}
	if err := saveTotals(c.dir, b); err != nil {
		l.logger.Warn("cannot save the counters", zap.String("dir", c.dir), zap.Error(err))
		return
	}
	l.saved = b
}

// totals returns the store's totals since it was first used. The ledger
// must be ready.
func (c *cache) totals() totals {
	l := &c.stats.ledger
	s := &c.stats
	t := l.base
	t.Requests = maps.Clone(l.base.Requests)
	if t.Requests == nil {
		t.Requests = make(map[string]int64, numStatuses)
	}
	t.HitBytes += s.hitBytes.Load()
	t.MissBytes += s.missBytes.Load()
	t.UpstreamBytes += s.upstreamBytes.Load()
	t.UpstreamErrors += s.upstreamErrors.Load()
	for st := range cacheStatus(numStatuses) {
		t.Requests[st.String()] += s.requests[st].Load()
	}
	if c.store != nil {
		t.Evictions += c.store.Stats().Evictions
	}
	return t
}

// sample reads the bytes sent since the store was first used. The
// ledger's base must be set.
func (c *cache) sample(now time.Time) sample {
	b := &c.stats.ledger.base
	return sample{
		at:   now,
		hit:  b.HitBytes + c.stats.hitBytes.Load(),
		miss: b.MissBytes + c.stats.missBytes.Load(),
	}
}

func (l *ledger) record(s sample) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n < historyLen {
		l.samples[(l.head+l.n)%historyLen] = s
		l.n++
		return
	}
	l.samples[l.head] = s
	l.head = (l.head + 1) % historyLen
}

func (l *ledger) at(i int) sample { return l.samples[(l.head+i)%historyLen] }

// lastPeriod returns the samples that begin and end the last whole period;
// before the first period has ended, those of the period so far.
func (c *cache) lastPeriod(now time.Time) (from, to sample) {
	l := &c.stats.ledger
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n >= 2 {
		return l.at(l.n - 2), l.at(l.n - 1)
	}
	return l.at(0), c.sample(now)
}

// history returns the samples of the last hour, oldest first.
func (c *cache) history() []sample {
	l := &c.stats.ledger
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]sample, l.n)
	for i := range out {
		out[i] = l.at(i)
	}
	return out
}

func loadTotals(dir string) (totals, error) {
	b, err := os.ReadFile(filepath.Join(dir, counterFile))
	if err != nil {
		return totals{}, err
	}
	var t totals
	if err := json.Unmarshal(b, &t); err != nil {
		return totals{}, fmt.Errorf("%s: %w", counterFile, err)
	}
	if t.Since.IsZero() {
		t.Since = time.Now().UTC()
	}
	return t, nil
}

// saveTotals replaces counterFile with b atomically: a crash leaves the
// old totals or the new ones, never a torn file.
func saveTotals(dir string, b []byte) error {
	return rangestore.WriteFileAtomic(filepath.Join(dir, counterFile), append(b, '\n'))
}
