package rangestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
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
		s.mu.Lock()
		changed := s.changes > 0
		s.mu.Unlock()
		if changed {
			s.snapshot()
		}
	}
}

// snapshot writes the whole index to a new index file and starts a new
// journal. Data files written since the last snapshot are fsynced first, so
// blocks in a snapshot need no checking after a crash.
func (s *Store) snapshot() error {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	seq := s.seq + 1
	next, err := os.OpenFile(s.journalPath(seq), os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.mu.Unlock()
		return fmt.Errorf("rangestore: snapshot: %w", noSpace(err))
	}
	body := s.encodeIndex(seq)
	dirty := s.dirty
	s.dirty = make(map[uint64]struct{})
	prev, prevSeq := s.journal, s.seq
	s.journal, s.seq, s.changes = next, seq, 0
	s.mu.Unlock()

	for gen := range dirty {
		if f, err := os.OpenFile(s.dataPath(gen), os.O_WRONLY, 0); err == nil {
			f.Sync()
			f.Close()
		}
	}
	err = writeFileAtomic(filepath.Join(s.dir, "index"), compressIndex(body))
	if prev != nil {
		prev.Close()
	}
	if err != nil {
		// The previous journal stays; Open replays both.
		return err
	}
	os.Remove(s.journalPath(prevSeq))
	return nil
}

// encodeIndex returns the uncompressed index body. s.mu must be held.
func (s *Store) encodeIndex(seq uint64) []byte {
	e := encoder{b: make([]byte, 0, 64+len(s.objects)*96)}
	e.uint(seq)
	e.uint(uint64(s.blockSize))
	e.uint(s.nextGen)
	e.uint(uint64(len(s.objects)))
	for _, o := range s.objects {
		e.uint(o.gen)
		e.string(o.key)
		e.meta(&o.meta)
		e.int(o.lastAccess)
		for w := range o.present {
			e.b = binary.LittleEndian.AppendUint64(e.b, o.present[w].Load())
		}
		for i := 0; i < o.nblocks; i++ {
			if o.has(i) {
				e.u32(o.crc[i])
			}
		}
	}
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

// readIndex loads the index file, if any, into s and returns its sequence.
func (s *Store) readIndex() (uint64, error) {
	raw, err := os.ReadFile(filepath.Join(s.dir, "index"))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("rangestore: %w", err)
	}
	if !bytes.HasPrefix(raw, []byte(indexMagic)) || len(raw) < len(indexMagic)+4 {
		return 0, errBadIndex
	}
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	defer dec.Close()
	body, err := dec.DecodeAll(raw[len(indexMagic):len(raw)-4], nil)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", errBadIndex, err)
	}
	d := decoder{b: raw[len(raw)-4:]}
	if d.u32() != crc32.Checksum(body, castagnoli) {
		return 0, errBadIndex
	}
	d = decoder{b: body}
	seq := d.uint()
	if bs := int64(d.uint()); bs != s.blockSize && d.err == nil {
		return 0, blockSizeError(s.dir, bs, s.blockSize)
	}
	s.nextGen = d.uint()
	n := d.uint()
	for i := uint64(0); i < n && d.err == nil; i++ {
		gen := d.uint()
		key := d.string()
		m := d.meta()
		if m.Length < 0 {
			d.fail()
		}
		if d.err != nil {
			break
		}
		e := s.newEntry(key, gen, m)
		e.lastAccess = d.int()
		for w := range e.present {
			if b := d.bytes(8); b != nil {
				e.present[w].Store(binary.LittleEndian.Uint64(b))
			}
		}
		for j := 0; j < e.nblocks; j++ {
			if e.has(j) {
				e.crc[j] = d.u32()
				e.presentBytes += s.blockLen(m.Length, j)
			}
		}
		e.hasFile = e.presentBytes > 0
		s.objects[key] = e
	}
	if d.err != nil {
		return 0, fmt.Errorf("%w: %v", errBadIndex, d.err)
	}
	return seq, nil
}

// suspect is a block committed after the last snapshot, to be verified.
type suspect struct {
	e *entry
	i int
}

// recover loads the index, replays the journals after it, verifies the
// blocks they committed, removes data files nothing refers to, and leaves an
// empty journal open for appending.
func (s *Store) recover() error {
	seq, err := s.readIndex()
	if err != nil {
		return err
	}
	s.seq = seq
	s.removeOldJournals(seq)

	byGen := make(map[uint64]*entry, len(s.objects))
	for _, e := range s.objects {
		byGen[e.gen] = e
	}
	var suspects []suspect
	replayed := 0
	for j := seq; ; j++ {
		raw, err := os.ReadFile(s.journalPath(j))
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("rangestore: %w", err)
		}
		for len(raw) > 0 {
			payload, rest, ok := unframe(raw)
			if !ok {
				break // a torn tail: everything after it is lost
			}
			raw = rest
			replayed++
			suspects = s.apply(payload, byGen, suspects)
		}
		s.seq = j
	}

	for _, b := range suspects {
		if !b.e.has(b.i) || b.e.deleted {
			continue
		}
		if !s.verify(b.e, b.i) {
			b.e.clear(b.i)
			b.e.presentBytes -= s.blockLen(b.e.meta.Length, b.i)
		}
		s.dirty[b.e.gen] = struct{}{}
	}
	s.removeOrphans()

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
	s.journal = j
	if replayed > 0 {
		// Start from a clean snapshot: replayed records may end in a torn
		// tail that later appends must not follow.
		return s.snapshot()
	}
	return nil
}

// apply replays one journal record.
func (s *Store) apply(payload []byte, byGen map[uint64]*entry, suspects []suspect) []suspect {
	d := decoder{b: payload}
	switch d.byte() {
	case recCreate:
		gen := d.uint()
		key := d.string()
		m := d.meta()
		d.int()
		if d.err != nil || m.Length < 0 {
			return suspects
		}
		if old := s.objects[key]; old != nil {
			old.deleted = true
			delete(byGen, old.gen)
		}
		e := s.newEntry(key, gen, m)
		e.lastAccess = time.Now().UnixNano()
		s.objects[key] = e
		byGen[gen] = e
		s.nextGen = max(s.nextGen, gen)
	case recBlock:
		gen, i, sum := d.uint(), int(d.uint()), d.u32()
		e := byGen[gen]
		if d.err != nil || e == nil || i < 0 || i >= e.nblocks || e.has(i) {
			return suspects
		}
		e.set(i)
		e.crc[i] = sum
		e.presentBytes += s.blockLen(e.meta.Length, i)
		e.hasFile = true
		e.lastAccess = time.Now().UnixNano()
		suspects = append(suspects, suspect{e, i})
	case recDelete:
		gen := d.uint()
		if e := byGen[gen]; e != nil && d.err == nil {
			e.deleted = true
			delete(s.objects, e.key)
			delete(byGen, gen)
		}
	}
	return suspects
}

// verify reports whether block i of e reads back with its checksum.
func (s *Store) verify(e *entry, i int) bool {
	f, err := os.Open(s.dataPath(e.gen))
	if err != nil {
		return false
	}
	defer f.Close()
	off := int64(i) << s.shift
	h := crc32.New(castagnoli)
	n, err := io.Copy(h, io.NewSectionReader(f, off, s.blockLen(e.meta.Length, i)))
	return err == nil && n == s.blockLen(e.meta.Length, i) && h.Sum32() == e.crc[i]
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
			for i := range e.present {
				e.present[i].Store(0)
			}
			e.presentBytes = 0
			e.hasFile = false
		}
	}
}
