package rangestore

// SetLimits changes the disk budget of an open store (a reloaded
// configuration). A smaller budget takes effect at the next block written:
// eviction happens only to make room for writes.
func (s *Store) SetLimits(maxSize, minFree int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opts.MaxSize = max(maxSize, 0)
	s.opts.MinFree = max(minFree, 0)
}
