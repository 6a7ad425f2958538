package caddymcc

import (
	"sync"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// claims records which fill fetches each missing block of each stored
// object version, so that a block is fetched by one fill however many
// clients need it. A block is claimed from the moment a fill is planned for
// it until it is present or the fill gives it up.
type claims struct {
	mu sync.Mutex
	m  map[blockKey]*fill
}

// blockKey names a block of a stored object version.
type blockKey struct {
	id    uint64
	block int
}

func newClaims() *claims { return &claims{m: make(map[blockKey]*fill)} }

// free reports whether block b of obj is neither present nor claimed.
// cl.mu must be held.
func (cl *claims) free(obj *rangestore.Object, b int) bool {
	return cl.m[blockKey{obj.ID(), b}] == nil && !obj.HasBlock(b)
}

// claim returns the fill that owns block b of obj, or nil when b is
// present. First it makes sure the blocks from b on, up to span blocks and
// not past block last, are present or claimed: for the first run of free
// blocks among them (which may reach span blocks past its own start) it
// starts a fill with start and claims the run for it.
func (cl *claims) claim(obj *rangestore.Object, b, last, span int, start func(first, last int) *fill) *fill {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	for s := b; s <= min(b+span-1, last); s++ {
		if !cl.free(obj, s) {
			continue
		}
		e := s
		for e < min(s+span-1, last) && cl.free(obj, e+1) {
			e++
		}
		f := start(s, e)
		for k := s; k <= e; k++ {
			cl.m[blockKey{obj.ID(), k}] = f
		}
		break
	}
	return cl.m[blockKey{obj.ID(), b}]
}

// own gives f the free blocks of obj holding bytes [start, end): those
// its response carries beyond what it was planned for.
func (cl *claims) own(obj *rangestore.Object, start, end int64, f *fill) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.ownLocked(obj, start, end, f)
}

// create makes the object of a fill's first response with create and gives
// f its free blocks holding bytes [start, end) in the same step: a client
// that found the object before its blocks were claimed would start a
// second fill for them.
func (cl *claims) create(create func() (*rangestore.Object, error), start, end int64, f *fill) (*rangestore.Object, error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	obj, err := create()
	if err != nil {
		return nil, err
	}
	cl.ownLocked(obj, start, end, f)
	return obj, nil
}

func (cl *claims) ownLocked(obj *rangestore.Object, start, end int64, f *fill) {
	if end <= start {
		return
	}
	for b := obj.BlockOf(start); b <= obj.BlockOf(end-1); b++ {
		if cl.free(obj, b) {
			cl.m[blockKey{obj.ID(), b}] = f
		}
	}
}

// owns reports whether f holds the claim on block b of obj.
func (cl *claims) owns(obj *rangestore.Object, b int, f *fill) bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.m[blockKey{obj.ID(), b}] == f
}

// release gives up f's claim on block b of obj: the block is present now,
// or f could not write it.
func (cl *claims) release(obj *rangestore.Object, b int, f *fill) {
	cl.drop(obj, b, b, f)
}

// drop gives up f's claims on the blocks of obj from first to last; claims
// of other fills stay.
func (cl *claims) drop(obj *rangestore.Object, first, last int, f *fill) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	for b := first; b <= last; b++ {
		if k := (blockKey{obj.ID(), b}); cl.m[k] == f {
			delete(cl.m, k)
		}
	}
}
