package rangestore

import (
	"errors"
	"fmt"
	"syscall"
)

// reserve sets n bytes aside for a block about to be written, evicting
// least-recently-used objects while the write would exceed MaxSize or leave
// less than MinFree on the file system. s.mu must be held.
func (s *Store) reserve(n int64) error {
	if max := s.opts.MaxSize; max > 0 {
		if n > max {
			return fmt.Errorf("%w: block of %d bytes exceeds max size %d", ErrNoSpace, n, max)
		}
		for s.used+s.reserved+n > max {
			if s.evictOne(nil) < 0 {
				return fmt.Errorf("%w: %d bytes present, %d being written, max size %d, nothing left to evict",
					ErrNoSpace, s.used, s.reserved, max)
			}
		}
	}
	if s.opts.MinFree > 0 {
		avail, err := s.available()
		if err != nil {
			return fmt.Errorf("rangestore: statfs: %w", err)
		}
		if deficit := s.opts.MinFree + s.reserved + n - avail; deficit > 0 {
			if s.evictBytes(deficit, nil) < deficit {
				return fmt.Errorf("%w: %d bytes free, %d to keep free, nothing left to evict", ErrNoSpace, avail, s.opts.MinFree)
			}
		}
	}
	s.reserved += n
	return nil
}

// available returns the bytes free for unprivileged users on the store's
// file system.
func (s *Store) available() (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// evictBytes evicts least-recently-used objects, other than keep, until at
// least want bytes are freed or nothing is left to evict; it returns the
// bytes freed. s.mu must be held.
func (s *Store) evictBytes(want int64, keep *entry) int64 {
	var freed int64
	for freed < want {
		n := s.evictOne(keep)
		if n < 0 {
			break
		}
		freed += n
	}
	return freed
}

// evictOne evicts the least recently used object that nobody holds open,
// other than keep, and returns the bytes it freed, or -1 when there is none.
// s.mu must be held.
func (s *Store) evictOne(keep *entry) int64 {
	for el := s.lru.Back(); el != nil; el = el.Prev() {
		e := el.Value.(*entry)
		if e.refs > 0 || e == keep {
			continue
		}
		n := e.presentBytes
		s.remove(e)
		s.evictions++
		return n
	}
	return -1
}

func isNoSpace(err error) bool { return errors.Is(err, ErrNoSpace) }
