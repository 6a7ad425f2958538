package caddymcc

import (
	"context"
	"sync"
)

// fillQueue caps the fills of a store that talk to upstream at once
// (max_fills); the others wait their turn, first come first served, so a
// burst of misses cannot open unbounded connections upstream.
type fillQueue struct {
	mu      sync.Mutex
	limit   int
	running int
	waiting []chan struct{} // oldest first; closed when its turn comes
}

// setLimit changes the cap (a reloaded config) and lets waiting fills run
// if it grew.
func (q *fillQueue) setLimit(n int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.limit = n
	q.admitLocked()
}

// acquire waits for a turn; it fails only when ctx ends first.
func (q *fillQueue) acquire(ctx context.Context) error {
	q.mu.Lock()
	if q.running < q.limit && len(q.waiting) == 0 {
		q.running++
		q.mu.Unlock()
		return nil
	}
	turn := make(chan struct{})
	q.waiting = append(q.waiting, turn)
	q.mu.Unlock()
	select {
	case <-turn:
		return nil
	case <-ctx.Done():
		q.mu.Lock()
		defer q.mu.Unlock()
		for i, w := range q.waiting {
			if w == turn {
				q.waiting = append(q.waiting[:i], q.waiting[i+1:]...)
				return ctx.Err()
			}
		}
		// The turn came as ctx ended: pass it on.
		q.running--
		q.admitLocked()
		return ctx.Err()
	}
}

// release ends a turn and gives it to the oldest waiting fill.
func (q *fillQueue) release() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.running--
	q.admitLocked()
}

func (q *fillQueue) admitLocked() {
	for q.running < q.limit && len(q.waiting) > 0 {
		close(q.waiting[0])
		q.waiting = q.waiting[1:]
		q.running++
	}
}

// queued returns how many fills wait for a turn.
func (q *fillQueue) queued() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.waiting)
}
