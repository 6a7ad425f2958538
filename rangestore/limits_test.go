package rangestore

import (
	"bytes"
	"errors"
	"math"
	"runtime"
	"testing"
)

func TestAbsurdLengthsAreRefusedWithoutAllocating(t *testing.T) {
	const limit = 100 * testBS
	s := openStore(t, t.TempDir(), Options{MaxObjectSize: limit})
	defer s.Close()
	for _, length := range []int64{math.MaxInt64, 1 << 62, limit + 1} {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := s.Create("k", metaV(length, 1))
		_, terr := s.CreateTransient(metaV(length, 1))
		runtime.ReadMemStats(&after)
		if !errors.Is(err, ErrTooLarge) || !errors.Is(terr, ErrTooLarge) {
			t.Errorf("length %d: Create: %v, CreateTransient: %v, want ErrTooLarge", length, err, terr)
		}
		if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
			t.Errorf("length %d: refusing it allocated %d bytes", length, grew)
		}
	}
	if st := s.Stats(); st.Objects != 0 {
		t.Errorf("refused objects were stored: %+v", st)
	}
	// The limit itself is fine.
	o := create(t, s, "k", metaV(limit, 1))
	writeBlock(t, o, o.Blocks()-1, 0)
	checkObject(t, o)
	o.Close()
}

func TestDefaultMaxObjectSizeCostsLittleMemory(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	if _, err := s.Create("big", metaV(DefaultMaxObjectSize+1, 1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Create above the default limit: %v", err)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	o := create(t, s, "big", metaV(DefaultMaxObjectSize, 1))
	runtime.ReadMemStats(&after)
	defer o.Close()
	// 2^24 blocks: a 2 MiB bitmap, checksums only for blocks written.
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 3<<20 {
		t.Errorf("creating a 1 TiB object allocated %d bytes", grew)
	}
	last := o.Block(o.Blocks() - 1)
	writeBlock(t, o, o.Blocks()-1, 0)
	p := make([]byte, last.Len)
	if _, err := o.ReadAt(p, last.Off); err != nil || !bytes.Equal(p, content(seedOf("big", `"v1"`), last.Off, last.Len)) {
		t.Errorf("last block of a 1 TiB object: %v", err)
	}
}

func TestMaxObjectSizeOptionIsChecked(t *testing.T) {
	for _, max := range []int64{-1, MaxMaxObjectSize + 1} {
		if s, err := Open(t.TempDir(), Options{MaxObjectSize: max}); err == nil {
			s.Close()
			t.Errorf("Open with MaxObjectSize %d succeeded", max)
		}
	}
}
