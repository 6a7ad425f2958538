package rangestore

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if bench100k.dir != "" {
		os.RemoveAll(bench100k.dir)
	}
	os.Exit(code)
}

// BenchmarkReadHit compares ReadAt of present bytes through an open Object
// with os.File.ReadAt of the same bytes in a plain file, sequentially over
// 64 MiB so the page cache holds both.
func BenchmarkReadHit(b *testing.B) {
	const (
		bs     = DefaultBlockSize
		length = 64 << 20
	)
	dir := b.TempDir()
	s := openStore(b, dir, Options{BlockSize: bs})
	defer s.Close()
	o := create(b, s, "hit", metaV(length, 1))
	defer o.Close()
	for i := range o.Blocks() {
		writeBlock(b, o, i, 0)
	}
	raw, err := os.Create(filepath.Join(dir, "raw"))
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	// Written like the store's file, sized first and then one block per
	// write: the page cache keeps large writes in large folios, which are
	// faster to read back.
	if err := raw.Truncate(length); err != nil {
		b.Fatal(err)
	}
	p := make([]byte, bs)
	for off := int64(0); off < length; off += bs {
		if _, err := o.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
		if _, err := raw.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	for _, size := range []struct {
		name string
		n    int
	}{{"1MiB", 1 << 20}, {"4KiB", 4 << 10}} {
		for _, r := range []struct {
			name string
			r    io.ReaderAt
		}{{"store", o}, {"raw", raw}} {
			b.Run(size.name+"/"+r.name, func(b *testing.B) {
				p := make([]byte, size.n)
				b.SetBytes(int64(size.n))
				off := int64(0)
				for b.Loop() {
					if _, err := r.r.ReadAt(p, off); err != nil {
						b.Fatal(err)
					}
					if off += int64(size.n); off == length {
						off = 0
					}
				}
			})
		}
	}
}

// BenchmarkWriteBlock compares writing and committing 1 MiB blocks with
// writing the same bytes sequentially to a plain file. Both start a new
// 256 MiB file (object) when one is full and delete the old one, so
// neither fills the disk or the page cache.
func BenchmarkWriteBlock(b *testing.B) {
	const (
		bs        = DefaultBlockSize
		perObject = 256
	)
	p := content(1, 0, bs)
	b.Run("store", func(b *testing.B) {
		s := openStore(b, b.TempDir(), Options{BlockSize: bs})
		defer s.Close()
		b.SetBytes(bs)
		var o *Object
		i, n := perObject, 0
		for b.Loop() {
			if i == perObject {
				if o != nil {
					o.Close()
					s.Invalidate(o.Key())
				}
				o = create(b, s, fmt.Sprint("w", n), metaV(perObject*bs, n))
				i, n = 0, n+1
			}
			w, err := o.WriteBlock(i)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := w.Write(p); err != nil {
				b.Fatal(err)
			}
			if err := w.Commit(); err != nil {
				b.Fatal(err)
			}
			i++
		}
		o.Close()
	})
	b.Run("raw", func(b *testing.B) {
		dir := b.TempDir()
		b.SetBytes(bs)
		var f *os.File
		i, n := perObject, 0
		for b.Loop() {
			if i == perObject {
				if f != nil {
					f.Close()
					os.Remove(f.Name())
				}
				var err error
				if f, err = os.Create(filepath.Join(dir, fmt.Sprint("w", n))); err != nil {
					b.Fatal(err)
				}
				i, n = 0, n+1
			}
			if _, err := f.Write(p); err != nil {
				b.Fatal(err)
			}
			i++
		}
		f.Close()
	})
}

// bench100k is a store of 100,000 small objects with one committed block
// each, built once per process (it takes a while) and removed by TestMain.
var bench100k struct {
	once sync.Once
	dir  string
	err  error
}

const objects100k = 100_000

func store100k(b *testing.B) string {
	bench100k.once.Do(func() {
		start := time.Now()
		dir, err := os.MkdirTemp("", "rangestore-bench-100k-")
		if err != nil {
			bench100k.err = err
			return
		}
		bench100k.dir = dir
		s, err := Open(dir, Options{})
		if err != nil {
			bench100k.err = err
			return
		}
		rng := rand.New(rand.NewPCG(1, 2))
		// Keys, ETags and dates shaped like a CDN's.
		lastMod := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
		for n := range objects100k {
			m := Meta{
				Length:       int64(1000 + rng.IntN(3000)),
				ETag:         fmt.Sprintf(`"%016x"`, rng.Uint64()),
				LastModified: lastMod.Add(time.Duration(rng.IntN(1e6)) * time.Second).Format(time.RFC1123),
				ContentType:  "video/mp4",
			}
			o, err := s.Create(fmt.Sprintf("https://cdn.example.com/media/%03d/%06d/segment.mp4", n%977, n), m)
			if err == nil {
				err = tryWriteBlock(o, 0, 0)
				o.Close()
			}
			if err != nil {
				bench100k.err = err
				s.Close()
				return
			}
		}
		bench100k.err = s.Close()
		b.Logf("built %d objects in %v", objects100k, time.Since(start))
	})
	if bench100k.err != nil {
		b.Fatal(bench100k.err)
	}
	return bench100k.dir
}

// BenchmarkReopen100kObjects times opening (one snapshot read, the data
// directories listed for orphans) and closing (one snapshot written) a store
// of 100,000 objects.
func BenchmarkReopen100kObjects(b *testing.B) {
	dir := store100k(b)
	var open time.Duration
	for b.Loop() {
		start := time.Now()
		s, err := Open(dir, Options{})
		if err != nil {
			b.Fatal(err)
		}
		open += time.Since(start)
		if n := s.Stats().Objects; n != objects100k {
			b.Fatalf("%d objects after reopen", n)
		}
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(open.Milliseconds())/float64(b.N), "open-ms/op")
}

// BenchmarkIndexSnapshot100k reports the size of the index of 100,000
// objects, raw and zstd-compressed, and the time to encode and compress it
// (ns/op), the part of a snapshot that does not depend on the disk.
func BenchmarkIndexSnapshot100k(b *testing.B) {
	s, err := Open(store100k(b), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	var raw, z []byte
	var encode time.Duration
	for b.Loop() {
		start := time.Now()
		s.snapMu.Lock()
		s.mu.Lock()
		s.captureIndex()
		s.mu.Unlock()
		raw = s.encodeIndex(1, nil)
		s.snapMu.Unlock()
		encode += time.Since(start)
		z = compressIndex(raw)
	}
	b.ReportMetric(float64(len(raw)), "raw-B")
	b.ReportMetric(float64(len(z)), "zstd-B")
	b.ReportMetric(float64(len(raw))/float64(len(z)), "ratio")
	b.ReportMetric(float64(encode.Microseconds())/float64(b.N)/1000, "encode-ms/op")
}

// BenchmarkSnapshotLockHold100k snapshots a store of 100,000 objects and
// reports how long each snapshot held the store's lock (hold-ms/op), the
// time every Get, Create and Commit waits behind it; ns/op is the whole
// snapshot, written to disk.
func BenchmarkSnapshotLockHold100k(b *testing.B) {
	s, err := Open(store100k(b), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	var hold time.Duration
	for b.Loop() {
		if err := s.snapshot(false); err != nil {
			b.Fatal(err)
		}
		hold += s.snapHold
	}
	b.ReportMetric(float64(hold.Microseconds())/float64(b.N)/1000, "hold-ms/op")
}
