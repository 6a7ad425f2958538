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

// ID returns a number unique to this stored version of the object within
// the store: two handles with the same ID read the same bytes.
func (o *Object) ID() uint64 { return o.e.gen }

// Dup returns another handle on the same object version, for a second
// holder with its own lifetime. Both must be closed.
func (o *Object) Dup() *Object {
	o.s.mu.Lock()
	o.e.refs++
	o.s.mu.Unlock()
	return &Object{s: o.s, e: o.e}
}
