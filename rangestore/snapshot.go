package rangestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	mbits "math/bits"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
)

// indexMagic starts the index file; a CRC-32C of the uncompressed body ends
// it.
const indexMagic = "rangestore-index 1\n"

func (s *Store) journalPath(seq uint64) string {
	return filepath.Join(s.dir, "journal-"+strconv.FormatUint(seq, 10))
}

// snapshotLoop snapshots the index every SnapshotInterval while anything
// changed, and sooner when the journal grows past snapshotRecords.
func (s *Store) snapshotLoop() {
	defer close(s.done)
	t := time.NewTicker(s.opts.SnapshotInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		case <-s.kick:
		}
		s.backgroundSnapshot()
	}
}

// backgroundSnapshot runs snapshotIfDue for the snapshot goroutine, which
// has no caller to return an error to: failures and panics go to
// Options.Log, and the journal keeps every change until a snapshot works.
func (s *Store) backgroundSnapshot() {
	defer func() {
		if v := recover(); v != nil {
			s.log(fmt.Sprintf("rangestore: panic in a background snapshot: %v\n%s", v, debug.Stack()))
		}
	}()
	if err := s.snapshotIfDue(); err != nil {
		s.log("rangestore: background snapshot failed: " + err.Error())
	}
}

func (s *Store) log(msg string) {
	if s.opts.Log != nil {
		s.opts.Log(msg)
	}
}

// snapshotIfDue snapshots the index if anything was journalled, or an
// object's recorded last use grew stale, since the last snapshot.
func (s *Store) snapshotIfDue() error {
	s.mu.Lock()
	due := s.changes > 0 || s.accessDirty
	s.mu.Unlock()
	if !due {
		return nil
	}
	return s.snapshot(false)
}

// testHookSnapshot, when set by a test, is called at each step of a
// snapshot so a crash test can kill the process exactly there.
var testHookSnapshot func(step string)

// snapshot writes the whole index to a new index file and starts a new
// journal.
//
// Data is synced one snapshot late: the blocks committed since the last
// snapshot are listed in the new index as not yet synced (Open verifies
// them), and it is the blocks the last snapshot listed so that are synced
// now, before the new index replaces it. By then the kernel has usually
// written them back, and data deleted meanwhile is never synced at all. The
// final snapshot of Close syncs everything, so a cleanly closed store opens
// without verifying anything.
//
// With final set, the store is marked closed in the same critical section
// that captures the index, so nothing can be journalled after it.
//
// The critical section only copies what changes (presence bitmaps, access
// times) and swaps journals, so that every record after the capture goes to
// the new journal; the index is encoded and compressed after it, from the
// capture and the entries' immutable fields.
func (s *Store) snapshot(final bool) error {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()

	// Only snapshots change s.seq, under snapMu.
	seq := s.seq + 1
	next, err := os.OpenFile(s.journalPath(seq), os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("rangestore: snapshot: %w", noSpace(err))
	}
	// A journal without its reserve for delete records is worse than the
	// old one, which keeps being used.
	if err := s.reserveJournal(next, 0); err != nil {
		next.Close()
		os.Remove(s.journalPath(seq))
		return fmt.Errorf("rangestore: snapshot: %w", err)
	}
	s.mu.Lock()
	locked := time.Now()
	if s.closed {
		s.mu.Unlock()
		next.Close()
		os.Remove(s.journalPath(seq))
		return ErrClosed
	}
	sync := s.unsynced
	listed := s.recent
	if final {
		sync, listed = append(sync, listed...), nil
	}
	listed = live(listed)
	gens := make(map[uint64]struct{})
	for _, b := range sync {
		if !b.e.deleted {
			gens[b.e.gen] = struct{}{}
		}
	}
	s.captureIndex()
	s.unsynced, s.recent = listed, nil
	prev, prevSeq := s.journal, s.seq
	s.journal, s.seq, s.changes = next, seq, 0
	s.jsize, s.jtorn, s.jalloc = 0, false, 2*deleteReserve
	if final {
		s.closed = true
	}
	s.mu.Unlock()
	s.snapHold = time.Since(locked)
	// listed is s.unsynced, which later snapshots replace and never modify.
	body := s.encodeIndex(seq, listed)
	hook := testHookSnapshot
	if hook != nil {
		hook("journal-swapped")
	}

	var serr error
	for gen := range gens {
		f, err := os.OpenFile(s.dataPath(gen), os.O_WRONLY, 0)
		if err != nil {
			continue // gone meanwhile: nothing to sync
		}
		if err := f.Sync(); err != nil && serr == nil {
			serr = fmt.Errorf("rangestore: snapshot: syncing data: %w", err)
		}
		f.Close()
	}
	if serr != nil {
		// The new index would trust blocks that may not be on disk. Keep
		// the old one, which lists them (or whose journal does), and try
		// them again next time.
		if prev != nil {
			prev.Close()
		}
		s.mu.Lock()
		s.unsynced = append(s.unsynced, sync...)
		s.accessDirty = true
		s.mu.Unlock()
		return serr
	}
	if hook != nil {
		hook("data-synced")
	}
	err = WriteFileAtomic(filepath.Join(s.dir, "index"), compressIndex(body))
	if prev != nil {
		prev.Close()
	}
	if err != nil {
		// The previous journal stays; Open replays both.
		s.mu.Lock()
		s.accessDirty = true
		s.mu.Unlock()
		return err
	}
	if hook != nil {
		hook("index-renamed")
	}
	os.Remove(s.journalPath(prevSeq))
	return nil
}

// live returns the blocks of refs still present in objects not deleted,
// reusing refs' array.
func live(refs []blockRef) []blockRef {
	out := refs[:0]
	for _, b := range refs {
		if !b.e.deleted && b.e.has(b.i) {
			out = append(out, b)
		}
	}
	return out
}

// indexCapture is what a snapshot copies of the index under s.mu: the
// entries, and what of them may change later. An entry's key, generation,
// Meta and the checksum of a present block never change.
type indexCapture struct {
	nextGen uint64
	objects []capturedObject
	words   []uint64 // the objects' presence bitmaps, one after the other
}

type capturedObject struct {
	e          *entry
	lastAccess int64
}

// captureIndex fills s.capture from the index, reusing its arrays. s.snapMu
// and s.mu must be held.
func (s *Store) captureIndex() {
	c := &s.capture
	c.nextGen = s.nextGen
	c.objects, c.words = c.objects[:0], c.words[:0]
	s.accessDirty = false
	for _, e := range s.objects {
		e.savedAccess = e.lastAccess
		c.objects = append(c.objects, capturedObject{e, e.lastAccess})
		for w := range e.present {
			c.words = append(c.words, e.present[w].Load())
		}
	}
}

// encodeIndex returns the uncompressed index body: every object of
// s.capture, then the blocks not yet synced. It appends to s.ibuf[:0], so
// the body is valid until the next call. s.snapMu must be held.
func (s *Store) encodeIndex(seq uint64, unsynced []blockRef) []byte {
	c := &s.capture
	if want := 64 + len(c.objects)*160 + len(c.words)*8; cap(s.ibuf) < want {
		s.ibuf = make([]byte, 0, want)
	}
	e := encoder{b: s.ibuf[:0]}
	e.uint(seq)
	e.uint(uint64(s.blockSize))
	e.uint(c.nextGen)
	e.uint(uint64(len(c.objects)))
	words := c.words
	for _, co := range c.objects {
		o := co.e
		e.uint(o.gen)
		e.string(o.key)
		e.meta(&o.meta)
		e.int(co.lastAccess)
		own := words[:len(o.present)]
		words = words[len(o.present):]
		for _, w := range own {
			e.b = binary.LittleEndian.AppendUint64(e.b, w)
		}
		for w, bits := range own {
			for ; bits != 0; bits &= bits - 1 {
				e.u32(o.crc.get(w*64 + mbits.TrailingZeros64(bits)))
			}
		}
	}
	e.uint(uint64(len(unsynced)))
	for _, b := range unsynced {
		e.uint(b.e.gen)
		e.uint(uint64(b.i))
	}
	s.ibuf = e.b
	return e.b
}

func compressIndex(body []byte) []byte {
	out := []byte(indexMagic)
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	out = enc.EncodeAll(body, out)
	enc.Close()
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(body, castagnoli))
}

var errBadIndex = errors.New("rangestore: index file is damaged")

// readIndex loads the index file, if any, into s and returns its sequence
// and the blocks it lists as not yet synced.
func (s *Store) readIndex() (uint64, []blockRef, error) {
	raw, err := os.ReadFile(filepath.Join(s.dir, "index"))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil, nil
	}
	if err != nil {
		return 0, nil, fmt.Errorf("rangestore: %w", err)
	}
	if !bytes.HasPrefix(raw, []byte(indexMagic)) || len(raw) < len(indexMagic)+4 {
		return 0, nil, errBadIndex
	}
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	defer dec.Close()
	body, err := dec.DecodeAll(raw[len(indexMagic):len(raw)-4], nil)
	if err != nil {
		return 0, nil, fmt.Errorf("%w: %v", errBadIndex, err)
	}
	d := decoder{b: raw[len(raw)-4:]}
	if d.u32() != crc32.Checksum(body, castagnoli) {
		return 0, nil, errBadIndex
	}
	d = decoder{b: body}
	seq := d.uint()
	if bs := int64(d.uint()); bs != s.blockSize && d.err == nil {
		return 0, nil, blockSizeError(s.dir, bs, s.blockSize)
	}
	s.nextGen = d.uint()
	n := d.uint()
	byGen := make(map[uint64]*entry, min(n, uint64(len(body))))
	for i := uint64(0); i < n && d.err == nil; i++ {
		gen := d.uint()
		key := d.string()
		m := d.meta()
		if !validLength(m.Length) {
			d.fail()
		}
		if d.err != nil {
			break
		}
		e := s.newEntry(key, gen, m)
		e.lastAccess = d.int()
		e.savedAccess = e.lastAccess
		for w := range e.present {
			if b := d.bytes(8); b != nil {
				e.present[w].Store(binary.LittleEndian.Uint64(b))
			}
		}
		for w := range e.present {
			for bits := e.present[w].Load(); bits != 0; bits &= bits - 1 {
				j := w*64 + mbits.TrailingZeros64(bits)
				if j >= e.nblocks {
					d.fail()
					break
				}
				e.crc.set(j, d.u32())
				e.presentBytes += s.blockLen(m.Length, j)
			}
		}
		e.hasFile = e.presentBytes > 0
		s.objects[key] = e
		byGen[gen] = e
	}
	var unsynced []blockRef
	// Indexes written before blocks were synced late end here.
	for n := d.optionalUint(); n > 0 && d.err == nil; n-- {
		gen, i := d.uint(), int(d.uint())
		if e := byGen[gen]; e != nil && i >= 0 && i < e.nblocks && e.has(i) {
			unsynced = append(unsynced, blockRef{e, i})
		}
	}
	if d.err != nil {
		return 0, nil, fmt.Errorf("%w: %v", errBadIndex, d.err)
	}
	return seq, unsynced, nil
}

// recover loads the index, replays the journals after it, verifies the
// blocks not known to be synced (those the index lists and those the
// journals committed), removes data files nothing refers to, and leaves a
// journal of whole records open for appending.
func (s *Store) recover() error {
	seq, unsynced, err := s.readIndex()
	if err != nil {
		return err
	}
	s.seq = seq
	s.removeOldJournals(seq)

	byGen := make(map[uint64]*entry, len(s.objects))
	for _, e := range s.objects {
		byGen[e.gen] = e
	}
	var journalled []blockRef
	replayed := false
	var whole, size int64 // of the last journal: bytes of whole records, all bytes
	for j := seq; ; j++ {
		raw, err := os.ReadFile(s.journalPath(j))
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("rangestore: %w", err)
		}
		size = int64(len(raw))
		for len(raw) > 0 {
			payload, rest, ok := unframe(raw)
			if !ok {
				break // a torn tail: everything after it is lost
			}
			raw = rest
			replayed = true
			s.recovery.Records++
			journalled = s.apply(payload, byGen, journalled)
		}
		whole = size - int64(len(raw))
		s.seq = j
	}

	// Verified after the whole replay, against the last checksum recorded.
	for _, b := range append(unsynced, journalled...) {
		if !b.e.has(b.i) || b.e.deleted {
			continue
		}
		ok, read := s.verify(b.e, b.i)
		if read {
			s.recovery.BlocksChecked++
		}
		if !ok {
			// Without a data file the whole object goes (removeOrphans).
			b.e.clear(b.i)
			b.e.presentBytes -= s.blockLen(b.e.meta.Length, b.i)
			if read {
				s.recovery.BlocksDropped++
			}
		}
	}
	s.removeOrphans()
	// Still not known to be synced: the next snapshot syncs those the
	// index lists, and lists the journalled ones.
	s.unsynced, s.recent = live(unsynced), live(journalled)

	// Oldest first, so the most recently used ends at the front.
	all := make([]*entry, 0, len(s.objects))
	for _, e := range s.objects {
		all = append(all, e)
		s.used += e.presentBytes
	}
	sort.Slice(all, func(i, j int) bool { return all[i].lastAccess < all[j].lastAccess })
	for _, e := range all {
		e.elem = s.lru.PushFront(e)
	}

	j, err := os.OpenFile(s.journalPath(s.seq), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("rangestore: %w", err)
	}
	s.journal, s.jsize = j, whole
	s.recovery.TornTail = whole < size
	if whole < size {
		// Appends must not follow a torn tail, where the next Open would
		// stop reading. Cutting it off needs no space, unlike the snapshot
		// below, so a full disk does not keep the store from opening.
		if err := j.Truncate(whole); err != nil {
			s.jtorn = true
		}
	}
	if replayed || s.jtorn {
		// Fold the journal into a snapshot and start an empty one (with
		// its own reserve). On a full disk the journal will do.
		if err := s.snapshot(false); err != nil && (s.jtorn || !isNoSpace(err)) {
			return err
		}
	}
	if s.journal == j {
		// On a full disk the reserve comes with the first eviction.
		s.reserveJournal(j, whole)
	}
	return nil
}

// apply replays one journal record, adding the blocks it commits to
// journalled.
func (s *Store) apply(payload []byte, byGen map[uint64]*entry, journalled []blockRef) []blockRef {
	d := decoder{b: payload}
	switch d.byte() {
	case recCreate:
		gen := d.uint()
		key := d.string()
		m := d.meta()
		created := d.int()
		if d.err != nil || !validLength(m.Length) {
			return journalled
		}
		if old := s.objects[key]; old != nil {
			old.deleted = true
			delete(byGen, old.gen)
		}
		e := s.newEntry(key, gen, m)
		e.lastAccess = created
		if created == 0 {
			// A record from before creation times were journalled.
			e.lastAccess = s.now()
		}
		e.savedAccess = e.lastAccess
		s.objects[key] = e
		byGen[gen] = e
		s.nextGen = max(s.nextGen, gen)
	case recBlock:
		gen, i, sum := d.uint(), int(d.uint()), d.u32()
		used := d.optionalInt()
		e := byGen[gen]
		if d.err != nil || e == nil || i < 0 || i >= e.nblocks {
			return journalled
		}
		// A block is committed twice only when recovery dropped it and
		// could not snapshot that; the later record has its bytes.
		e.crc.set(i, sum)
		if !e.has(i) {
			e.set(i)
			e.presentBytes += s.blockLen(e.meta.Length, i)
		}
		e.hasFile = true
		if used == 0 {
			// A record from before commit times were journalled.
			used = s.now()
		}
		e.lastAccess = max(e.lastAccess, used)
		e.savedAccess = e.lastAccess
		journalled = append(journalled, blockRef{e, i})
	case recDelete:
		gen := d.uint()
		if e := byGen[gen]; e != nil && d.err == nil {
			e.deleted = true
			delete(s.objects, e.key)
			delete(byGen, gen)
		}
	}
	return journalled
}

// verify reports whether block i of e reads back with its checksum, and
// whether e has a data file to read it from.
func (s *Store) verify(e *entry, i int) (ok, read bool) {
	f, err := os.Open(s.dataPath(e.gen))
	if err != nil {
		return false, false
	}
	defer f.Close()
	off := int64(i) << s.shift
	h := crc32.New(castagnoli)
	n, err := io.Copy(h, io.NewSectionReader(f, off, s.blockLen(e.meta.Length, i)))
	return err == nil && n == s.blockLen(e.meta.Length, i) && h.Sum32() == e.crc.get(i), true
}

func (s *Store) removeOldJournals(seq uint64) {
	names, _ := filepath.Glob(filepath.Join(s.dir, "journal-*"))
	for _, p := range names {
		n, err := strconv.ParseUint(strings.TrimPrefix(filepath.Base(p), "journal-"), 10, 64)
		if err == nil && n < seq {
			os.Remove(p)
		}
	}
}

// removeOrphans deletes data files of generations no object refers to, and
// forgets the blocks of objects whose data file is missing.
func (s *Store) removeOrphans() {
	live := make(map[uint64]*entry, len(s.objects))
	for _, e := range s.objects {
		live[e.gen] = e
	}
	found := make(map[uint64]bool, len(live))
	dirs, _ := os.ReadDir(filepath.Join(s.dir, "data"))
	for _, d := range dirs {
		sub := filepath.Join(s.dir, "data", d.Name())
		files, _ := os.ReadDir(sub)
		for _, f := range files {
			gen, err := strconv.ParseUint(f.Name(), 16, 64)
			if err == nil && live[gen] != nil {
				found[gen] = true
				continue
			}
			os.Remove(filepath.Join(sub, f.Name()))
		}
	}
	for gen, e := range live {
		if e.hasFile && !found[gen] {
			// Only removing the object takes its data file: its delete
			// record was lost.
			e.deleted = true
			delete(s.objects, e.key)
			s.recovery.ObjectsDropped++
			continue
		}
		// An object may have a data file without present blocks (its
		// writes were aborted or lost); remembering it lets eviction
		// remove the file.
		e.hasFile = found[gen]
	}
}
