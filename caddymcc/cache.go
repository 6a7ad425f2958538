package caddymcc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
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
	stats   counters

	mu sync.Mutex
	// fills holds the claim on each block being fetched, by object version
	// and block; learning holds the fill, per key, that fetches the first
	// block of an object not yet stored (its length is not known yet).
	fills    map[blockKey]*fill
	learning map[string]*fill
	// revalidating holds the conditional fill, per key, checking a stale
	// object upstream; validated, when each object version was last
	// confirmed current (freshness.go).
	revalidating map[string]*fill
	validated    map[uint64]time.Time
}

// blockKey names a block of a stored object version, for collapsing fills.
type blockKey struct {
	id    uint64
	block int
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
			fills:        make(map[blockKey]*fill),
			learning:     make(map[string]*fill),
			revalidating: make(map[string]*fill),
			validated:    make(map[uint64]time.Time),
		}
		go func() {
			defer close(c.ready)
			c.store, c.err = rangestore.Open(dir, opts)
			if c.err != nil {
				logger.Error("cannot open store; serving without caching", zap.String("dir", dir), zap.Error(c.err))
			}
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

// Interface guards
var _ caddy.Destructor = (*cache)(nil)

// newNodeID returns "mcc-" and 12 random hex digits.
func newNodeID() string {
	var b [6]byte
	rand.Read(b[:])
	return "mcc-" + hex.EncodeToString(b[:])
}
