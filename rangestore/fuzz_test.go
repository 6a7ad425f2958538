package rangestore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"testing"
)

// model is what the store should hold: per key, the version and its
// present blocks.
type model map[string]*modelObject

type modelObject struct {
	v       int
	present []bool
}

// fuzzKeys are the keys of FuzzStoreModel: one of several blocks with a
// short last one, one of exactly two blocks, one of a few bytes.
var fuzzKeys = []struct {
	key    string
	length int64
}{
	{"multi", 3*testBS + 100},
	{"pair", 2 * testBS},
	{"tiny", 1},
}

func fuzzMeta(k, v int) Meta { return metaV(fuzzKeys[k].length+int64(v)*10, v) }

// fuzzOps is a decoder of the fuzzer's bytes into operations.
type fuzzOps struct{ b []byte }

func (f *fuzzOps) next() int {
	if len(f.b) == 0 {
		return 0
	}
	v := f.b[0]
	f.b = f.b[1:]
	return int(v)
}

// FuzzStoreModel applies random sequences of writes, reads,
// invalidations, clean reopens and crashes to a store and to a model of it,
// and checks they agree: every read byte for byte, and which blocks are
// present exactly, except for whole objects the store evicted to keep to
// MaxSize.
func FuzzStoreModel(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 0, 0, 3, 0, 0, 0, 6, 4, 0, 0, 0, 0})
	f.Add([]byte{1, 0, 0, 1, 1, 0, 1, 1, 0, 2, 0, 1, 2, 0, 0, 7, 3, 0, 1, 2, 3})
	f.Add([]byte{2, 0, 1, 1, 0, 0, 1, 2, 1, 0, 5, 1, 0, 1, 2, 0, 7, 4, 1, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		ops := &fuzzOps{b: data}
		var opts Options
		switch ops.next() % 3 {
		case 1:
			opts.MaxSize = 5 * testBS // every object fits, not all of them
		case 2:
			opts.MaxSize = 3 * testBS // not even "multi" fits
		}
		dir := t.TempDir()
		s := openStore(t, dir, opts)
		defer func() { s.Close() }()
		m := make(model)
		evictions := int64(0)

		for step := 0; len(ops.b) > 0 && step < 64; step++ {
			op := ops.next() % 8
			k := ops.next() % len(fuzzKeys)
			key := fuzzKeys[k].key
			what := fmt.Sprintf("step %d op %d key %s", step, op, key)
			switch op {
			case 0, 1, 2:
				fuzzWrite(t, s, m, k, 1+ops.next()%2, ops.next(), ops.next(), what)
			case 3, 4:
				fuzzRead(t, s, m, key, ops.next()<<8|ops.next(), ops.next(), what)
			case 5:
				if got, want := s.Invalidate(key), m[key] != nil; got != want {
					t.Fatalf("%s: Invalidate = %v, want %v", what, got, want)
				}
				delete(m, key)
			case 6, 7:
				before := presence(t, s)
				if op == 6 {
					if err := s.Close(); err != nil {
						t.Fatalf("%s: Close: %v", what, err)
					}
				} else {
					s.crash()
				}
				s = openStore(t, dir, opts)
				evictions = 0
				if after := presence(t, s); fmt.Sprint(after) != fmt.Sprint(before) {
					t.Fatalf("%s: reopen changed presence:\n before %v\n after  %v", what, before, after)
				}
			}

			// Eviction takes whole objects: forget those, then the store
			// and the model must agree exactly.
			st := s.Stats()
			if st.Evictions != evictions {
				evictions = st.Evictions
				for key := range m {
					if o, err := s.Get(key); err != nil {
						delete(m, key)
					} else {
						o.Close()
					}
				}
			}
			if opts.MaxSize > 0 && st.BytesPresent+st.BytesWriting > opts.MaxSize {
				t.Fatalf("%s: over budget: %+v", what, st)
			}
			if got, want := presence(t, s), m.presence(); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("%s:\n store %v\n model %v", what, got, want)
			}
		}
		checkStore(t, s)
	})
}

// presence renders m as the presence helper renders a store.
func (m model) presence() map[string]string {
	out := make(map[string]string)
	for k, o := range m {
		bits := make([]byte, len(o.present))
		for i, p := range o.present {
			bits[i] = '.'
			if p {
				bits[i] = '#'
			}
		}
		out[k] = fmt.Sprintf(`"v%d" %s`, o.v, bits)
	}
	return out
}

func fuzzWrite(t *testing.T, s *Store, m model, k, v, blk, mode int, what string) {
	t.Helper()
	key := fuzzKeys[k].key
	meta := fuzzMeta(k, v)
	o, err := s.Create(key, meta)
	if errors.Is(err, ErrIdentityMismatch) {
		if m[key] == nil || m[key].v == v {
			t.Fatalf("%s: Create v%d: %v, but the model has %+v", what, v, err, m[key])
		}
		// The new version replaces the old, as a cache does.
		s.Invalidate(key)
		delete(m, key)
		o, err = s.Create(key, meta)
	}
	if err != nil {
		t.Fatalf("%s: Create: %v", what, err)
	}
	defer o.Close()
	mo := m[key]
	if mo == nil {
		mo = &modelObject{v: v, present: make([]bool, o.Blocks())}
		m[key] = mo
	} else if mo.v != v {
		t.Fatalf("%s: Create v%d returned the stored v%d", what, v, mo.v)
	}

	i := blk % o.Blocks()
	w, err := o.WriteBlock(i)
	if mo.present[i] {
		if !errors.Is(err, ErrBlockPresent) {
			t.Fatalf("%s: WriteBlock(%d) of a present block: %v", what, i, err)
		}
		return
	}
	if max := s.opts.MaxSize; max > 0 {
		// Everything but this object can be evicted to make room.
		own := int64(0)
		for j, p := range mo.present {
			if p {
				own += o.Block(j).Len
			}
		}
		if full := own+o.Block(i).Len > max; full != errors.Is(err, ErrNoSpace) {
			t.Fatalf("%s: WriteBlock(%d) with %d bytes of its own and max %d: %v", what, i, own, max, err)
		}
		if err != nil {
			return
		}
	}
	if err != nil {
		t.Fatalf("%s: WriteBlock(%d): %v", what, i, err)
	}
	b := o.Block(i)
	p := content(seedOf(key, meta.ETag), b.Off, b.Len)
	piece := []int{len(p), 4096, 10000, 65535}[(mode>>1)%4]
	for len(p) > 0 {
		n := min(piece, len(p))
		if _, err := w.Write(p[:n]); err != nil {
			t.Fatalf("%s: Write: %v", what, err)
		}
		p = p[n:]
		if mode&1 != 0 && len(p) > 0 {
			w.Abort() // partly written, never present
			return
		}
	}
	if err := w.Commit(); err != nil {
		t.Fatalf("%s: Commit: %v", what, err)
	}
	mo.present[i] = true
}

// fuzzRead reads a range whose offset (a fraction of the object, in 1/65536)
// and size (from a table of sizes around block boundaries) come from the
// fuzzer, and checks the outcome against the model.
func fuzzRead(t *testing.T, s *Store, m model, key string, frac, size int, what string) {
	t.Helper()
	o, err := s.Get(key)
	mo := m[key]
	if mo == nil {
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: Get of a key not in the model: %v", what, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("%s: Get: %v", what, err)
	}
	defer o.Close()
	length := o.Size()
	off := length * int64(frac) / 0xffff // up to and including the end
	n := []int64{0, 1, 100, testBS - 1, testBS, testBS + 1, 2 * testBS, 5 * testBS}[size%8]
	what += " read " + strconv.FormatInt(n, 10) + " at " + strconv.FormatInt(off, 10)

	// What the model says.
	end := min(off+n, length)
	var wantN int64
	var wantErr error
	var missing []Span
	for i := int(off / testBS); off < end && int64(i)*testBS < end; i++ {
		if !mo.present[i] {
			b := o.Block(i)
			if k := len(missing) - 1; k >= 0 && missing[k].Off+missing[k].Len == b.Off {
				missing[k].Len += b.Len
			} else {
				missing = append(missing, b)
			}
		}
	}
	switch {
	case off >= length && (n > 0 || off > length):
		wantErr = io.EOF
	case n == 0:
	case len(missing) > 0:
		wantErr = ErrNotPresent
	default:
		wantN = end - off
		if wantN < n {
			wantErr = io.EOF
		}
	}

	p := make([]byte, n)
	got, err := o.ReadAt(p, off)
	if int64(got) != wantN || !errors.Is(err, wantErr) || wantErr == nil && err != nil {
		t.Fatalf("%s: ReadAt = %d, %v; want %d, %v", what, got, err, wantN, wantErr)
	}
	if want := content(seedOf(key, o.Meta().ETag), off, int64(got)); !bytes.Equal(p[:got], want) {
		t.Fatalf("%s: bytes differ at %d", what, firstDiff(p[:got], want))
	}
	if got := o.Missing(off, n); !spansEqual(got, missing) {
		t.Fatalf("%s: Missing = %v, want %v", what, got, missing)
	}
	if o.Present(off, n) != (len(missing) == 0) {
		t.Fatalf("%s: Present disagrees with Missing %v", what, missing)
	}
}
