package rangestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// testBS is the block size of most tests: the smallest allowed, so tests
// move little data.
const testBS = MinBlockSize

// seedOf names the deterministic content of one object version.
func seedOf(key, etag string) uint64 {
	h := fnv.New64a()
	io.WriteString(h, key)
	h.Write([]byte{0})
	io.WriteString(h, etag)
	return h.Sum64()
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// fill writes the content of the object version seed at byte offset off
// into p: every 8-byte word of the object is a hash of its index, so any
// misplaced, stale or torn byte shows.
func fill(p []byte, seed uint64, off int64) {
	var w [8]byte
	for len(p) > 0 {
		word := uint64(off) >> 3
		skip := int(off & 7)
		binary.LittleEndian.PutUint64(w[:], splitmix(seed^word*0x9e3779b97f4a7c15))
		n := copy(p, w[skip:])
		p = p[n:]
		off += int64(n)
	}
}

func content(seed uint64, off, n int64) []byte {
	p := make([]byte, n)
	fill(p, seed, off)
	return p
}

// metaV is the Meta of version v of key: lengths differ between versions so
// identities differ on length and ETag both.
func metaV(length int64, v int) Meta {
	return Meta{Length: length, ETag: fmt.Sprintf(`"v%d"`, v), ContentType: "application/octet-stream"}
}

func openStore(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	if opts.BlockSize == 0 {
		opts.BlockSize = testBS
	}
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	return s
}

func create(t testing.TB, s *Store, key string, m Meta) *Object {
	t.Helper()
	o, err := s.Create(key, m)
	if err != nil {
		t.Fatalf("Create(%q): %v", key, err)
	}
	return o
}

// writeBlock writes block i of o with its deterministic content, in pieces
// of the given size (the whole block when piece is 0), and commits it.
func writeBlock(t testing.TB, o *Object, i int, piece int) {
	t.Helper()
	if err := tryWriteBlock(o, i, piece); err != nil {
		t.Fatalf("writing block %d of %q: %v", i, o.Key(), err)
	}
}

func tryWriteBlock(o *Object, i int, piece int) error {
	w, err := o.WriteBlock(i)
	if err != nil {
		return err
	}
	b := o.Block(i)
	p := content(seedOf(o.Key(), o.Meta().ETag), b.Off, b.Len)
	if piece <= 0 {
		piece = len(p)
	}
	for len(p) > 0 {
		n := min(piece, len(p))
		if _, err := w.Write(p[:n]); err != nil {
			w.Abort()
			return err
		}
		p = p[n:]
	}
	return w.Commit()
}

// checkObject reads every block of o and checks present ones hold exactly
// their deterministic content, that missing ones are refused, and that
// Missing and Present agree with HasBlock.
func checkObject(t testing.TB, o *Object) {
	t.Helper()
	seed := seedOf(o.Key(), o.Meta().ETag)
	var want []Span
	for i := 0; i < o.Blocks(); i++ {
		b := o.Block(i)
		p := make([]byte, b.Len)
		n, err := o.ReadAt(p, b.Off)
		if !o.HasBlock(i) {
			if !errors.Is(err, ErrNotPresent) || n != 0 {
				t.Errorf("%q block %d missing but ReadAt = %d, %v", o.Key(), i, n, err)
			}
			if o.Present(b.Off, b.Len) {
				t.Errorf("%q block %d missing but Present says yes", o.Key(), i)
			}
			if k := len(want) - 1; k >= 0 && want[k].Off+want[k].Len == b.Off {
				want[k].Len += b.Len
			} else {
				want = append(want, b)
			}
			continue
		}
		if err != nil && err != io.EOF || n != len(p) {
			t.Errorf("%q block %d: ReadAt = %d, %v", o.Key(), i, n, err)
			continue
		}
		if exp := content(seed, b.Off, b.Len); !bytes.Equal(p, exp) {
			t.Errorf("%q block %d: content differs at byte %d", o.Key(), i, firstDiff(p, exp))
		}
	}
	if got := o.Missing(0, o.Size()); !spansEqual(got, want) {
		t.Errorf("%q: Missing = %v, HasBlock says %v", o.Key(), got, want)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func spansEqual(a, b []Span) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// checkStore runs checkObject on every object of s.
func checkStore(t testing.TB, s *Store) {
	t.Helper()
	for _, info := range s.List() {
		o, err := s.Get(info.Key)
		if err != nil {
			t.Fatalf("Get(%q) of a listed object: %v", info.Key, err)
		}
		checkObject(t, o)
		o.Close()
	}
}

// presence maps each key to its ETag and present blocks.
func presence(t testing.TB, s *Store) map[string]string {
	t.Helper()
	out := make(map[string]string)
	for _, info := range s.List() {
		o, err := s.Get(info.Key)
		if err != nil {
			t.Fatalf("Get(%q): %v", info.Key, err)
		}
		bits := make([]byte, o.Blocks())
		for i := range bits {
			bits[i] = '.'
			if o.HasBlock(i) {
				bits[i] = '#'
			}
		}
		out[info.Key] = o.Meta().ETag + " " + string(bits)
		o.Close()
	}
	return out
}

// crash abandons s as a killed process would: no final snapshot, journal
// and lock simply closed (the kernel keeps what was written), so the next
// Open recovers from the journal.
func (s *Store) crash() {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	close(s.stop)
	<-s.done
	s.mu.Lock()
	s.closed = true
	s.journal.Close()
	s.mu.Unlock()
	s.lock.Close()
}

// dataFiles lists the data files of the store in dir.
func dataFiles(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "data", "*", "*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// allocated returns the bytes the file system allocated to data files.
func allocated(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	for _, p := range dataFiles(t, dir) {
		st, err := os.Stat(p)
		if err != nil {
			continue // unlinked meanwhile
		}
		n += statBlocks(st) * 512
	}
	return n
}

func statBlocks(fi os.FileInfo) int64 { return fi.Sys().(*syscall.Stat_t).Blocks }
