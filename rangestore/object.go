package rangestore

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
)

// Object is an open handle on one stored object version. Its identity never
// changes; if the object is invalidated while open, the handle keeps reading
// the old bytes and writes fail with ErrGone. Close it when done.
type Object struct {
	s      *Store
	e      *entry
	closed atomic.Bool
}

// Key returns the object's key.
func (o *Object) Key() string { return o.e.key }

// Meta returns the object's metadata. The caller must not modify its
// Header or Internal maps.
func (o *Object) Meta() Meta { return o.e.meta }

// Size returns the object's length in bytes.
func (o *Object) Size() int64 { return o.e.meta.Length }

// Blocks returns the number of blocks of the object.
func (o *Object) Blocks() int { return o.e.nblocks }

// Block returns the byte range of block i.
func (o *Object) Block(i int) Span {
	off := int64(i) << o.s.shift
	return Span{off, o.s.blockLen(o.e.meta.Length, i)}
}

// BlockOf returns the index of the block holding byte off.
func (o *Object) BlockOf(off int64) int { return int(off >> o.s.shift) }

// HasBlock reports whether block i is present.
func (o *Object) HasBlock(i int) bool { return o.e.has(i) }

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

// Invalidate removes this version from the store if it is still the stored
// version of its key, and reports whether it was. A newer version stored
// under the same key meanwhile is left alone. Open handles keep reading.
func (o *Object) Invalidate() bool {
	o.s.mu.Lock()
	defer o.s.mu.Unlock()
	if o.s.closed || o.e.deleted || o.e.transient {
		return false
	}
	o.s.remove(o.e)
	return true
}

// Valid reports whether the object is still the stored version of its key
// (not invalidated or evicted).
func (o *Object) Valid() bool {
	o.s.mu.Lock()
	defer o.s.mu.Unlock()
	return !o.e.deleted
}

// blocks returns the first and last block covering [off, off+n) clipped to
// the object; ok is false when the clipped range is empty.
func (o *Object) blocks(off, n int64) (first, last int, ok bool) {
	end := min(off+n, o.e.meta.Length)
	if off < 0 || off >= end {
		return 0, 0, false
	}
	return int(off >> o.s.shift), int((end - 1) >> o.s.shift), true
}

// Present reports whether every byte of [off, off+n) within the object is in
// present blocks.
func (o *Object) Present(off, n int64) bool {
	first, last, ok := o.blocks(off, n)
	if !ok {
		return true
	}
	for i := first; i <= last; i++ {
		if !o.e.has(i) {
			return false
		}
	}
	return true
}

// Missing returns the block-aligned spans that are not present among the
// blocks covering [off, off+n), coalescing neighbours. The last span of an
// object may be short.
func (o *Object) Missing(off, n int64) []Span {
	first, last, ok := o.blocks(off, n)
	if !ok {
		return nil
	}
	var out []Span
	for i := first; i <= last; i++ {
		if o.e.has(i) {
			continue
		}
		b := o.Block(i)
		if k := len(out) - 1; k >= 0 && out[k].Off+out[k].Len == b.Off {
			out[k].Len += b.Len
		} else {
			out = append(out, b)
		}
	}
	return out
}

// ReadAt reads present bytes. It fails with ErrNotPresent, reading nothing,
// when any block the read touches is missing, and returns io.EOF when the
// read reaches past the end of the object.
func (o *Object) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("rangestore: negative offset %d", off)
	}
	if off >= o.e.meta.Length {
		if len(p) == 0 && off == o.e.meta.Length {
			return 0, nil
		}
		return 0, io.EOF
	}
	if len(p) == 0 {
		// Nothing to read, and possibly no data file yet to read it from.
		return 0, nil
	}
	want := min(int64(len(p)), o.e.meta.Length-off)
	if !o.Present(off, want) {
		return 0, ErrNotPresent
	}
	f, err := o.e.sharedFile(o.s)
	if err != nil {
		return 0, err
	}
	n, err := f.ReadAt(p[:want], off)
	if err == nil && want < int64(len(p)) {
		err = io.EOF
	}
	return n, err
}

// sharedFile returns the descriptor of e's data file shared by its readers
// and block writers, opening it on first use; the caller holds a reference
// to e, which keeps it open. The fast path is one atomic load, so readers of
// a hot object do not serialise on a lock, and writers open no file per
// block.
func (e *entry) sharedFile(s *Store) (*os.File, error) {
	if f := e.file.Load(); f != nil {
		return f, nil
	}
	e.rmu.Lock()
	defer e.rmu.Unlock()
	if f := e.file.Load(); f != nil {
		return f, nil
	}
	f, err := os.OpenFile(s.dataPath(e.gen), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("rangestore: %w", err)
	}
	e.file.Store(f)
	return f, nil
}

// Open returns a new read-only descriptor of the object's data file, with
// its own offset, for zero-copy serving (sendfile through io.Copy). Its
// apparent size is the object's length. Only bytes of present blocks are
// meaningful: check Present first. The caller closes it; it stays valid
// after the object is invalidated.
func (o *Object) Open() (*os.File, error) {
	if err := o.ensureFile(); err != nil {
		return nil, err
	}
	f, err := os.Open(o.s.dataPath(o.e.gen))
	if err != nil {
		return nil, fmt.Errorf("rangestore: %w", err)
	}
	return f, nil
}

// ensureFile creates the sparse data file of an object nothing was written
// to yet (an empty object, say), so Open can serve it.
func (o *Object) ensureFile() error {
	s, e := o.s, o.e
	s.mu.Lock()
	defer s.mu.Unlock()
	if e.hasFile || e.deleted {
		// A deleted object without a file has no bytes to serve; the
		// open below fails.
		return nil
	}
	if err := createSparse(s.dataPath(e.gen), e.meta.Length); err != nil {
		return err
	}
	e.hasFile = true
	return nil
}

// Close releases the handle. It is safe to call more than once.
func (o *Object) Close() error {
	if o.closed.Swap(true) {
		return nil
	}
	o.s.release(o.e)
	return nil
}

// WriteBlock starts writing block i. Only one writer may hold a block at a
// time (ErrBlockBusy), a present block cannot be rewritten
// (ErrBlockPresent), and the block's bytes are reserved against the disk
// budget first, evicting least-recently-used objects if needed (ErrNoSpace
// when that is not enough). The writer must be committed or aborted; until
// then it holds the object open, like a handle.
func (o *Object) WriteBlock(i int) (*BlockWriter, error) {
	s, e := o.s, o.e
	if i < 0 || i >= e.nblocks {
		return nil, fmt.Errorf("rangestore: block %d out of range [0, %d)", i, e.nblocks)
	}
	n := s.blockLen(e.meta.Length, i)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return nil, ErrClosed
	case e.deleted:
		return nil, ErrGone
	case e.has(i):
		return nil, ErrBlockPresent
	}
	if _, busy := e.writing[i]; busy {
		return nil, ErrBlockBusy
	}
	if err := s.reserve(n); err != nil {
		return nil, err
	}
	path := s.dataPath(e.gen)
	if !e.hasFile {
		if err := createSparse(path, e.meta.Length); err != nil {
			s.reserved -= n
			if isNoSpace(err) {
				s.evictBytes(n, e)
			}
			return nil, err
		}
		e.hasFile = true
	}
	f, err := e.sharedFile(s)
	if err != nil {
		s.reserved -= n
		return nil, err
	}
	e.refs++ // released by Commit or Abort
	if e.writing == nil {
		e.writing = make(map[int]struct{})
	}
	e.writing[i] = struct{}{}
	return &BlockWriter{o: o, i: i, off: int64(i) << s.shift, n: n, f: f}, nil
}

func createSparse(path string, length int64) error {
	// Only the fan-out directory: a store directory that went away (its
	// mount disappeared) must not be made anew on whatever is under it.
	if err := os.Mkdir(filepath.Dir(path), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("rangestore: %w", noSpace(err))
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("rangestore: %w", noSpace(err))
	}
	err = f.Truncate(length)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("rangestore: %w", noSpace(err))
	}
	return nil
}

// BlockWriter streams the bytes of one block to disk. The block becomes
// present only when Commit succeeds after exactly the block's length was
// written. A BlockWriter is for one goroutine.
type BlockWriter struct {
	o       *Object
	i       int
	off, n  int64
	f       *os.File
	crc     uint32
	written int64
	tried   bool // Write was called, so bytes may be on disk
	keep    bool // others read the bytes as they are written: never punch them
	done    bool
}

// Len returns the block's length.
func (w *BlockWriter) Len() int64 { return w.n }

// Written returns how many bytes have been written so far.
func (w *BlockWriter) Written() int64 { return w.written }

// Write appends p to the block. Writing past the block's length is an
// error. A full disk returns an error wrapping ErrNoSpace, after evicting
// enough least-recently-used data for the next attempt; the write can then
// go on from Written. Writes of 256 KiB or more are checksummed while the
// kernel copies them, so a caller that can should write in large pieces.
func (w *BlockWriter) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("rangestore: write after commit or abort")
	}
	if int64(len(p)) > w.n-w.written {
		return 0, fmt.Errorf("rangestore: %d bytes overflow block %d (%d of %d written)", len(p), w.i, w.written, w.n)
	}
	w.tried = true
	var n int
	var err error
	if len(p) >= parallelCRC {
		// Checksum while the kernel copies: for a large write that takes
		// the checksum off the block's latency.
		sum := make(chan uint32, 1)
		go func(crc uint32) { sum <- crc32.Update(crc, castagnoli, p) }(w.crc)
		n, err = w.f.WriteAt(p, w.off+w.written)
		crc := <-sum
		if n < len(p) {
			crc = crc32.Update(w.crc, castagnoli, p[:n])
		}
		w.crc = crc
	} else {
		n, err = w.f.WriteAt(p, w.off+w.written)
		w.crc = crc32.Update(w.crc, castagnoli, p[:n])
	}
	w.written += int64(n)
	if err != nil {
		err = noSpace(err)
		if isNoSpace(err) {
			w.o.s.mu.Lock()
			w.o.s.evictBytes(w.n, w.o.e)
			w.o.s.mu.Unlock()
		}
		return n, fmt.Errorf("rangestore: writing block %d: %w", w.i, err)
	}
	return n, nil
}

// Commit makes the block present. It fails, leaving the block missing, when
// fewer than Len bytes were written or the object was invalidated meanwhile.
func (w *BlockWriter) Commit() error {
	if w.done {
		return fmt.Errorf("rangestore: commit after commit or abort")
	}
	if w.written != w.n {
		w.Abort()
		return fmt.Errorf("%w: block %d has %d of %d bytes", ErrShortBlock, w.i, w.written, w.n)
	}
	w.done = true
	s, e := w.o.s, w.o.e
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.releaseLocked(e)
	delete(e.writing, w.i)
	s.reserved -= w.n
	switch {
	case s.closed:
		return ErrClosed
	case e.deleted:
		return ErrGone
	}
	if !e.transient {
		s.enc.b = s.enc.b[:0]
		s.enc.byte(recBlock)
		s.enc.uint(e.gen)
		s.enc.uint(uint64(w.i))
		s.enc.u32(w.crc)
		now := s.now()
		s.enc.int(now) // the object's last use, for eviction after a crash
		if err := s.appendRecord(); err != nil {
			// The block stays missing; give its disk space back, which on
			// a full disk is what the next attempt needs.
			w.punch()
			return err
		}
		s.recent = append(s.recent, blockRef{e, w.i})
		e.savedAccess = now
		s.touch(e)
	}
	e.crc.set(w.i, w.crc)
	e.set(w.i)
	e.presentBytes += w.n
	s.used += w.n
	return nil
}

// Abort gives the block up; it stays missing. Abort after Commit does
// nothing.
func (w *BlockWriter) Abort() {
	if w.done {
		return
	}
	w.done = true
	w.punch()
	s, e := w.o.s, w.o.e
	s.mu.Lock()
	delete(e.writing, w.i)
	s.reserved -= w.n
	s.releaseLocked(e)
	s.mu.Unlock()
}

// KeepBytes marks the block's bytes as read by others while it is being
// written (a cache streaming a fill to waiting clients straight from the
// data file): Abort and a failed Commit then leave the bytes written so far
// in place, not present, instead of punching them out from under a reader.
// They take disk space until the block is written again or the object goes.
func (w *BlockWriter) KeepBytes() { w.keep = true }

// punch gives back the disk space of the block, which is not present.
// The whole block, not only the bytes counted as written: a short write that
// fails (on a full disk, say) may have stored more than os.File.WriteAt
// reports.
func (w *BlockWriter) punch() {
	if w.tried && !w.keep {
		syscall.Fallocate(int(w.f.Fd()), fallocPunchHole|fallocKeepSize, w.off, w.n)
	}
}

// parallelCRC is the size of a write from which Write checksums it
// concurrently with writing it.
const parallelCRC = 256 << 10

const (
	fallocKeepSize  = 0x1 // FALLOC_FL_KEEP_SIZE
	fallocPunchHole = 0x2 // FALLOC_FL_PUNCH_HOLE
)
