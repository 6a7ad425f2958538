package caddymcc

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// Drive is one cache drive: a store directory with a size cap of its own.
type Drive struct {
	// Dir is the drive's store directory.
	Dir string `json:"dir"`
	// MaxSize is the most bytes of cached blocks to keep on the drive; it
	// is also the drive's weight when objects are placed. Default: 0, no
	// cap other than MinFree (weighted as 1TiB).
	MaxSize int64 `json:"max_size,omitempty"`
}

// A handler with several drives keeps one cache (store, fills, counters)
// per drive, and places each object on one of them by weighted rendezvous
// hashing of its key: every drive scores the key, weighted by its size,
// and the highest score wins. Adding a drive moves only the objects it
// wins; removing one moves only its own. A drive whose health check fails
// (its directory gone or unwritable: unmounted, removed, read-only, I/O
// errors) is out of service: its objects are placed on the others, as
// misses there, until the check passes again.

// driveHealthEvery is how often each drive's health is checked.
const driveHealthEvery = 5 * time.Second

// noCapWeight is the placement weight of a drive without max_size.
const noCapWeight = 1 << 40

// provisionDrives opens (or shares) the cache of every drive.
func (h *Handler) provisionDrives(minFree int64) error {
	drives := h.Drives
	if len(drives) == 0 {
		dir := h.Dir
		if dir == "" {
			dir = filepath.Join(caddy.AppDataDir(), "mcc")
		}
		drives = []Drive{{Dir: dir, MaxSize: h.MaxSize}}
	} else if h.Dir != "" || h.MaxSize != 0 {
		return errors.New("mcc: give either dir and max_size, or drive lines, not both")
	}
	seen := make(map[string]bool)
	for _, d := range drives {
		dir, err := filepath.Abs(d.Dir)
		if err != nil {
			return err
		}
		if seen[dir] {
			return fmt.Errorf("mcc: drive %s is named twice", dir)
		}
		seen[dir] = true
		// The handler refuses objects over its own MaxObjectSize; the
		// store's limit only has to let every configurable size through.
		opts := rangestore.Options{BlockSize: h.BlockSize, MaxSize: d.MaxSize, MinFree: minFree, MaxObjectSize: maxObjectSizeLimit}
		c, err := loadCache(dir, opts, h.logger)
		if err != nil {
			return fmt.Errorf("mcc: %w", err)
		}
		c.queue.setLimit(h.MaxFills)
		weight := float64(d.MaxSize)
		if weight <= 0 {
			weight = noCapWeight
		}
		h.caches = append(h.caches, c)
		h.weights = append(h.weights, weight)
	}
	h.cache = h.caches[0]
	return nil
}

// place returns the cache of the drive that holds key: the drive in
// service with the highest weighted rendezvous score, or nil when no drive
// is in service.
func (h *Handler) place(key string) *cache {
	if len(h.caches) == 1 {
		return h.cache
	}
	var best *cache
	bestScore := math.Inf(-1)
	for i, c := range h.caches {
		if c.down.Load() {
			continue
		}
		if s := rendezvousScore(key, c.dir, h.weights[i]); s > bestScore {
			best, bestScore = c, s
		}
	}
	return best
}

// rendezvousScore is drive dir's weighted score for key: -w/ln(u) for a
// hash u of both in (0, 1), which makes the share of keys each drive wins
// proportional to its weight (weighted rendezvous hashing).
func rendezvousScore(key, dir string, weight float64) float64 {
	hs := fnv.New64a()
	hs.Write([]byte(dir))
	hs.Write([]byte{0})
	hs.Write([]byte(key))
	x := hs.Sum64()
	// FNV's bits are not spread evenly enough over similar keys: mix them
	// (splitmix64's finaliser).
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	u := (float64(x>>11) + 0.5) / (1 << 53)
	return -weight / math.Log(u)
}

// watchHealth checks the drive every driveHealthEvery until the cache is
// destructed.
func (c *cache) watchHealth() {
	t := time.NewTicker(driveHealthEvery)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
			c.checkHealth()
		}
	}
}

// checkHealth takes the drive out of service when its probe fails, and
// back in when it passes again, logging each change.
func (c *cache) checkHealth() {
	err := c.probe()
	switch was := c.down.Load(); {
	case err != nil && !was:
		c.down.Store(true)
		c.logger.Warn("cache drive out of service; its objects are fetched onto the other drives", zap.String("dir", c.dir), zap.Error(err))
	case err == nil && was:
		c.down.Store(false)
		c.logger.Info("cache drive back in service", zap.String("dir", c.dir))
	}
}

// probe checks that the drive's store is open and its directory still
// holds it and takes writes.
func (c *cache) probe() error {
	select {
	case <-c.ready:
	default:
		return nil // still opening: not a failure yet
	}
	if c.store == nil {
		return c.err
	}
	if _, err := os.Stat(filepath.Join(c.dir, "FORMAT")); err != nil {
		return err
	}
	f, err := os.CreateTemp(c.dir, ".probe-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.Write([]byte{1})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// storeIOError reports whether err is the file system failing under a
// store (a drive removed, unmounted, read-only or failing), not a refusal
// of its budget.
func storeIOError(err error) bool {
	var pe *fs.PathError
	return errors.As(err, &pe)
}
