package rangestore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

func TestBlockSizeValidation(t *testing.T) {
	for _, tc := range []struct {
		size int64
		ok   bool
	}{
		{0, true}, // the default
		{MinBlockSize, true},
		{1 << 20, true},
		{MaxBlockSize, true},
		{MinBlockSize / 2, false},
		{MaxBlockSize * 2, false},
		{96 << 10, false}, // not a power of two
		{-1 << 20, false},
	} {
		t.Run(strconv.FormatInt(tc.size, 10), func(t *testing.T) {
			s, err := Open(t.TempDir(), Options{BlockSize: tc.size})
			if (err == nil) != tc.ok {
				t.Fatalf("Open with block size %d: err = %v, want ok=%v", tc.size, err, tc.ok)
			}
			if err != nil {
				return
			}
			defer s.Close()
			want := tc.size
			if want == 0 {
				want = DefaultBlockSize
			}
			if s.BlockSize() != want || s.Stats().BlockSize != want {
				t.Errorf("BlockSize = %d, Stats().BlockSize = %d, want %d", s.BlockSize(), s.Stats().BlockSize, want)
			}
		})
	}
}

func TestNegativeBudgetRejected(t *testing.T) {
	for _, opts := range []Options{{MaxSize: -1}, {MinFree: -1}} {
		if s, err := Open(t.TempDir(), opts); err == nil {
			s.Close()
			t.Errorf("Open(%+v) succeeded", opts)
		}
	}
}

func TestBlockSizeRecordedInFormat(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{BlockSize: 128 << 10})
	s.Close()
	b, err := os.ReadFile(filepath.Join(dir, "FORMAT"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != "rangestore 1 block_size=131072" {
		t.Errorf("FORMAT = %q", got)
	}
	if err := CheckFormat(dir, 128<<10); err != nil {
		t.Errorf("CheckFormat with the recorded size: %v", err)
	}
	if err := CheckFormat(t.TempDir(), 0); err != nil {
		t.Errorf("CheckFormat of an empty directory: %v", err)
	}
	openStore(t, dir, Options{BlockSize: 128 << 10}).Close()
}

func TestReopenWithOtherBlockSizeNamesBothSizes(t *testing.T) {
	dir := t.TempDir()
	openStore(t, dir, Options{BlockSize: 64 << 10}).Close()
	check := func(what string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s with another block size succeeded", what)
		}
		if msg := err.Error(); !strings.Contains(msg, "65536") || !strings.Contains(msg, "131072") {
			t.Errorf("%s error does not name both sizes: %v", what, err)
		}
	}
	_, err := Open(dir, Options{BlockSize: 128 << 10})
	check("Open", err)
	check("CheckFormat", CheckFormat(dir, 128<<10))
	// Zero means the default, which is not what the directory holds.
	_, err = Open(dir, Options{})
	if err == nil || !strings.Contains(err.Error(), strconv.Itoa(DefaultBlockSize)) {
		t.Errorf("Open with the default block size: %v", err)
	}
}

func TestSecondOpenOfLockedDirectoryFails(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	if s2, err := Open(dir, Options{BlockSize: testBS}); err == nil {
		s2.Close()
		t.Fatal("second Open of an open store succeeded")
	}
	if err := CheckFormat(dir, testBS); err != nil {
		t.Errorf("CheckFormat while open: %v", err)
	}
	s.Close()
	openStore(t, dir, Options{}).Close()
}

func TestCreateGetAndMetaSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	if _, err := s.Get("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of a missing key: %v", err)
	}
	if _, err := s.Create("neg", Meta{Length: -1}); err == nil {
		t.Error("Create with a negative length succeeded")
	}
	m := Meta{
		Length:       3*testBS + 17,
		ETag:         `"abc"`,
		LastModified: "Mon, 02 Jan 2006 15:04:05 GMT",
		ContentType:  "video/mp4",
		Header:       map[string][]string{"Cache-Control": {"max-age=60"}, "X-Two": {"a", "b"}},
		Internal:     map[string]string{"stored": "1700000000", "empty": ""},
	}
	o := create(t, s, "k", m)
	m.Header["Cache-Control"][0] = "changed by the caller" // Create keeps its own copy
	m.Internal["stored"] = "changed by the caller"
	if o.Key() != "k" || o.Size() != m.Length || o.Blocks() != 4 {
		t.Errorf("Key, Size, Blocks = %q, %d, %d", o.Key(), o.Size(), o.Blocks())
	}
	if got := o.Block(3); got != (Span{3 * testBS, 17}) {
		t.Errorf("Block(3) = %v", got)
	}
	if o.BlockOf(testBS-1) != 0 || o.BlockOf(testBS) != 1 {
		t.Error("BlockOf is wrong at the block boundary")
	}
	writeBlock(t, o, 3, 0)
	o.Close()
	s.Close()

	s = openStore(t, dir, Options{})
	defer s.Close()
	o, err := s.Get("k")
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	got := o.Meta()
	if got.Length != m.Length || got.ETag != m.ETag || got.LastModified != m.LastModified || got.ContentType != m.ContentType ||
		len(got.Header) != 2 || got.Header["Cache-Control"][0] != "max-age=60" || strings.Join(got.Header["X-Two"], ",") != "a,b" ||
		len(got.Internal) != 2 || got.Internal["stored"] != "1700000000" || got.Internal["empty"] != "" {
		t.Errorf("Meta after reopen = %+v", got)
	}
	checkObject(t, o)
	if !o.HasBlock(3) {
		t.Error("block 3 lost over a clean reopen")
	}
}

func TestSecondIdentityRejected(t *testing.T) {
	base := Meta{Length: 1000, ETag: `"e1"`, LastModified: "Mon, 02 Jan 2006 15:04:05 GMT"}
	noTag := Meta{Length: 1000, LastModified: "Mon, 02 Jan 2006 15:04:05 GMT"}
	for _, tc := range []struct {
		name        string
		stored, now Meta
		same        bool
	}{
		{"same etag", base, base, true},
		{"same etag other date and type", base, Meta{Length: 1000, ETag: `"e1"`, LastModified: "x", ContentType: "text/plain"}, true},
		{"other etag", base, Meta{Length: 1000, ETag: `"e2"`}, false},
		{"other length", base, Meta{Length: 1001, ETag: `"e1"`}, false},
		{"etag gone", base, noTag, false},
		{"no etag same date", noTag, noTag, true},
		{"no etag other date", noTag, Meta{Length: 1000, LastModified: "Tue, 03 Jan 2006 15:04:05 GMT"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), Options{})
			defer s.Close()
			o := create(t, s, "k", tc.stored)
			writeBlock(t, o, 0, 0)
			o.Close()
			o2, err := s.Create("k", tc.now)
			if tc.same {
				if err != nil {
					t.Fatalf("Create with the same identity: %v", err)
				}
				if !o2.HasBlock(0) || o2.Meta().ETag != tc.stored.ETag {
					t.Error("Create with the same identity did not return the stored object")
				}
				o2.Close()
				return
			}
			if !errors.Is(err, ErrIdentityMismatch) {
				t.Fatalf("Create with another identity: %v, want ErrIdentityMismatch", err)
			}
			// The stored version is untouched until invalidated.
			if o, err := s.Get("k"); err != nil || !o.HasBlock(0) {
				t.Fatalf("stored version after a rejected Create: %v", err)
			} else {
				o.Close()
			}
			if !s.Invalidate("k") {
				t.Fatal("Invalidate found nothing")
			}
			o2 = create(t, s, "k", tc.now)
			defer o2.Close()
			if o2.HasBlock(0) {
				t.Error("new version inherited a block of the old one")
			}
		})
	}
}

func TestPartialBlockNeverReadable(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "k", metaV(2*testBS, 1))
	seed := seedOf("k", o.Meta().ETag)

	// Half written and still open: not present.
	w, err := o.WriteBlock(0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(content(seed, 0, testBS/2)); err != nil {
		t.Fatal(err)
	}
	if w.Written() != testBS/2 || w.Len() != testBS {
		t.Errorf("Written, Len = %d, %d", w.Written(), w.Len())
	}
	p := make([]byte, 10)
	if n, err := o.ReadAt(p, 0); !errors.Is(err, ErrNotPresent) || n != 0 {
		t.Errorf("ReadAt of a block being written = %d, %v", n, err)
	}
	if o.HasBlock(0) || o.Present(0, 1) {
		t.Error("block being written is reported present")
	}
	if _, err := w.Write(make([]byte, testBS/2+1)); err == nil {
		t.Error("writing past the end of the block succeeded")
	}
	// Committing short refuses and leaves the block missing.
	if err := w.Commit(); !errors.Is(err, ErrShortBlock) {
		t.Errorf("short Commit: %v, want ErrShortBlock", err)
	}
	if o.HasBlock(0) {
		t.Error("short block became present")
	}
	if _, err := w.Write([]byte{1}); err == nil {
		t.Error("Write after a refused Commit succeeded")
	}

	// Aborted after writing nearly all of it: missing.
	w, err = o.WriteBlock(0)
	if err != nil {
		t.Fatalf("WriteBlock after a short commit: %v", err)
	}
	w.Write(content(seed, 0, testBS-1))
	w.Abort()
	w.Abort() // harmless
	if err := w.Commit(); err == nil {
		t.Error("Commit after Abort succeeded")
	}
	if o.HasBlock(0) {
		t.Error("aborted block became present")
	}
	if st := s.Stats(); st.BytesPresent != 0 || st.BytesWriting != 0 {
		t.Errorf("after aborts Stats = %+v", st)
	}

	// A block left half written by a crash stays missing after recovery.
	w, _ = o.WriteBlock(1)
	w.Write(content(seed, testBS, testBS-7))
	s.crash()
	s = openStore(t, dir, Options{})
	defer s.Close()
	o, err = s.Get("k")
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if o.HasBlock(0) || o.HasBlock(1) {
		t.Error("partial block present after reopen")
	}
	checkObject(t, o)
}

func TestBlockStreamedInPiecesReadsBack(t *testing.T) {
	for _, tc := range []struct{ bs, piece int }{
		{testBS, 1},
		{testBS, 7},
		{testBS, 4093},
		{testBS, testBS / 2},
		{testBS, testBS},
		// Large pieces are checksummed concurrently with the write.
		{1 << 20, 300 << 10},
		{1 << 20, 1 << 20},
	} {
		bs, piece := int64(tc.bs), tc.piece
		t.Run(fmt.Sprint(bs, "/", piece), func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, Options{BlockSize: bs})
			o := create(t, s, "k", metaV(2*bs+5, 1))
			if piece < 64 {
				// Byte-sized pieces through a whole block are slow under
				// -race; the short last block shows the same.
				writeBlock(t, o, 2, piece)
			} else {
				writeBlock(t, o, 0, piece)
				writeBlock(t, o, 2, piece)
			}
			checkObject(t, o)
			o.Close()
			// The checksum over the pieces must verify on recovery.
			s.crash()
			s = openStore(t, dir, Options{BlockSize: bs})
			defer s.Close()
			o, _ = s.Get("k")
			defer o.Close()
			if !o.HasBlock(2) {
				t.Error("streamed block dropped by recovery: its checksum does not match")
			}
			checkObject(t, o)
		})
	}
}

func TestWriteBlockRefusals(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	o := create(t, s, "k", metaV(2*testBS, 1))
	defer o.Close()
	for _, i := range []int{-1, 2} {
		if _, err := o.WriteBlock(i); err == nil {
			t.Errorf("WriteBlock(%d) out of range succeeded", i)
		}
	}
	writeBlock(t, o, 0, 0)
	if _, err := o.WriteBlock(0); !errors.Is(err, ErrBlockPresent) {
		t.Errorf("rewriting a present block: %v", err)
	}
	w, err := o.WriteBlock(1)
	if err != nil {
		t.Fatal(err)
	}
	o2, _ := s.Get("k")
	if _, err := o2.WriteBlock(1); !errors.Is(err, ErrBlockBusy) {
		t.Errorf("second writer of a block: %v", err)
	}
	o2.Close()
	w.Abort()

	// Invalidated under a writer: the commit is refused.
	w, _ = o.WriteBlock(1)
	w.Write(content(seedOf("k", o.Meta().ETag), testBS, testBS))
	s.Invalidate("k")
	if err := w.Commit(); !errors.Is(err, ErrGone) {
		t.Errorf("Commit after Invalidate: %v", err)
	}
	if _, err := o.WriteBlock(1); !errors.Is(err, ErrGone) {
		t.Errorf("WriteBlock after Invalidate: %v", err)
	}
	if o.Valid() {
		t.Error("invalidated object still Valid")
	}

	// Closed under a writer.
	o3 := create(t, s, "k3", metaV(testBS, 1))
	w, _ = o3.WriteBlock(0)
	w.Write(content(seedOf("k3", o3.Meta().ETag), 0, testBS))
	s.Close()
	if err := w.Commit(); !errors.Is(err, ErrClosed) {
		t.Errorf("Commit after Close: %v", err)
	}
	if _, err := o3.WriteBlock(0); !errors.Is(err, ErrClosed) {
		t.Errorf("WriteBlock after Close: %v", err)
	}
	o3.Close()
}

func TestReadAt(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	const length = 3*testBS + 100
	o := create(t, s, "k", metaV(length, 1))
	defer o.Close()
	writeBlock(t, o, 0, 0)
	writeBlock(t, o, 1, 0)
	writeBlock(t, o, 3, 0)
	seed := seedOf("k", o.Meta().ETag)
	for _, tc := range []struct {
		name    string
		off, n  int64
		wantN   int64
		wantErr error
	}{
		{"inside one block", 10, 100, 100, nil},
		{"across two present blocks", testBS - 5, 10, 10, nil},
		{"two whole blocks", 0, 2 * testBS, 2 * testBS, nil},
		{"touches a missing block", 2*testBS - 1, 2, 0, ErrNotPresent},
		{"inside a missing block", 2*testBS + 1, 1, 0, ErrNotPresent},
		{"short last block", 3 * testBS, 100, 100, nil},
		{"past the end", 3*testBS + 50, 100, 50, io.EOF},
		{"at the end, empty", length, 0, 0, nil},
		{"at the end", length, 1, 0, io.EOF},
		{"beyond the end", length + 10, 1, 0, io.EOF},
		{"empty inside a missing block", 2 * testBS, 0, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := make([]byte, tc.n)
			n, err := o.ReadAt(p, tc.off)
			if int64(n) != tc.wantN || !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("ReadAt(%d bytes at %d) = %d, %v; want %d, %v", tc.n, tc.off, n, err, tc.wantN, tc.wantErr)
			}
			if !bytes.Equal(p[:n], content(seed, tc.off, int64(n))) {
				t.Error("wrong bytes")
			}
		})
	}
	if _, err := o.ReadAt(make([]byte, 1), -1); err == nil {
		t.Error("ReadAt at a negative offset succeeded")
	}
	// io.SectionReader over the object works as a reader of present bytes.
	got, err := io.ReadAll(io.NewSectionReader(o, 3*testBS, 100))
	if err != nil || !bytes.Equal(got, content(seed, 3*testBS, 100)) {
		t.Errorf("SectionReader: %d bytes, %v", len(got), err)
	}
}

func TestMissingCoalescesBlockAlignedSpans(t *testing.T) {
	const length = 6*testBS + 10 // 7 blocks, the last one short
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	o := create(t, s, "k", metaV(length, 1))
	defer o.Close()
	for _, i := range []int{1, 4} { // present: .#..#..
		writeBlock(t, o, i, 0)
	}
	sp := func(first, last int) Span {
		return Span{int64(first) * testBS, min(int64(last+1)*testBS, length) - int64(first)*testBS}
	}
	for _, tc := range []struct {
		name   string
		off, n int64
		want   []Span
	}{
		{"whole object", 0, length, []Span{sp(0, 0), sp(2, 3), sp(5, 6)}},
		{"one byte of a missing block", 2*testBS + 3, 1, []Span{sp(2, 2)}},
		{"unaligned across missing neighbours", 2*testBS + 3, testBS, []Span{sp(2, 3)}},
		{"present block only", testBS, testBS, nil},
		{"present into missing", testBS + 5, testBS, []Span{sp(2, 2)}},
		{"short last block", length - 1, 1, []Span{sp(6, 6)}},
		{"clipped at the end", 5 * testBS, 10 * testBS, []Span{sp(5, 6)}},
		{"empty", 3 * testBS, 0, nil},
		{"beyond the end", length, 10, nil},
		{"negative offset", -1, 10, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := o.Missing(tc.off, tc.n)
			if !spansEqual(got, tc.want) {
				t.Errorf("Missing(%d, %d) = %v, want %v", tc.off, tc.n, got, tc.want)
			}
			if present := o.Present(tc.off, tc.n); present != (len(tc.want) == 0) {
				t.Errorf("Present(%d, %d) = %v, disagrees with Missing", tc.off, tc.n, present)
			}
		})
	}
	// Missing is cheap: it neither allocates nor touches the disk when
	// everything is present.
	if a := testing.AllocsPerRun(100, func() { o.Missing(testBS, testBS) }); a != 0 {
		t.Errorf("Missing over present blocks allocates %v times", a)
	}
}

func TestOpenFileServesApparentSize(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	defer s.Close()
	const length = 3*testBS + 123
	o := create(t, s, "k", metaV(length, 1))
	defer o.Close()
	writeBlock(t, o, 1, 0)
	writeBlock(t, o, 3, 0)
	seed := seedOf("k", o.Meta().ETag)

	f, err := o.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() != length {
		t.Fatalf("Stat of the served file: size %v, %v; want %d", fi.Size(), err, length)
	}
	// io.Copy from the file into another file takes the kernel's
	// zero-copy path (copy_file_range or sendfile); the present blocks
	// must come through intact.
	out, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := f.Seek(testBS, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(out, io.LimitReader(f, testBS)); err != nil || n != testBS {
		t.Fatalf("io.Copy of block 1 = %d, %v", n, err)
	}
	if n, err := io.Copy(out, io.NewSectionReader(f, 3*testBS, 123)); err != nil || n != 123 {
		t.Fatalf("io.Copy of the last block = %d, %v", n, err)
	}
	got, _ := os.ReadFile(out.Name())
	want := append(content(seed, testBS, testBS), content(seed, 3*testBS, 123)...)
	if !bytes.Equal(got, want) {
		t.Errorf("copied bytes differ at %d", firstDiff(got, want))
	}
	// Each Open has its own offset.
	f2, _ := o.Open()
	defer f2.Close()
	if off, _ := f2.Seek(0, io.SeekCurrent); off != 0 {
		t.Errorf("second descriptor starts at %d", off)
	}

	// An object nothing was written to (an empty one, say) can be served
	// too.
	e := create(t, s, "empty", Meta{Length: 0, ETag: `"0"`})
	defer e.Close()
	ef, err := e.Open()
	if err != nil {
		t.Fatalf("Open of an empty object: %v", err)
	}
	defer ef.Close()
	if n, err := io.Copy(io.Discard, ef); n != 0 || err != nil {
		t.Errorf("copy of an empty object = %d, %v", n, err)
	}
	if n, err := e.ReadAt(nil, 0); n != 0 || err != nil {
		t.Errorf("ReadAt of an empty object = %d, %v", n, err)
	}
	fresh := create(t, s, "fresh", metaV(testBS, 1))
	defer fresh.Close()
	if n, err := fresh.ReadAt(nil, 10); n != 0 || err != nil {
		t.Errorf("empty ReadAt of an object without data file = %d, %v", n, err)
	}
}

func TestInvalidateWhileReaderHoldsObjectKeepsBytes(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	defer s.Close()
	o := create(t, s, "k", metaV(2*testBS, 1))
	writeBlock(t, o, 0, 0)
	writeBlock(t, o, 1, 0)
	f, err := o.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	before := s.Stats().BytesPresent

	if !s.Invalidate("k") || s.Invalidate("k") {
		t.Fatal("Invalidate should find the object once")
	}
	if o.Valid() {
		t.Error("Valid after Invalidate")
	}
	if _, err := s.Get("k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Invalidate: %v", err)
	}
	// The holder still reads the old version, through both paths.
	checkObject(t, o)
	p := make([]byte, testBS)
	if _, err := f.ReadAt(p, testBS); err != nil || !bytes.Equal(p, content(seedOf("k", `"v1"`), testBS, testBS)) {
		t.Errorf("served file after Invalidate: %v", err)
	}
	if f2, err := o.Open(); err != nil {
		t.Errorf("Open after Invalidate while held: %v", err)
	} else {
		f2.Close()
	}
	// Its bytes still count against the budget until released.
	if got := s.Stats().BytesPresent; got != before {
		t.Errorf("BytesPresent while held = %d, want %d", got, before)
	}

	// A new version under the same key is independent of the old.
	n := create(t, s, "k", metaV(3*testBS, 2))
	writeBlock(t, n, 2, 0)
	checkObject(t, n)
	checkObject(t, o)
	n.Close()
	if len(dataFiles(t, dir)) != 2 {
		t.Errorf("data files while the old version is held: %v", dataFiles(t, dir))
	}

	o.Close()
	o.Close() // harmless
	if got := s.Stats().BytesPresent; got != testBS {
		t.Errorf("BytesPresent after the holder closed = %d, want %d", got, testBS)
	}
	if files := dataFiles(t, dir); len(files) != 1 {
		t.Errorf("old data file not removed on last Close: %v", files)
	}
	// The descriptor opened before stays valid after the unlink.
	if _, err := f.ReadAt(p, 0); err != nil || !bytes.Equal(p, content(seedOf("k", `"v1"`), 0, testBS)) {
		t.Errorf("descriptor after unlink: %v", err)
	}
}

func TestPurgeByPrefix(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	keys := []string{"a/1", "a/2", "a/b/3", "ab", "b/1"}
	for _, k := range keys {
		o := create(t, s, k, metaV(testBS, 1))
		writeBlock(t, o, 0, 0)
		o.Close()
	}
	held, _ := s.Get("a/2")
	if n := s.Purge("a/"); n != 3 {
		t.Errorf("Purge(a/) = %d, want 3", n)
	}
	if n := s.Purge("zzz"); n != 0 {
		t.Errorf("Purge of nothing = %d", n)
	}
	checkObject(t, held) // held objects keep their bytes
	held.Close()
	want := []string{"ab", "b/1"}
	var got []string
	for _, info := range s.List() {
		got = append(got, info.Key)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("List after Purge = %v, want %v", got, want)
	}
	s.Close()
	s = openStore(t, dir, Options{})
	defer s.Close()
	got = got[:0]
	for _, info := range s.List() {
		got = append(got, info.Key)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("List after reopen = %v, want %v", got, want)
	}
	if files := dataFiles(t, dir); len(files) != 2 {
		t.Errorf("data files after Purge and reopen: %v", files)
	}
	if n := s.Purge(""); n != 2 || len(s.List()) != 0 {
		t.Errorf("Purge of everything = %d, leaving %v", n, s.List())
	}
}

func TestListAndStats(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{MaxSize: 100 * testBS, MinFree: 1})
	defer s.Close()
	if st := s.Stats(); st != (Stats{MaxSize: 100 * testBS, MinFree: 1, BlockSize: testBS}) {
		t.Errorf("Stats of an empty store = %+v", st)
	}
	b := create(t, s, "b", metaV(2*testBS+1, 1))
	writeBlock(t, b, 0, 0)
	writeBlock(t, b, 2, 0)
	a := create(t, s, "a", metaV(testBS, 1))
	w, err := a.WriteBlock(0)
	if err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Objects != 2 || st.BytesPresent != testBS+1 || st.BytesWriting != testBS {
		t.Errorf("Stats with a block being written = %+v", st)
	}
	w.Abort()
	if st := s.Stats(); st.BytesWriting != 0 {
		t.Errorf("BytesWriting after Abort = %d", st.BytesWriting)
	}
	list := s.List()
	if len(list) != 2 || list[0].Key != "a" || list[1].Key != "b" {
		t.Fatalf("List = %+v", list)
	}
	if list[0].Size != testBS || list[0].BytesPresent != 0 || list[1].Size != 2*testBS+1 || list[1].BytesPresent != testBS+1 {
		t.Errorf("List = %+v", list)
	}
	a.Close()
	b.Close()
	last := list[1].LastAccess
	g, _ := s.Get("b")
	g.Close()
	if now := s.List()[1].LastAccess; now.Before(last) {
		t.Errorf("LastAccess went back after Get: %v < %v", now, last)
	}
}

func TestConcurrentCloseOneWins(t *testing.T) {
	// The window is narrow; go through it many times.
	for range 100 {
		s := openStore(t, t.TempDir(), Options{})
		start := make(chan struct{})
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range errs {
			wg.Go(func() {
				<-start
				errs[i] = s.Close()
			})
		}
		close(start)
		wg.Wait()
		ok := 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case !errors.Is(err, ErrClosed):
				t.Errorf("Close: %v", err)
			}
		}
		if ok != 1 {
			t.Fatalf("%d Closes succeeded, want 1", ok)
		}
	}
}

func TestCloseTwiceAndUseAfterClose(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "k", metaV(2*testBS, 1))
	writeBlock(t, o, 0, 0)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
	if _, err := s.Get("k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Get after Close: %v", err)
	}
	if _, err := s.Create("x", metaV(1, 1)); !errors.Is(err, ErrClosed) {
		t.Errorf("Create after Close: %v", err)
	}
	// A closed store must not touch the directory: another store may own
	// it now.
	s2 := openStore(t, dir, Options{})
	defer s2.Close()
	if s.Invalidate("k") || s.Purge("") != 0 {
		t.Error("Invalidate or Purge did something after Close")
	}
	// Handles opened before Close still read.
	checkObject(t, o)
	o.Close()
	o2, err := s2.Get("k")
	if err != nil {
		t.Fatalf("object lost: %v", err)
	}
	checkObject(t, o2)
	o2.Close()
}

func TestCleanCloseLeavesNothingToReplay(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "k", metaV(3*testBS, 1))
	writeBlock(t, o, 0, 0)
	writeBlock(t, o, 2, 0)
	o.Close()
	s.Close()
	journals, _ := filepath.Glob(filepath.Join(dir, "journal-*"))
	if len(journals) != 1 {
		t.Fatalf("journals after Close: %v", journals)
	}
	if fi, err := os.Stat(journals[0]); err != nil || fi.Size() != 0 {
		t.Errorf("journal after a clean Close is not empty: %v", err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	if p := presence(t, s); p["k"] != `"v1" #.#` {
		t.Errorf("presence after reopen = %v", p)
	}
}

func TestOrphanAndLostDataFiles(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	for _, k := range []string{"keep", "lose"} {
		o := create(t, s, k, metaV(2*testBS, 1))
		writeBlock(t, o, 1, 0)
		o.Close()
	}
	lose, _ := s.Get("lose")
	losePath := s.dataPath(lose.e.gen)
	lose.Close()
	// A data file without a present block: its only write was aborted.
	ab := create(t, s, "aborted", metaV(testBS, 1))
	w, _ := ab.WriteBlock(0)
	w.Write(make([]byte, 100))
	w.Abort()
	abPath := s.dataPath(ab.e.gen)
	ab.Close()
	s.Close()

	orphan := filepath.Join(dir, "data", "ff", "deadbeef")
	os.MkdirAll(filepath.Dir(orphan), 0o755)
	if err := os.WriteFile(orphan, []byte("stray"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(losePath); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Errorf("orphan data file kept: %v", err)
	}
	// An object whose data file is gone was removed (its delete record
	// lost): it is forgotten, not brought back empty.
	if p := presence(t, s); p["keep"] != `"v1" .#` || p["lose"] != "" || p["aborted"] != `"v1" .` {
		t.Errorf("presence = %v", p)
	}
	// Its data file goes with the object, not at some later Open.
	s.Invalidate("aborted")
	if _, err := os.Stat(abPath); !os.IsNotExist(err) {
		t.Errorf("data file of an invalidated object without blocks kept: %v", err)
	}
	if st := s.Stats(); st.BytesPresent != testBS {
		t.Errorf("BytesPresent = %d, want %d", st.BytesPresent, testBS)
	}
	checkStore(t, s)
}

func TestObjectInvalidateRemovesOnlyItsOwnVersion(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	old := create(t, s, "k", metaV(testBS, 1))
	defer old.Close()
	writeBlock(t, old, 0, 0)
	if !s.Invalidate("k") {
		t.Fatal("Invalidate found nothing")
	}
	cur := create(t, s, "k", metaV(testBS, 2))
	defer cur.Close()

	// The old handle's version is gone: invalidating it must not take the
	// newer version stored under the same key since.
	if old.Invalidate() {
		t.Error("Invalidate of a version already gone reported success")
	}
	if got, err := s.Get("k"); err != nil || got.ID() != cur.ID() {
		t.Fatalf("Get after invalidating the old version: %v", err)
	} else {
		got.Close()
	}
	if !cur.Invalidate() || cur.Invalidate() {
		t.Error("Invalidate of the stored version should succeed once")
	}
	if _, err := s.Get("k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Invalidate of the stored version: %v", err)
	}
	s.Close()
	// Removal is journalled: it holds over a reopen.
	s = openStore(t, dir, Options{})
	defer s.Close()
	if _, err := s.Get("k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after reopen: %v", err)
	}
}
