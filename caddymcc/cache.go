package caddymcc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// caches holds one cache per store directory, shared by every handler and
// every config generation that names the directory, so a reload keeps the
// store open, its fills running and downloads flowing.
var caches = caddy.NewUsagePool()

// cache is a store plus the fills in flight on it.
type cache struct {
	dir       string
	blockSize int64
	// node names this cache in the Via header of its fills, to detect
	// forwarding loops between gateways; unique per store and process.
	node string

	ready chan struct{} // closed when the store is open (or failed to open)
	store *rangestore.Store
	err   error

	// ctx ends when the cache is destructed; fills stop with it.
	ctx     context.Context
	cancel  context.CancelFunc
	running sync.WaitGroup // fills in flight
	// closing is set (under closeMu) when Destruct begins: fills started
	// after it are not waited for (their context has ended).
	closeMu sync.Mutex
	closing bool
	stats   counters

	// claims holds the fill fetching each missing block of a stored
	// object; learning, the fill per key that fetches the first block of
	// an object not stored yet (its length is not known yet);
	// revalidating, the conditional fill per key that checks a stale
	// object upstream.
	claims       *claims
	learning     *flights
	revalidating *flights
	// queue caps the fills talking to upstream at once (max_fills).
	queue fillQueue
	// down: the drive failed its health check and is out of service.
	down   atomic.Bool
	logger *zap.Logger
	// validated holds when each object version was last confirmed current
	// (freshness.go).
	validated validations
	// skew moves the clock of freshness decisions forward, for tests that
	// would otherwise wait out a TTL; zero in production.
	skew atomic.Int64
	// beforeLearn, when set (by tests, before any request), runs when a
	// request did not find its object and is about to learn it.
	beforeLearn func(key string)
}

// loadCache returns the shared cache for dir, opening its store in the
// background when this is the first use. Opening recovers from a crash,
// which can take a while, and must not hold up provisioning; it must also
// not fail a `caddy validate` run while a server holds the store.
func loadCache(dir string, opts rangestore.Options, logger *zap.Logger) (*cache, error) {
	if err := rangestore.CheckFormat(dir, opts.BlockSize); err != nil {
		return nil, err
	}
	v, loaded, err := caches.LoadOrNew(dir, func() (caddy.Destructor, error) {
		ctx, cancel := context.WithCancel(context.Background())
		c := &cache{
			dir:          dir,
			blockSize:    opts.BlockSize,
			node:         newNodeID(),
			ready:        make(chan struct{}),
			ctx:          ctx,
			cancel:       cancel,
			claims:       newClaims(),
			learning:     newFlights(),
			revalidating: newFlights(),
			validated:    validations{m: make(map[uint64]time.Time)},
		}
		c.logger = logger
		opts.Log = func(msg string) { logger.Error(msg, zap.String("dir", dir)) }
		go c.watchHealth()
		go func() {
			defer close(c.ready)
			c.store, c.err = rangestore.Open(dir, opts)
			if c.err != nil {
				logger.Error("cannot open store; serving without caching", zap.String("dir", dir), zap.Error(c.err))
				return
			}
			rec := c.store.Recovery()
			logger.Info("store open", zap.String("dir", dir), zap.Bool("clean_shutdown", rec.Clean),
				zap.Int("objects", rec.Objects), zap.Int("journal_records", rec.Records), zap.Bool("torn_tail", rec.TornTail),
				zap.Int("blocks_checked", rec.BlocksChecked), zap.Int("torn_blocks_dropped", rec.BlocksDropped),
				zap.Int("objects_without_data_dropped", rec.ObjectsDropped), zap.Duration("took", rec.Duration))
		}()
		return c, nil
	})
	if err != nil {
		return nil, err
	}
	c := v.(*cache)
	if loaded && c.blockSize != opts.BlockSize {
		caches.Delete(dir)
		return nil, fmt.Errorf("store %s is open with block size %d; cannot change it to %d", dir, c.blockSize, opts.BlockSize)
	}
	if loaded {
		c.setLimits(opts)
	}
	return c, nil
}

// setLimits applies a reloaded config's disk budget to the open store.
func (c *cache) setLimits(opts rangestore.Options) {
	go func() {
		<-c.ready
		if c.store != nil {
			c.store.SetLimits(opts.MaxSize, opts.MinFree)
		}
	}()
}

// wait returns the open store, waiting for it to finish opening.
func (c *cache) wait(ctx context.Context) (*rangestore.Store, error) {
	select {
	case <-c.ready:
		return c.store, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Destruct stops the fills and closes the store, once the last config using
// it is gone.
func (c *cache) Destruct() error {
	c.closeMu.Lock()
	c.closing = true
	c.closeMu.Unlock()
	c.cancel()
	c.running.Wait()
	// The lifetime counters' last save goes into the store directory.
	c.stats.ledger.stop()
	<-c.ready
	if c.store == nil {
		return nil
	}
	return c.store.Close()
}

// newNodeID returns "mcc-" and 12 random hex digits.
func newNodeID() string {
	var b [6]byte
	rand.Read(b[:])
	return "mcc-" + hex.EncodeToString(b[:])
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

// findCaches returns the open cache of store directory dir, or, for "",
// every open cache in use (each drive of every mcc handler).
func findCaches(ctx context.Context, dir string) ([]*cache, error) {
	if dir != "" {
		c, err := findCache(ctx, dir)
		if err != nil {
			return nil, err
		}
		return []*cache{c}, nil
	}
	var out []*cache
	for _, c := range cachesInUse() {
		if open, err := findCache(ctx, c.dir); err == nil {
			out = append(out, open)
		} else if ctx.Err() != nil {
			return nil, err
		}
	}
	if len(out) == 0 {
		return nil, opError{http.StatusServiceUnavailable, errors.New("no mcc store is open")}
	}
	return out, nil
}

// cachesInUse returns the caches of every store directory in use, by path.
func cachesInUse() []*cache {
	var out []*cache
	caches.Range(func(_, v any) bool {
		if c, ok := v.(*cache); ok {
			out = append(out, c)
		}
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].dir < out[j].dir })
	return out
}

// Interface guards
var _ caddy.Destructor = (*cache)(nil)

// track counts a fill starting in running, unless the cache is being
// destructed: Destruct's Wait must not see an Add after it began.
func (c *cache) track() bool {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closing {
		return false
	}
	c.running.Add(1)
	return true
}
